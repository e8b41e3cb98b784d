"""KEEP_FREED_MEMORY_ENV: large blocks are reused from the heap instead of being faulted in afresh,
in a thread other than the main one too (Ray runs actor methods in one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sft_core.train.host_memory import KEEP_FREED_MEMORY_ENV

# In a second thread, as a Ray actor's method runs: a 256 MiB block allocated, written and freed 30
# times, as a step's activations are; the minor page faults and resident memory of the last 5.
_PROBE = textwrap.dedent(
    """
    import json, resource, threading
    import torch
    from sft_core.train.host_memory import keeps_freed_memory
    faults, rss = [], []
    def rounds():
        for _ in range(30):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = torch.ones(64 * 2**20)  # every page written
            del block
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            rss.append(int(open("/proc/self/statm").read().split()[1]))
    worker = threading.Thread(target=rounds)
    worker.start()
    worker.join()
    print(json.dumps({"applied": keeps_freed_memory(), "faults": faults[-5:], "rss_pages": rss[-5:]}))
    """
)


def _probe(env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, env={**os.environ, **env}
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    pages = 256 * 2**20 // 4096
    default, kept = _probe({}), _probe(KEEP_FREED_MEMORY_ENV)
    # glibc's default maps every round's block afresh: each page faults again.
    assert not default["applied"]
    assert min(default["faults"]) > 0.9 * pages, default
    # Kept: once the heap has grown to the pattern (torch's 64-byte aligned blocks leave holes that
    # take glibc a few rounds to join), the block comes back already paged in, and the heap stops
    # growing.
    assert kept["applied"]
    assert max(kept["faults"]) < 0.01 * pages, kept
    assert len(set(kept["rss_pages"])) == 1, kept
