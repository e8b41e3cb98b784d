"""Encode and pack datasets; both cached on their real inputs (a rerun shows them Cached)."""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from sft_core.data.encode import EncodeStats, Progress, encode_to_dir
from sft_core.data.packing import plan_rows
from sft_core.data.sources import count_rows
from sft_core.data.spec import EncodeSpec
from sft_core.data.splits import EncodedSplit, PackedSplit
from sft_core.data.store import EncodedData
from sft_core.home import data_cache, staged
from sft_core.model.prepared_tokenizer import PreparedTokenizer
from sft_core.model.resolve import load_tokenizer
from sft_core.progress import bar, eta
from tasks.caching import code_digest, digest, file_digest


def encode_key(files: list[str], tokenizer: PreparedTokenizer, spec: EncodeSpec) -> str:
    return digest(
        "encode", [file_digest(f) for f in files], tokenizer.fingerprint, spec.as_dict(), code_digest()
    )


# The key is computed before the task runs and names the cache record; the flow re-runs a task
# with refresh_cache=True if a cached result points at files that were deleted since.
def _encode_cache_key(context: TaskRunContext, params: dict[str, Any]) -> str:
    return encode_key(params["files"], params["tokenizer"], params["spec"])


@task(
    name="encode-dataset", cache_key_fn=_encode_cache_key, persist_result=True, task_run_name="encode-{split}"
)
def encode_dataset(
    files: list[str], tokenizer: PreparedTokenizer, spec: EncodeSpec, split: str, workers: int = 1
) -> EncodedSplit:
    """Rows -> chat template -> ids + labels (answer only), stored with the length and rejects reports."""
    key = encode_key(files, tokenizer, spec)
    out = data_cache(key)
    tok = load_tokenizer(tokenizer.tokenizer_dir)
    # workers is not in the cache key: the result does not depend on it.
    stats = encode_to_dir(files, tok, spec, out, workers, _progress_logger(files))
    get_run_logger().info(
        "%d rows read -> %d samples (%d bad rows skipped, %d too long dropped, %d truncated)",
        stats.rows, stats.samples, stats.rejected, stats.dropped, stats.truncated,
    )  # fmt: skip
    unread = stats.unread_summary(spec.fields)
    return EncodedSplit(
        unread=unread[0] if unread else "",
        unread_suspect=bool(unread and unread[1]),
        split=split,
        key=key,
        path=str(out / "encoded.npz"),
        rows_read=stats.rows,
        samples=stats.samples,
        tokens=stats.tokens,
        supervised_tokens=stats.supervised_tokens,
        truncated=stats.truncated,
        dropped=stats.dropped,
        rejected=stats.rejected,
        report=str(out / "length_report.jsonl"),
        rejects=str(out / "rejects.jsonl"),
    )


def _progress_logger(files: list[str], every_s: float = 10.0) -> Progress:
    """Log rows read (with a bar where the total is cheap to know) at most every `every_s`."""
    counts = [count_rows(f) for f in files]
    total = None if None in counts else sum(c or 0 for c in counts)
    began = last = time.monotonic()

    def log(stats: EncodeStats) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < every_s:
            return
        last = now
        rate = stats.rows / (now - began)
        if total:
            get_run_logger().info("%s %d/%d rows, %.0f rows/s, ETA %s", bar(stats.rows, total), stats.rows,
                                  total, rate, eta((total - stats.rows) / rate))  # fmt: skip
        else:
            get_run_logger().info("%d rows read, %.0f rows/s", stats.rows, rate)

    return log


def pack_key(encoded: EncodedSplit, sequence_length: int, packing: bool) -> str:
    return digest("pack", encoded.key, sequence_length, packing, code_digest())


def _pack_cache_key(context: TaskRunContext, params: dict[str, Any]) -> str:
    return pack_key(params["encoded"], params["sequence_length"], params["packing"])


@task(
    name="pack-dataset",
    cache_key_fn=_pack_cache_key,
    persist_result=True,
    task_run_name="pack-{encoded.split}",
)
def pack_dataset(encoded: EncodedSplit, sequence_length: int, packing: bool) -> PackedSplit:
    """Best-fit-decreasing packing into sequence_length (or one sample per row when packing is off)."""
    key = pack_key(encoded, sequence_length, packing)
    data = EncodedData.load(encoded.path)
    plan = plan_rows(data, sequence_length, packing)
    path = data_cache(encoded.key) / f"plan-{key}.json"
    tmp = staged(path)
    tmp.write_text(json.dumps(plan.to_dict()))
    tmp.replace(path)
    return PackedSplit(
        split=encoded.split,
        path=str(path),
        rows=len(plan.rows),
        samples=len(data),
        padding_fraction=plan.padding_fraction(data),
    )
