"""Prefect flows: sft_pipeline (main) and validate (subflow). They compose tasks; no ML logic."""

from sft_core.errors import hide_user_error_tracebacks

# Also runs in Ray worker processes, which import this package to run a task.
hide_user_error_tracebacks()
