"""The data path: rows -> chat messages -> token ids + labels -> packed rows -> micro-batches."""

IGNORE_INDEX = -100
