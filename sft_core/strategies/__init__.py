"""Training strategies: one class each behind `Strategy` (base.py), found by `strategy_name` in
registry.py, which holds the list of supported names and their config schemas."""
