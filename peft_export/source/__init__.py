"""Resolve model ids into local folders and parsed configs."""
