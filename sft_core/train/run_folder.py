"""Run folders: each training run owns its checkpoints.

    <output_dir>/runs/<YYYYmmdd-HHMMSS>-<flow run id[-8:]>/
        run.json                              who made it: flow run(s), MLflow run, base model
        .lock                                 held (flock) by the process training into it
        sft_train/checkpoint-<step>/<cluster>/ Hugging Face folder (see checkpoint.py)

A new run never writes into another run's folder, so the weights behind a registered version never
change. A retry of a flow run (Prefect's Retry, `prefect flow-run retry`, flow retries) finds its own
folder by the flow run id and continues from its newest checkpoint; `resume_from_checkpoint: auto` (or
a path) continues the run that owns that checkpoint when it is that run's newest, and branches into a
new folder otherwise (so nothing after it is overwritten). A damaged checkpoint (see checkpoint.py's
manifest) is never resumed from nor removed: a run whose newest checkpoint is damaged continues from
its newest complete one in a new folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sft_core.errors import ConfigError, UserError

RUNS = "runs"


class RunFolderBusy(UserError):
    """Another process is training into the same run folder."""


@dataclass(frozen=True)
class RunFolder:
    root: Path
    cluster_name: str = "sft_train"

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def checkpoints_root(self) -> Path:
        return self.root / "sft_train"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_root / f"checkpoint-{step}"

    def staging(self, step: int) -> Path:
        return self.checkpoints_root / f".checkpoint-{step}.tmp"

    @property
    def info_path(self) -> Path:
        return self.root / "run.json"

    def info(self) -> dict[str, Any]:
        return json.loads(self.info_path.read_text()) if self.info_path.is_file() else {}

    def update_info(self, **fields: Any) -> None:
        """Merge `fields` into run.json (written whole, then renamed: never half a file)."""
        info = {**self.info(), **fields}
        tmp = self.info_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.info_path)

    def record_flow_run(self, flow_run_id: str) -> None:
        ids = self.info().get("flow_run_ids", [])
        if flow_run_id not in ids:
            self.update_info(flow_run_ids=[*ids, flow_run_id])


@dataclass(frozen=True)
class RunPlan:
    """Where a flow run trains and what it starts from."""

    run: RunFolder
    resume: Path | None  # a checkpoint-<step> folder, or None to start from the pretrained model
    why: str  # one line for the log


def runs_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / RUNS


def own_entries(folder: Path, pattern: str = "*") -> list[Path]:
    """The folders in `folder` matching `pattern`, sorted, links excepted: a link placed there (a
    checkpoint or run "shared" from elsewhere) is not this folder's to list, resume from or prune.
    `folder` itself may be a link (runs/ on another disk)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if p.is_dir() and not p.is_symlink())


def run_of(checkpoint: Path) -> RunFolder:
    """The run folder that owns `checkpoint` (<run>/sft_train/checkpoint-<step>)."""
    return RunFolder(checkpoint.resolve().parent.parent)


def find_run(output_dir: str | Path, flow_run_id: str) -> RunFolder | None:
    """The folder a flow run trained into before (a retry of it), if any."""
    # Not by name alone: a run continued by another flow run (resume) lists that one's id too. The
    # newest first: a retry that found its folder damaged branched into a newer one.
    for folder in reversed(own_entries(runs_root(output_dir))):
        if flow_run_id in RunFolder(folder).info().get("flow_run_ids", []):
            return RunFolder(folder)
    return None


def new_run(output_dir: str | Path, flow_run_id: str, **info: Any) -> RunFolder:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    # The id's end: Prefect's ids are UUIDv7, whose start is a timestamp that the flow runs of one
    # scheduler batch share.
    base = runs_root(output_dir) / f"{stamp}-{flow_run_id[-8:]}"
    base.parent.mkdir(parents=True, exist_ok=True)
    # The same flow run may open a second folder within a second (a retry branching off a damaged one).
    root, n = base, 1
    while True:
        try:
            root.mkdir()
            break
        except FileExistsError:
            n += 1
            root = base.with_name(f"{base.name}-{n}")
    run = RunFolder(root)
    run.update_info(flow_run_ids=[flow_run_id], created=datetime.now(UTC).isoformat(), **info)
    return run


def refuse_inside_a_checkpoint(path: str, key: str = "output_dir") -> None:
    """A published checkpoint never changes (registered versions point at it): no run writes into
    one, neither its checkpoints (`output_dir`) nor its logs (`logging_dir`)."""
    from sft_core.train.checkpoint import MANIFEST

    where = Path(path).expanduser().resolve()
    for folder in (where, *where.parents):
        if (folder / MANIFEST).is_file() and (folder / "trainer_state.json").is_file():
            raise ConfigError(
                f"config key '{key}': {path} is inside the published checkpoint {folder}, which must not "
                "change (registered model versions point at it); choose a folder outside it."
            )


def plan_run(output_dir: str, resume_setting: bool | str, flow_run_id: str, **info: Any) -> RunPlan:
    """Decide the run folder and the checkpoint to start from (see the module docstring).

    An existing folder is not written to here: the caller records its flow run in run.json once it
    holds the folder's RunLock, so a run refused for a busy folder leaves nothing in it."""
    from sft_core.train.checkpoint import checkpoints_in_run, is_complete, latest_in_run, resolve_resume

    refuse_inside_a_checkpoint(output_dir)

    def newest_is(run: RunFolder, checkpoint: Path | None) -> bool:
        # Damaged checkpoints count: continuing from an older one would meet theirs on publication.
        found = checkpoints_in_run(run, complete_only=False)
        return (found[-1] if found else None) == (checkpoint.resolve() if checkpoint else None)

    own = find_run(output_dir, flow_run_id)
    if own is not None:
        latest = latest_in_run(own)
        if latest is None and (origin := own.info().get("branched_from")):
            # A branch that saved nothing yet (refused or stopped before its first checkpoint)
            # starts again from where it branched, not from the pretrained model.
            source = resolve_resume(origin, output_dir)
            return RunPlan(own, source, f"retry of flow run {flow_run_id}: no checkpoint of its own yet, starting again from {source}")  # fmt: skip
        if newest_is(own, latest):
            why = f"retry of flow run {flow_run_id}: " + (
                f"continuing from {latest.name}"
                if latest
                else "no checkpoint yet, starting over in the same run"
            )
            return RunPlan(own, latest, why)
        damaged = checkpoints_in_run(own, complete_only=False)[-1]
        run = new_run(output_dir, flow_run_id, branched_from=str(latest or ""), **info)
        return RunPlan(run, latest, (
            f"retry of flow run {flow_run_id}: {damaged} is damaged (files its manifest lists are missing "
            f"or changed) and left as it is; continuing from {latest or 'the pretrained model'} in new run {run.name}"
        ))  # fmt: skip
    resume = resolve_resume(resume_setting, output_dir)
    if resume is None and resume_setting == "auto" and (live := _live_runs(output_dir)):
        # `auto` means "continue the last run": one still training has no checkpoint yet.
        raise RunFolderBusy(
            f"resume_from_checkpoint=auto: run folder {live[0][0].root} is in use by another run "
            f"({live[0][1]}), which has no checkpoint yet. Wait for it to finish or stop it; a new run "
            "(resume_from_checkpoint: false) trains into a folder of its own."
        )
    if resume is not None:
        owner = run_of(resume)
        if owner.root.parent == runs_root(output_dir).resolve() and newest_is(owner, resume):
            return RunPlan(owner, resume.resolve(), f"resume_from_checkpoint: continuing run {owner.name}")
        # `auto` took the newest checkpoint, and its run has published another since: it is training.
        if resume_setting == "auto" and (holder := live_holder(owner)):
            raise RunFolderBusy(
                f"resume_from_checkpoint=auto: the newest checkpoint belongs to run folder {owner.root}, "
                f"which is in use by another run ({holder}). Wait for it to finish or stop it; a new run "
                "(resume_from_checkpoint: false) trains into a folder of its own."
            )
        found = checkpoints_in_run(owner, complete_only=False)
        after = found[found.index(resume) + 1 :] if resume in found else []
        broken = [c.name for c in after if not is_complete(c)] if resume_setting == "auto" else []
        run = new_run(output_dir, flow_run_id, branched_from=str(resume), **info)
        note = f" ({', '.join(broken)} after it: damaged, left as it is)" if broken else ""
        return RunPlan(
            run, resume, f"resume_from_checkpoint: new run {run.name} starting from {resume}{note}"
        )
    run = new_run(output_dir, flow_run_id, **info)
    return RunPlan(run, None, f"new run {run.name}")


class RunLock:
    """An exclusive lock on a run folder for as long as a process trains into it.

    flock is released by the kernel when the holder exits, killed or not, so a retry after a crash
    never finds a stale lock; a live holder is named in the error. A holder that exits cleanly
    empties the file: one still named there when the lock is taken died holding it (`crashed`), or
    left it named on purpose (`leave_named`), with the reason under "why".
    """

    def __init__(self, run: RunFolder, holder: dict[str, Any]):
        self.path = run.root / ".lock"
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(), "where": pid_namespace(),
                       "since": time.time(), **holder}  # fmt: skip
        self.crashed: dict[str, Any] | None = None
        self._fd: int | None = None
        self._left_named_because: str | None = None

    def leave_named(self, why: str) -> None:
        """On release, keep this holder named in the lock, as if it had died holding it: for a run
        whose end its orchestrator could not record (the next run in output_dir records it)."""
        self._left_named_because = why

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise RunFolderBusy(
                f"run folder {self.path.parent} is in use by another run ({_holder(held)}). Wait for it to "
                "finish or stop it; a new run (resume_from_checkpoint: false) trains into a folder of its own."
            ) from None
        with contextlib.suppress(ValueError):
            left = json.loads(os.pread(fd, 4096, 0) or b"null")
            self.crashed = left if isinstance(left, dict) else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            if self._left_named_because:
                record = {**self.holder, "why": self._left_named_because}
                os.pwrite(self._fd, json.dumps(record).encode(), 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _lock_table() -> str:
    try:
        return Path("/proc/locks").read_text()
    except OSError:  # no /proc: the lock itself decides later
        return ""


def live_holder(run: RunFolder, table: str | None = None) -> str | None:
    """Who holds `run`'s lock (a process training into it), in words, or None. Read from the
    kernel's table of locks (`table`: read once for many runs), never by taking the lock: a probe
    that took it for an instant would make a run starting in that folder at the same moment find
    it busy."""
    path = run.root / ".lock"
    try:
        st = path.stat()
    except OSError:  # never locked: no run trained into it yet
        return None
    table = _lock_table() if table is None else table
    # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF" ("->" lines are waiters, not holders). By
    # inode number: the device an overlay filesystem reports there may differ from stat's. A holder
    # writes its record once it has the lock and empties it when done.
    ino = f":{st.st_ino}"
    held = any(
        len(words) > 5 and words[1] == "FLOCK" and words[5].endswith(ino)
        for words in (line.split() for line in table.splitlines())
    )
    record = path.read_text(errors="replace").strip() if held else ""
    return _holder(record) if record else None


def _live_runs(output_dir: str | Path) -> list[tuple[RunFolder, str]]:
    """The run folders of output_dir a process is training into, newest first, with their holders."""
    table = _lock_table()
    found = [
        (RunFolder(f), live_holder(RunFolder(f), table)) for f in reversed(own_entries(runs_root(output_dir)))
    ]
    return [(run, holder) for run, holder in found if holder]


def _pin_path(checkpoint: Path) -> Path:
    # Beside the checkpoint, not in it: a published checkpoint's files never change.
    return run_of(checkpoint).root / f".pin-{checkpoint.name}"


def _lock_pin(path: Path, shared: bool) -> int | None:
    """An fd of the pin file at `path` (made if missing) holding its flock (shared: waits;
    exclusive: does not, None while a pin is held). A pin file unlinked while we waited for its lock is
    not the one at `path` any more: taken again from the path."""
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        os.close(fd)


def _unlink_pin(fd: int, path: Path) -> None:
    """Remove the pin file if no other run holds it (ours, shared, becomes exclusive or is dropped)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def pinned(checkpoint: Path) -> Iterator[None]:
    """Hold another run's `checkpoint`, which this run starts from, against that run's pruning
    (max_ckpt_to_keep) for as long as this run lives: a shared flock on a pin file beside it, which
    `claim_for_removal` must take exclusively. Waits out a removal under way, then says if it went."""
    path = _pin_path(checkpoint)
    try:
        fd = _lock_pin(path, shared=True)
    except OSError:  # a folder this user cannot write to: this user's runs cannot prune it either
        fd = None
    if fd is None:
        yield
        return
    from sft_core.train.checkpoint import is_complete

    try:
        if not is_complete(checkpoint):  # gone, or a removal that failed half-way
            raise UserError(
                f"{checkpoint} was removed by its own run's max_ckpt_to_keep as this run started from it; "
                "resume from another checkpoint of that run (resume_from_checkpoint: <path>)."
            )
        yield
    finally:
        _unlink_pin(fd, path)
        os.close(fd)


def hold_start(plan: RunPlan) -> contextlib.AbstractContextManager[None]:
    """For the run's life: the checkpoint it starts from pinned, when another run folder owns it
    (a checkpoint elsewhere, copied out of a run folder, has no run to prune it)."""
    if plan.resume is None:
        return contextlib.nullcontext()
    owner = run_of(plan.resume)
    in_a_run = plan.resume.parent == owner.checkpoints_root and owner.root.parent.name == RUNS
    if not in_a_run or owner.root == plan.run.root.resolve():
        return contextlib.nullcontext()
    return pinned(plan.resume)


@contextlib.contextmanager
def claim_for_removal(checkpoint: Path) -> Iterator[bool]:
    """An exclusive hold on `checkpoint`'s pin for removing it: False while another run starts from it
    (`pinned`), then it stays. The pin file goes with the checkpoint."""
    path = _pin_path(checkpoint)
    fd = _lock_pin(path, shared=False)  # a pin taken meanwhile waits for the removal, then fails
    if fd is None:  # held by a run starting from it
        yield False
        return
    try:
        yield True
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def died_holding(output_dir: str | Path, skip: Path) -> list[tuple[RunFolder, dict[str, Any]]]:
    """The run folders of output_dir (but `skip`) whose lock still names a process of this machine
    and pid namespace that is gone: it was killed holding the folder, since a clean exit empties
    the lock. Read without taking the lock, so a run starting in one of them is never refused for
    it. A holder elsewhere, or a pid now taken by another process, counts as alive."""
    here = pid_namespace()
    found = []
    for folder in own_entries(runs_root(output_dir)):
        lock = folder / ".lock"
        if folder.resolve() == skip.resolve() or not lock.is_file():
            continue
        try:
            holder = json.loads(lock.read_text() or "null")
        except (OSError, ValueError):
            continue
        if isinstance(holder, dict) and not _alive_here(holder, here):
            found.append((RunFolder(folder), holder))
    return found


def pid_namespace() -> str | None:
    """Where a pid names one process: this boot of this machine and this pid namespace (a container
    has its own, and may share the host's name). None where /proc does not tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _alive_here(holder: dict[str, Any], here: str | None) -> bool:
    """False only for a process known to be gone: recorded in this very pid namespace, and no such
    pid now. Another machine or container, a reboot since, or a lock without the record: alive."""
    pid, where = holder.get("pid"), holder.get("where")
    if where is None or where != here or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(record: str) -> str:
    """A lock's holder in words: its flow run, process and start, from the JSON it wrote."""
    try:
        held = json.loads(record)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(held["since"])))
        return f"flow run {held.get('flow_run_id', '?')}, pid {held['pid']} on {held['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return f"its lock file holds {record[:300]!r}"
