"""k15.model."""
