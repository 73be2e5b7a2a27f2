"""Rebuilds of a real Debian guest, as operators run them, on guests booted once per test group."""
