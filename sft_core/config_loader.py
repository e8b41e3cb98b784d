"""Compose a Hydra config (file + groups + command-line overrides) into a validated `SFTConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sft_core.config import SFTConfig, resolve_paths, validate_config
from sft_core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_DIR = REPO_ROOT / "conf"

# `${repo_root:}` in a config is this checkout's root, so shipped configs find shipped data from any cwd.
if not OmegaConf.has_resolver("repo_root"):
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))


def find_config_dir(config_path: str | None) -> Path:
    """Resolve `--config-path`: as given (absolute or from the cwd), then under examples/ as the seed does."""
    if config_path is None:
        return DEFAULT_CONFIG_DIR
    for candidate in (Path(config_path), REPO_ROOT / config_path, REPO_ROOT / "examples" / config_path):
        if candidate.is_dir():
            return candidate.resolve()
    raise ConfigError(
        f"config directory '{config_path}' does not exist (looked in the current directory and examples/)"
    )


def _with_shipped_groups(config_dir: Path, config_name: str, overrides: list[str]) -> list[str]:
    """A config folder of the user's also sees the shipped conf/ (its `experiment` group, and
    `sft_config` to extend in a defaults list), after the folders its own hydra.searchpath names."""
    if config_dir.resolve() == DEFAULT_CONFIG_DIR.resolve() or any(
        "hydra.searchpath" in o for o in overrides
    ):
        return overrides
    try:
        own = OmegaConf.select(OmegaConf.load(config_dir / f"{config_name}.yaml"), "hydra.searchpath") or []
    except (OSError, OmegaConfBaseException):
        own = []  # compose reports a missing or broken file itself
    paths = [*own, f"file://{DEFAULT_CONFIG_DIR}"]
    quoted = ", ".join("'" + str(p).replace("\\", "\\\\").replace("'", "\\'") + "'" for p in paths)
    return [*overrides, f"hydra.searchpath=[{quoted}]"]


def compose_dict(config_dir: Path, config_name: str, overrides: list[str]) -> dict[str, Any]:
    """Hydra compose without changing the working directory; returns a plain, resolved dict."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(
                config_name=config_name, overrides=_with_shipped_groups(config_dir, config_name, overrides)
            )
        raw = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        hint = ""
        if "Unknown function 'list'" in str(err):  # the seed's device_mapping form, unquoted in a shell
            hint = (
                "; on the command line quote the seed's form, 'sft_train.device_mapping=\"list(range(0,2))\"', "
                "or write the list: sft_train.device_mapping=[0,1]"
            )
        raise ConfigError(f"cannot compose config '{config_name}' from {config_dir}: {err}{hint}") from None
    finally:
        GlobalHydra.instance().clear()
    assert isinstance(raw, dict)
    return {str(k): v for k, v in raw.items()}  # str keys already (YAML mapping keys); typed as such


def load_config(
    config_name: str = "sft_config",
    overrides: list[str] | None = None,
    config_path: str | None = None,
    base_dir: Path | None = None,
) -> SFTConfig:
    """The one way a run gets its config: compose, validate strictly, make paths absolute."""
    config_dir = find_config_dir(config_path)
    raw = compose_dict(config_dir, config_name, overrides or [])
    cfg = validate_config(raw, source=f"config {config_dir / config_name}.yaml")
    return resolve_paths(cfg, base_dir or Path.cwd())
