#!/usr/bin/env bash
# ddp_train, fsdp2_train and megatron_train beside TRL's SFTTrainer on one lent GPU (bench/gpu_check.py), from the
# repo root:
#
#     bash bench/gpu_check.sh                  # device run, carrying .whl; extra args go to the script
#
# The GPU machine has Python 3.12, torch, transformers, accelerate, pandas, pyarrow, fsspec, xxhash and
# huggingface-hub, but none of the project's other packages and no network. The check imports only
# these besides (measured: the non-stdlib modules in sys.modules of each contender's process, against
# the machine's package list), fetched once here into the git-ignored .whl/ (7.1 MiB: 5.3 for ours,
# 1.7 for TRL), pinned to .venv's versions and to the TRL that bench/compare_trl.py uses:
#   ours  pydantic, pydantic-core, annotated-types, typing-inspection; typing-extensions and packaging
#         shadow the machine's own copies (pydantic needs typing-extensions>=4.16, megatron-core
#         packaging>=24.2); megatron-core
#   trl   trl; datasets (imported by trl), with dill and multiprocess (imported by datasets). The rest of
#         what they import is on the machine; pytz, which pandas looks for, is optional.
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#         typing-extensions==4.16.0 packaging==26.4 megatron-core==0.16.1 \
#         trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#
# datasets 5.2.0 asks for pyarrow>=24 and fsspec<=2026.9.0, which the machine's copies may not meet (the
# versions are printed first); the check only builds an in-memory Dataset and reads rows from it. If TRL
# cannot run there, ddp and megatron still run and the script exits non-zero with trl under "failed".
#
# With $OUT set (the device tool's output folder) the log goes to $OUT/gpu_check.log and the JSON
# result beside it. WHEELS=dir and PYTHON=interpreter override the defaults (on CPU, with a Python that
# has trl, e.g. the venv bench/compare_trl.py makes:
# `WHEELS=none PYTHON=.sft/bench-trl-venv/bin/python bash bench/gpu_check.sh --tiny`).
set -euo pipefail

PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
LOG=/dev/null
[ -n "${OUT:-}" ] && LOG=$OUT/gpu_check.log
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    else  # no pip: a wheel is a zip laid out for site-packages
        for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" /tmp/site; done
    fi
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAMP=$(mktemp)

status=0
{
    nvidia-smi || true
    # Versions and locations of everything the check imports: stop here if one of ours is missing;
    # a missing TRL package only costs the trl contender.
    "$PY" - "$@" <<'EOF'
import importlib, sys

print("python", sys.version.split()[0], sys.executable)
ours = ("torch", "transformers", "numpy", "safetensors", "setuptools", "packaging",
        "typing_extensions", "pydantic", "pydantic_core", "megatron.core", "sft_core")
trl = ("trl", "datasets", "dill", "multiprocess", "accelerate", "pyarrow", "pandas", "fsspec",
       "xxhash", "huggingface_hub", "tokenizers")
for name in ours + trl:
    try:
        module = importlib.import_module(name)
    except Exception as e:
        if name in ours:
            raise
        print(f"  {name:18} MISSING: {type(e).__name__}: {e}")
        continue
    print(f"  {name:18} {getattr(module, '__version__', '-'):14} {module.__file__}")
import torch

if torch.cuda.is_available():
    print("cuda", torch.version.cuda, torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
elif "--tiny" not in sys.argv[1:]:
    sys.exit("no CUDA device: the full-size check is for a GPU (add --tiny to try it on CPU)")
EOF
    time "$PY" bench/gpu_check.py "$@"
} 2>&1 | tee "$LOG" || status=$?

# The result the script just wrote (its default name: bench/results/gpu-check-<preset>-<gpu|cpu-smoke>.json).
if [ -n "${OUT:-}" ]; then
    find bench/results -name 'gpu-check-*.json' -newer "$STAMP" -exec cp {} "$OUT/" \;
fi
rm -f "$STAMP"
exit "$status"
