"""`megatron_train`: megatron-core tensor, pipeline, context and data parallelism.

    layout.py    strategy_config (the parallel layout), checked when the config loads
    model.py     GPTModel chunks for a mapped HF architecture, HF weights in and out
    batches.py   packed micro-batches in megatron's shape, with block-diagonal causal masks
    strategy.py  MegatronStrategy: the step, evaluation, export and exact resume
    cpu_shim.py  answers megatron's CUDA calls on CPU

Importing this package does not import megatron-core; the strategy does when a run starts.
"""
