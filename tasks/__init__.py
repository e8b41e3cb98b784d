"""Prefect tasks: thin wrappers giving each stage a cache key, retries and a name in the UI."""

from sft_core.errors import hide_user_error_tracebacks

# Also runs in Ray worker processes, which import this package to run a task.
hide_user_error_tracebacks()
