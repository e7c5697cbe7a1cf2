"""k15.data."""
