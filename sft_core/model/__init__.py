"""Resolve and load pretrained models and tokenizers."""
