"""A checkpoint folder is data: resuming from one that someone altered never runs code from it."""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict

from sft_core.train.dcp_metadata import SafeFileSystemReader


def _saved_optimizer(path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    _, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"optim": optim_sd}, checkpoint_id=str(path))
    return model, optimizer


class _Payload:
    """What an attacker would put in the index: unpickling it calls Path.touch(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_safe_reader_loads_what_dcp_saved(tmp_path: Path) -> None:
    model, optimizer = _saved_optimizer(tmp_path / "dcp")
    _, expected = get_state_dict(model, optimizer)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    fresh.step()  # other Adam moments, so the load has to overwrite them
    _, state = get_state_dict(model, fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"optim": state}, storage_reader=SafeFileSystemReader(tmp_path / "dcp"))
    for key, value in expected["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state["state"][key][name], value[name], rtol=0, atol=0)


def test_tampered_checkpoint_index_is_refused_without_running_it(tmp_path: Path) -> None:
    _saved_optimizer(tmp_path / "dcp")
    marker = tmp_path / "PWNED"
    metadata = tmp_path / "dcp" / ".metadata"
    original = pickle.loads(metadata.read_bytes())
    # The real index with one extra entry that runs code when unpickled.
    original.planner_data = {"x": _Payload(marker)}
    metadata.write_bytes(pickle.dumps(original))

    model = torch.nn.Linear(4, 3)
    _, state = get_state_dict(model, torch.optim.AdamW(model.parameters()))
    # dcp wraps the reader's error in its CheckpointException (a BaseException); the text is kept.
    with pytest.raises(CheckpointException) as refused, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"optim": state}, storage_reader=SafeFileSystemReader(tmp_path / "dcp"))
    assert f"{metadata}: refers to pathlib.Path.touch" in str(refused.value)
    assert "refusing to load it" in str(refused.value)
    assert not marker.exists()

    # The stock reader would have run it: what this guards against is real.
    # (The load itself then fails or not; beside the point.)
    with warnings.catch_warnings(), contextlib.suppress(CheckpointException):
        warnings.simplefilter("ignore")
        dcp.load({"optim": state}, checkpoint_id=str(tmp_path / "dcp"))
    assert marker.exists()


def _global_call(module: str, name: str, arg: str) -> bytes:
    """A pickle (protocol 4) that calls module.name(arg): what a hand-written index can hold."""
    short = [bytes([0x8C, len(t.encode())]) + t.encode() for t in (module, name, arg)]
    return b"\x80\x04" + short[0] + short[1] + b"\x93" + short[2] + b"\x85R."


@pytest.mark.parametrize("name", ["os.mkdir", "torch.load", "field", "dataclass", "Enum.__new__"])
def test_an_index_naming_anything_but_its_own_classes_through_their_module_is_refused(tmp_path, name):
    """The metadata module imports os and torch, and protocol 4 resolves dotted names: allowing the
    module's names by prefix would let "os.mkdir" through."""
    from sft_core.errors import UserError
    from sft_core.train.dcp_metadata import check_checkpoint_index

    marker = tmp_path / "PWNED"
    index = tmp_path / "train_state" / "dcp" / ".metadata"
    index.parent.mkdir(parents=True)
    index.write_bytes(_global_call("torch.distributed.checkpoint.metadata", name, str(marker)))
    with pytest.raises(UserError, match=rf"refers to torch\.distributed\.checkpoint\.metadata\.{name}"):
        check_checkpoint_index(tmp_path / "train_state")
    assert not marker.exists()
    # Unchecked, the first one does run: the bytes are a working attack.
    if name == "os.mkdir":
        pickle.loads(index.read_bytes())
        assert marker.is_dir()


def test_a_tampered_index_stops_the_resume_before_any_worker_with_a_clear_error(tmp_path):
    from sft_core.errors import UserError
    from sft_core.train.dcp_metadata import check_checkpoint_index

    state = tmp_path / "train_state"
    _saved_optimizer(state / "dcp")
    check_checkpoint_index(state)  # an index as dcp wrote it passes
    metadata = state / "dcp" / ".metadata"
    index = pickle.loads(metadata.read_bytes())
    index.planner_data = {"x": _Payload(tmp_path / "PWNED")}
    metadata.write_bytes(pickle.dumps(index))
    with pytest.raises(UserError, match=r"\.metadata: refers to pathlib\.Path\.touch.*refusing to load it"):
        check_checkpoint_index(state)
    assert not (tmp_path / "PWNED").exists()
