#!/usr/bin/env bash
# megatron_train vs ddp_train on one lent GPU (bench/gpu_megatron_vs_ddp.py), from the repo root:
#
#     bash bench/gpu_check.sh                  # device run, carrying .whl; extra args go to the script
#
# The GPU machine has Python 3.12, torch and transformers, but none of the project's other packages
# and no network. The check imports only these besides (measured: sys.modules of both strategy
# runs), fetched once here into the git-ignored .whl/ (5.4 MiB),
# pinned to .venv's versions. typing-extensions and packaging shadow the machine's own copies:
# pydantic needs typing-extensions>=4.16, megatron-core packaging>=24.2.
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#         typing-extensions==4.16.0 packaging==26.4 megatron-core==0.16.1
#
# With $OUT set (the device tool's output folder) the log goes to $OUT/gpu_check.log and the JSON
# result beside it. WHEELS=dir and PYTHON=interpreter override the defaults (for trying it on CPU:
# `WHEELS=none PYTHON=.venv/bin/python bash bench/gpu_check.sh --tiny`).
set -euo pipefail

PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
RESULT=bench/results/megatron-vs-ddp-gpu-check.json
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
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -f "$RESULT"

status=0
{
    nvidia-smi || true
    # Versions and locations of everything the check imports; stop here if one is missing.
    "$PY" - "$@" <<'EOF'
import importlib, sys

print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "numpy", "safetensors", "setuptools", "packaging",
             "typing_extensions", "pydantic", "pydantic_core", "megatron.core", "sft_core"):
    module = importlib.import_module(name)
    print(f"  {name:18} {getattr(module, '__version__', '-'):14} {module.__file__}")
import torch

if torch.cuda.is_available():
    print("cuda", torch.version.cuda, torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
elif "--tiny" not in sys.argv[1:]:
    sys.exit("no CUDA device: the full-size check is for a GPU (add --tiny to try it on CPU)")
EOF
    time "$PY" bench/gpu_megatron_vs_ddp.py --out "$RESULT" "$@"
} 2>&1 | tee "$LOG" || status=$?

if [ -n "${OUT:-}" ] && [ -f "$RESULT" ]; then cp "$RESULT" "$OUT/"; fi
exit "$status"
