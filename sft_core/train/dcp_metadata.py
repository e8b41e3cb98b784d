"""Reading a DCP checkpoint without running code from it.

torch.distributed.checkpoint's FileSystemReader loads `<checkpoint>/dcp/.metadata` with a bare
`pickle.load`: a checkpoint folder edited by someone else (a shared output_dir, a copied run)
would execute whatever that file names on resume. The tensors and other entries it indexes are
already read safely (raw bytes, `torch.load(weights_only=True)`), so the metadata is the one door.
Here it is unpickled with an allowlist: the dataclasses of torch.distributed.checkpoint.metadata,
torch sizes, dtypes and layouts, and a path; anything else is refused with the file named.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from sft_core.errors import UserError

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# By name: that module also imports `os` and `torch`, and pickle resolves a dotted name ("os.system").
_METADATA_CLASSES = frozenset(
    {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    }
)
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch", "Size"): torch.Size,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): None,
    ("torch.serialization", "_get_layout"): None,
    ("pathlib", "PosixPath"): None,
    ("pathlib", "Path"): None,
}


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """The metadata names something other than checkpoint bookkeeping."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == _METADATA_MODULE and name in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refers to {module}.{name}")


def load_metadata(path: Path) -> Metadata:
    """The checkpoint index at `path`, or UnsafeCheckpointError naming the file and the object."""
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(
                f"{path}: {e}, which a checkpoint index never holds; refusing to load it (the file "
                "was altered after it was written, or by another program). Resume from another "
                "checkpoint or start a new run."
            ) from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: not a torch.distributed.checkpoint index")
    return metadata


def check_checkpoint_index(train_state: Path) -> None:
    """Refuse a resume state whose DCP index is not plain bookkeeping, before any worker starts (the
    workers refuse it too, but inside dcp's error reports)."""
    index = train_state / "dcp" / ".metadata"
    if index.is_file():
        load_metadata(index)


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata goes through the allowlist above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = load_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata
