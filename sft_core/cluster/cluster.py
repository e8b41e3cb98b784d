"""Cluster: one Ray actor per device_mapping entry, driven in lockstep.

The Ray runtime must already be up: locally the Prefect flow's RayTaskRunner starts it; to run on
several machines start Ray there (`ray start --head` on one, `ray start --address=HEAD:6379` on the
others) and set `ray_address` (or RAY_ADDRESS): the workers are then spread by Ray and rank 0's node
address is the torch.distributed master.

Every call on the workers is bounded by `sft_train.worker_timeout_s`: a worker that dies fails the
call at once, one that stops responding (frozen, deadlocked, stuck in a collective) fails it when the
time is up, with the rank and the step in the message. Either is a `WorkerFailure`, which the flow may
answer by restarting the cluster from the run's newest checkpoint (`sft_train.max_restarts`).

`shutdown` returns within `_SHUTDOWN_S` whatever state Ray is in, with this machine's actor
processes gone. A cancelled deployment run needs both: the worker sends SIGTERM to the flow run's
whole process group, which holds Ray's GCS and raylet, so these are going away while the flow's
`finally` blocks run (Ray's own calls would then wait forever), while each actor sits in a process
group of its own, which that signal never reaches: an actor ends itself only once its raylet is
gone for good, and a raylet that exited stays a zombie for as long as the flow process lives.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray._private.accelerators  # noqa: F401 - Ray's option validation uses it without importing it
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sft_core.cluster.actor import SFTWorkerActor
from sft_core.config import SFTConfig
from sft_core.errors import ConfigError, user_error_in
from sft_core.home import private_tmp
from sft_core.secrets import is_secret_env
from sft_core.train.artifacts import TrainArtifacts
from sft_core.train.host_memory import KEEP_FREED_MEMORY_ENV

# No Ray call here may start a Ray of its own: Ray's auto-init is a bare ray.init(), which listens on
# every interface and starts a dashboard. Every Ray this project uses is started or joined explicitly,
# on loopback unless configured (flows/ray_runner.py); a call before that now fails instead.
ray._private.auto_init_hook.enable_auto_connect = False

# Passed to each actor so it sees the same Prefect server, caches and thread settings as the driver.
_FORWARDED_ENV = (
    "SFT_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "SFT_PEAK_FLOPS",
    "TOKENIZERS_PARALLELISM",
)
# sft_train.placement -> Ray's placement strategy: pack fills a node before the next (collectives stay
# on one machine), spread puts each worker on another node where it can.
_PLACEMENT = {"pack": "PACK", "spread": "SPREAD"}
# Ray starts its workers at nice 15, below its own and Prefect's processes: on a CPU each wake-up of
# those then preempts a training thread, and the step's other threads wait for it at the next
# barrier. The training actors are the job: at the default priority, as Ray's own job supervisor
# runs (system_envs can set it back).
_ACTOR_ENV = {"RAY_worker_niceness": "0"}
# How long a worker that is busy in a call has to answer a ping before it counts as not responding.
_PING_S = 5.0
# How long `shutdown` waits for Ray to kill the actors and free their placement group, and for the
# actor processes on this machine to exit before it kills them itself.
_SHUTDOWN_S = 10.0
# How long an actor process may take to exit once Ray has sent its kill. One still starting (its
# imports) is not reached by the kill until its start is done, seconds later: it is killed here.
_EXIT_AFTER_KILL_S = 2.0
# In each actor's environment, this cluster's id: `shutdown` finds the actor processes on this
# machine by it, also once Ray cannot tell where they are.
_CLUSTER_ENV = "SFT_CLUSTER_ID"

logger = logging.getLogger(__name__)


class WorkerFailure(RuntimeError):
    """A worker died or stopped responding; the run can continue from its newest checkpoint."""


@contextlib.contextmanager
def stops_raised_as_themselves() -> Iterator[None]:
    """A stop raised by a signal handler while Ray's C code waits (a cancel's TerminationSignal,
    Ctrl-C's KeyboardInterrupt) leaves it as a SystemError ("returned a result with an exception
    set"), which a task reports as its failure, with a traceback: it is raised as what it is."""
    try:
        yield
    except SystemError as err:
        stop = err.__cause__ or err.__context__
        if stop is not None and not isinstance(stop, Exception):
            raise stop from None
        raise


class Cluster:
    """Started in two parts, so that the actors' process start and imports can overlap the driver's
    data work: `Cluster(cfg)` places and starts the actors and returns at once; `start(artifacts)`
    waits for them, hands them the run's files and joins them into one process group."""

    def __init__(self, cfg: SFTConfig):
        if not ray.is_initialized():
            raise RuntimeError("Cluster needs a running Ray runtime (the flow's RayTaskRunner starts one)")
        self.name = cfg.sft_train.name
        self.world_size = cfg.sft_train.world_size
        self.timeout_s = cfg.sft_train.worker_timeout_s
        self.id = uuid.uuid4().hex
        self.workers: list[Any] = []
        self.store: Path | None = None  # the process group's rendezvous file (a local run), until shutdown
        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ} | _ACTOR_ENV
        if cfg.sft_train.keep_host_memory:
            env.update(KEEP_FREED_MEMORY_ENV)
        # Secret-named variables (HF_TOKEN, WANDB_API_KEY) stay out of the runtime_env, which Ray
        # writes in plain text to its logs and actor table: the worker sets them from its config.
        env.update({k: v for k, v in cfg.system_envs.items() if not is_secret_env(k)})
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env[_CLUSTER_ENV] = self.id
        # One bundle per device_mapping entry; rank r runs in bundle r. CPU workers claim only a
        # sliver of a CPU slot, so that a cluster of any world size fits a machine of few cores.
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 0.01}
        self.placement = placement_group(
            [bundle] * self.world_size, strategy=_PLACEMENT[cfg.sft_train.placement]
        )
        with stops_raised_as_themselves():
            placed = self.placement.wait(timeout_seconds=self.timeout_s)
        if not placed:
            self.shutdown()
            raise WorkerFailure(
                f"cannot place {self.world_size} workers ({bundle} each, sft_train.placement="
                f"{cfg.sft_train.placement}) on this Ray cluster ({ray.available_resources()} available) "
                f"within {self.timeout_s:g}s"
            )
        # `ping` runs in its own thread (concurrency group), so a worker busy in a long call still
        # answers it; every other method runs in the default group's one thread, in order.
        actor_cls = ray.remote(concurrency_groups={"health": 1})(SFTWorkerActor)  # type: ignore[call-overload]  # stubs lack it
        cfg_dict = cfg.model_dump()
        try:
            self.workers = [
                actor_cls.options(
                    runtime_env={"env_vars": env},
                    num_gpus=bundle.get("GPU", 0),
                    num_cpus=bundle["CPU"],
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, rank),
                ).remote(cfg_dict, rank, self.world_size)
                for rank in range(self.world_size)
            ]
        except BaseException:
            self.shutdown()
            raise

    def start(self, artifacts: TrainArtifacts) -> None:
        """Wait for the actors, give them the run's files, and join them into a process group."""
        try:
            self._start(artifacts)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, artifacts: TrainArtifacts) -> None:
        self.nodes = self._wait([w.node.remote() for w in self.workers], "node", "start-up")
        # Every worker must see the data and the run folder the driver wrote (multi-node: shared
        # storage); a node that cannot is named before any work starts.
        self._wait([w.use_artifacts.remote(artifacts) for w in self.workers], "use_artifacts", "start-up")
        probe_dir = artifacts.shared_dir
        if probe_dir:
            missing = [
                r for r in range(self.world_size) if not (Path(probe_dir) / f".probe-rank{r}").is_file()
            ]
            for r in range(self.world_size):
                (Path(probe_dir) / f".probe-rank{r}").unlink(missing_ok=True)
            if missing:
                raise ConfigError(
                    f"rank(s) {missing} on node(s) {[self.nodes[r]['ip'] for r in missing]} wrote a probe file "
                    f"into {probe_dir} that the driver cannot see: the output_dir must be on storage every node shares"
                )
        addr, port = self._wait([self.workers[0].address.remote()], "address", "start-up")[0]
        self.master = (addr, port)
        # All on loopback (a local run): rendezvous through a file, so nothing listens on the network.
        if all(ipaddress.ip_address(n["ip"]).is_loopback for n in self.nodes):
            self.store = private_tmp() / f"store-{uuid.uuid4().hex}"
        store = str(self.store) if self.store else None
        self._wait(
            [w.setup_distributed.remote(addr, port, store) for w in self.workers],
            "setup_distributed",
            "start-up",
        )

    def execute_all(self, method: str, *args: Any, label: str | None = None) -> list[Any]:
        """Call `method` on every worker at once and wait for all results (rank order).

        Fails as soon as any worker fails or dies: the others may be blocked in a collective with it
        and would otherwise hold the run until the process-group timeout. `label` names the step in
        error messages (default: the arguments).
        """
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        return self._wait(refs, method, label or ", ".join(map(str, args)) or "no arguments")

    def _wait(self, refs: list[Any], method: str, label: str) -> list[Any]:
        with stops_raised_as_themselves():
            return self._wait_for(refs, method, label)

    def _wait_for(self, refs: list[Any], method: str, label: str) -> list[Any]:
        deadline = time.monotonic() + self.timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise self._timeout(refs, pending, method, label)
            try:
                ray.get(ready)
            except RayActorError as err:
                raise WorkerFailure(
                    f"rank {refs.index(ready[0])} died during {method} ({label}): {err}"
                ) from err
            except RayTaskError as err:
                # A peer's death often reaches the survivors first, as a broken collective.
                dead = self._dead_ranks(refs)
                if dead and user_error_in(err) is None:
                    raise WorkerFailure(
                        f"rank(s) {dead} died during {method} ({label}); "
                        f"rank {refs.index(ready[0])} failed with it"
                    ) from err
                raise
        return ray.get(refs)

    def _dead_ranks(self, refs: list[Any]) -> list[int]:
        dead = []
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=_PING_S)
            except RayActorError:
                dead.append(rank)
            except (RayTaskError, GetTimeoutError):
                pass
        return dead

    def _timeout(self, refs: list[Any], pending: list[Any], method: str, label: str) -> WorkerFailure:
        waiting = [refs.index(p) for p in pending]
        frozen = self._unresponsive(waiting)
        stuck = f"rank(s) {frozen} stopped responding" if frozen else f"rank(s) {waiting} did not finish"
        others = sorted(set(waiting) - set(frozen)) if frozen else []
        return WorkerFailure(
            f"{stuck} during {method} ({label}): no result within sft_train.worker_timeout_s="
            f"{self.timeout_s:g}s" + (f"; rank(s) {others} were waiting on them" if others else "")
        )

    def _unresponsive(self, ranks: list[int]) -> list[int]:
        """Ranks whose process does not answer a ping (a frozen or dead process, not a busy one)."""
        pings = {r: self.workers[r].ping.remote() for r in ranks}
        ray.wait(list(pings.values()), num_returns=len(pings), timeout=_PING_S)
        silent = []
        for r, ref in pings.items():
            try:
                ray.get(ref, timeout=0.1)
            except Exception:
                silent.append(r)
        return silent

    def shutdown(self, wait: bool = True) -> None:
        """Kill the actors: their process exit releases the process group, even mid-collective.

        Returns within _SHUTDOWN_S, with the actor processes on this machine gone: those that Ray
        did not end by then (its GCS or raylet stopped) are killed here. Actors on other machines
        are left to Ray. `wait=False`, for a process being stopped (a cancel, Ctrl-C): this
        machine's actors are killed at once and Ray's release is not waited for: what the run must
        still do (its MLflow run, its run folder's lock) comes after this."""
        released = threading.Event()

        def release() -> None:
            try:
                for w in self.workers:
                    ray.kill(w)
                remove_placement_group(self.placement)
            except Exception as err:  # Ray going away: the processes are seen to below
                logger.warning("cluster %r: Ray could not release the workers (%s)", self.name, err)
            finally:
                released.set()

        # A thread: Ray's calls wait on its GCS without a time limit.
        threading.Thread(target=release, name="cluster-shutdown", daemon=True).start()
        if not wait:
            for pid in _processes_of(self.id):
                _kill(pid)
            self._remove_store()
            return
        deadline = time.monotonic() + _SHUTDOWN_S
        released.wait(_SHUTDOWN_S / 2)
        if released.is_set():  # Ray has acted on the kills: what it reached exits within ~0.1 s
            deadline = min(deadline, time.monotonic() + _EXIT_AFTER_KILL_S)
        left = _processes_of(self.id)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = _processes_of(self.id)
        for pid in left:
            _kill(pid)
        if not released.is_set():
            logger.warning(
                "cluster %r: Ray did not release the workers within %gs; killed %d worker process(es) "
                "on this machine (pids %s)", self.name, _SHUTDOWN_S, len(left), left,
            )  # fmt: skip
        elif left:  # a worker still starting (a run that failed early): Ray's kill waits for its start
            logger.info(
                "cluster %r: killed %d worker process(es) still starting (pids %s)",
                self.name,
                len(left),
                left,
            )
        self._remove_store()

    def _remove_store(self) -> None:
        """The process group's rendezvous file, once its workers are gone (a SIGKILLed driver
        leaves it, in the user's private temp folder)."""
        if self.store:
            self.store.unlink(missing_ok=True)


def _processes_of(cluster_id: str) -> list[int]:
    """The live processes on this machine started for cluster `cluster_id` (its id is in their
    environment; Linux's /proc: elsewhere none are found)."""
    mark = f"{_CLUSTER_ENV}={cluster_id}".encode()
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:  # empty for a process that has exited
                if mark in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            continue
    return found


def _kill(pid: int) -> None:
    """SIGKILL to an actor process, with its process group where it leads one (Ray starts each
    worker in a group of its own; what the worker started goes with it)."""
    with contextlib.suppress(OSError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
