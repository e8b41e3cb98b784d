"""Training: batch schedule, loss normalization, LR schedule, the worker, checkpoints."""
