"""Where the project keeps what it recreates (git-ignored): converted models, encoded data,
tokenizers, the local Prefect home, the measured CPU peak, an empty migrated MLflow database.
One root, owned here."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from sft_core.errors import ConfigError


def sft_home() -> Path:
    """$SFT_HOME or <repo>/.sft."""
    return Path(os.environ.get("SFT_HOME") or Path(__file__).resolve().parents[1] / ".sft")


def staged(path: Path) -> Path:
    """A name beside `path` to write it whole under before renaming it there, of this write's own
    (suffix kept: numpy appends .npz otherwise): two runs filling one cache entry at once never
    write into one file, and each rename puts a whole file in place."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{os.urandom(4).hex()}{path.suffix}")


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


def private_tmp() -> Path:
    """A folder of this machine's temp dir ($RAY_TMPDIR, else $TMPDIR or /tmp) that this user alone
    can enter (0700): the local Ray's session folders and the process group's rendezvous files,
    which must be on local disk."""
    path = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / f"sft-{os.getuid()}"
    with contextlib.suppress(FileExistsError):  # a file, or a link to nowhere: refused below
        path.mkdir(mode=0o700, exist_ok=True)
    found = path.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise ConfigError(
            f"{path} (this user's private temp folder: the local Ray's session, rendezvous files) is not "
            f"a folder, is a link, another user's, or open to others (mode {stat.filemode(found.st_mode)}): remove it, "
            "or set TMPDIR to a folder of your own"
        )
    return path
