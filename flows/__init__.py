"""Prefect flows: sft_pipeline (main) and validate (subflow). They compose tasks; no ML logic."""
