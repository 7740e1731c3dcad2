"""A run: its directory, store, stages and driver (``pbrf run``)."""
