"""Rebuilds of a real Debian guest, as operators run them; one booted guest serves the whole package."""
