"""k15.rewards."""
