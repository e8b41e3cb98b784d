"""What the flow hands the training cluster: where the model, tokenizer and prepared data are.

Paths only (every worker loads the data itself, no batch crosses Ray); every path must be readable
on every node (shared storage on a multi-node cluster; the cluster checks before any work starts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SplitFiles:
    encoded: str  # encoded.npz
    plan: str  # the packing plan's JSON


@dataclass(frozen=True)
class TrainArtifacts:
    model_dir: str  # Hugging Face folder of the pretrained model
    tokenizer_dir: str  # the tokenizer as prepared for this run (fixes applied)
    train: SplitFiles
    validation: SplitFiles | None = None
    # A folder of the run that every worker writes a probe into, proving the driver sees what the
    # workers write (checkpoints); None skips the check.
    shared_dir: str | None = None

    def with_shared_dir(self, folder: str) -> TrainArtifacts:
        return replace(self, shared_dir=folder)

    def data_files(self) -> list[str]:
        """The encoded data every worker must be able to read."""
        return [self.train.encoded] + ([self.validation.encoded] if self.validation else [])
