"""Secrets in configs: which keys hold them, and keeping their values out of what is stored.

Values under `system_envs` and any key named like a token, key, secret, password or credential are
secrets. Trackers redact them (sft_core/tracking); the CLI moves a secret given on its command line
into the process environment and hands the flow a `${oc.env:NAME}` reference instead, so the value
never reaches the Prefect database as a flow-run parameter.
"""

from __future__ import annotations

import re
from typing import Any

_SECRET_NAME = re.compile(r"token|secret|passw|api[_-]?key|access[_-]?key|private[_-]?key|credential", re.I)
_OVERRIDE = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<key>[\w.\-]+)=(?P<value>.*)$", re.S)


def is_secret_key(dotted_key: str) -> bool:
    """A value under system_envs, or a key named like a secret.

    >>> [is_secret_key(k) for k in ("system_envs.FOO", "tracker_kwargs.api_key", "HF_TOKEN", "seed")]
    [True, True, True, False]
    """
    return dotted_key.startswith("system_envs.") or bool(_SECRET_NAME.search(dotted_key.rsplit(".", 1)[-1]))


def literal_secret_overrides(overrides: list[str]) -> list[str]:
    """The keys of overrides that set a secret to a literal value (not a `${...}` reference)."""
    found = []
    for item in overrides:
        m = _OVERRIDE.match(item)
        if m and is_secret_key(m["key"]) and m["value"] and not m["value"].startswith("${"):
            found.append(m["key"])
    return found


def move_secrets_to_env(overrides: list[str], environ: dict[str, str]) -> list[str]:
    """Replace each literal secret in `overrides` by an `${oc.env:NAME}` reference, setting NAME in
    `environ` (the name itself for system_envs.NAME, else SFT_SECRET_<KEY>).

    >>> env = {}
    >>> move_secrets_to_env(["seed=1", "+system_envs.HF_TOKEN=hf_x"], env), env
    (['seed=1', '+system_envs.HF_TOKEN=${oc.env:HF_TOKEN}'], {'HF_TOKEN': 'hf_x'})
    """
    out = []
    for item in overrides:
        m = _OVERRIDE.match(item)
        if m and m["key"] in literal_secret_overrides([item]):
            key = m["key"]
            name = key.removeprefix("system_envs.") if key.startswith("system_envs.") else ""
            name = name or "SFT_SECRET_" + re.sub(r"\W", "_", key).upper()
            environ[name] = m["value"].strip("'\"")
            item = f"{m['prefix']}{key}=${{oc.env:{name}}}"
        out.append(item)
    return out


REDACTED = "***"


def redact(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A copy of a (nested) config with every secret's value replaced.

    >>> redact({"system_envs": {"HF_TOKEN": "hf_x"}, "seed": 1, "tracker_kwargs": {"api_key": "k"}})
    {'system_envs': {'HF_TOKEN': '***'}, 'seed': 1, 'tracker_kwargs': {'api_key': '***'}}
    """
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out[k] = redact(v, key + ".")
        elif is_secret_key(key) and v not in (None, ""):
            out[k] = REDACTED
        else:
            out[k] = v
    return out
