#!/usr/bin/env bash
# Run this example with the seed's entry point; extra arguments are Hydra overrides:
#   bash examples/smollm2-135M-sft_megatron/run_sft_pipeline.sh sft_train.training_args.max_steps=2
set -euo pipefail
CONFIG_PATH=$(basename "$(dirname "$0")")
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
exec "$PYTHON" "$REPO/examples/start_sft_pipeline.py" --config_path "$CONFIG_PATH" --config_name sft_config "$@"
