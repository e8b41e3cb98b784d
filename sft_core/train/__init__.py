"""The pieces of a step: batch schedule, loss normalization, LR schedule, step statistics and metric
names, MFU, checkpoints and run folders. Nothing here imports the strategies or the cluster."""
