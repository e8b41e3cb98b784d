"""sft_core: the SFT library (config, data, model, cluster, strategies, train, tracking).

Nothing in this package imports Prefect: flows/ and tasks/ compose it into a pipeline.
"""
