"""The seed's entry point, kept for configs and scripts written for it.

    python examples/start_sft_pipeline.py --config_path smollm2-135M-sft_ddp --config_name sft_config [key=value ...]

`--config_path` is a directory: as given, relative to the repo, or relative to examples/. It runs
exactly what `sft run --config-path DIR --config-name NAME [overrides]` runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.cli import main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config_path", "--config-path", default=None)
    parser.add_argument("--config_name", "--config-name", default="sft_config")
    args, overrides = parser.parse_known_args()
    argv = ["run", "--config-name", args.config_name, *overrides]
    if args.config_path:
        argv[1:1] = ["--config-path", args.config_path]
    sys.exit(main(argv))
