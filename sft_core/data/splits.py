"""What the data stages hand on, typed: one encoded split and its packing plan.

The encode and pack tasks return these (Prefect persists them as cached results); the flow reads
their counts for the run's data metrics and passes their paths to the cluster as `TrainArtifacts`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodedSplit:
    """One split encoded into `path` (encoded.npz), with its row account and reports beside it."""

    split: str
    key: str  # the encode cache key: file contents, tokenizer, encoding settings, data code
    path: str
    rows_read: int  # = samples + rejected + dropped: no row is lost silently
    samples: int
    tokens: int
    supervised_tokens: int
    truncated: int
    dropped: int
    rejected: int
    report: str  # length_report.jsonl: each truncated or dropped sample
    rejects: str  # rejects.jsonl: each bad row with its reason
    unread: str = ""  # the fields no row's mapping read, with their row counts ("" = none)
    unread_suspect: bool = False  # besides, query_key has a value in no alpaca row: likely misnamed

    def counts(self) -> dict[str, int]:
        """The row account, by the names the run's data metrics use."""
        return {
            "samples": self.samples,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "rejected": self.rejected,
        }


@dataclass(frozen=True)
class PackedSplit:
    """The packing plan of one encoded split: which samples share each row of sequence_length."""

    split: str
    path: str  # plan-<key>.json (PackedPlan.to_dict)
    rows: int
    samples: int
    padding_fraction: float
