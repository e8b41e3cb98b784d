"""Prefect tasks: thin wrappers giving each stage a cache key, retries and a name in the UI."""
