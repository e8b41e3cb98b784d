"""Where the project keeps what it recreates (git-ignored): converted models, encoded data,
tokenizers, the local Prefect home, the measured CPU peak, an empty migrated MLflow database.
One root, owned here."""

from __future__ import annotations

import os
from pathlib import Path


def sft_home() -> Path:
    """$SFT_HOME or <repo>/.sft."""
    return Path(os.environ.get("SFT_HOME") or Path(__file__).resolve().parents[1] / ".sft")


def model_cache() -> Path:
    """Converted models: $SFT_MODEL_CACHE or <sft_home>/models (tests share one across runs)."""
    return Path(os.environ.get("SFT_MODEL_CACHE") or sft_home() / "models")


def data_cache(key: str) -> Path:
    """One encoded split and its packing plans, by encode cache key."""
    return sft_home() / "data" / key


def tokenizers() -> Path:
    return sft_home() / "tokenizers"


def mlflow_templates() -> Path:
    """Empty migrated MLflow databases, one per MLflow version (tracking/mlflow_store.py)."""
    return sft_home() / "mlflow"


def inductor_cache() -> Path:
    """torch.compile's kernel cache. Inductor's default, /tmp/torchinductor_<user>, is a name any user
    of the machine can create first and fill with compiled code that this user's workers would load."""
    path = sft_home() / "inductor"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
