"""What the worker and the operator's tools share without depending on each other."""
