"""k15.sampling."""
