"""Secrets in configs: which keys hold them, and keeping their values out of what is stored.

Values under `system_envs` and any key named like a token, key, secret, password or credential are
secrets (a key naming a vocabulary token, `truncate_keep_end_token`, `eos_token`, is not). Trackers redact them (sft_core/tracking); the CLI moves a secret given on its command line
into the process environment and hands the flow a `${oc.env:NAME}` reference instead, so the value
never reaches the Prefect database as a flow-run parameter.
"""

from __future__ import annotations

import re
from typing import Any

from sft_core.errors import ConfigError

_SECRET_NAME = re.compile(
    r"secret|passw|api[_-]?key|access[_-]?key|private[_-]?key|credential|authori[sz]ation|connection[_-]?string"
    r"|^(key|auth)$",
    re.I,
)
# An environment variable's name says more: OPENAI_KEY, GITHUB_PAT, SENTRY_DSN, DATABASE_URL (a config
# key ending in _key names a data field: prompt_key).
_SECRET_ENV = re.compile(r"(^|_)(key|pat|dsn)$|database_url", re.I)
# "token" only at the end (HF_TOKEN, accessToken; not max_tokens, tokenizer_dir), and not a vocabulary
# token: truncate_keep_end_token or eos_token hold a policy or a token string, not a credential.
_TOKEN_NAME = re.compile(r"token$", re.I)
_VOCABULARY_TOKEN = re.compile(
    r"(^|[_-])(eos|bos|pad|unk|sep|cls|mask|end|start|stop|special)[_-]?token$", re.I
)
_ENV_REFERENCE = re.compile(r"^\$\{oc\.env:[A-Za-z_]\w*\}$")
_OVERRIDE = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<key>[\w.\-]+)=(?P<value>.*)$", re.S)


def is_secret_key(dotted_key: str) -> bool:
    """A value under system_envs, or a key named like a secret.

    >>> [is_secret_key(k) for k in ("system_envs.FOO", "tracker_kwargs.api_key", "HF_TOKEN", "seed")]
    [True, True, True, False]
    >>> [is_secret_key(k) for k in ("data_args.truncate_keep_end_token", "max_tokens", "auth_token")]
    [False, False, True]
    >>> [is_secret_key(k) for k in ("tracker_kwargs.key", "headers.Authorization", "prompt_key")]
    [True, True, False]
    """
    name = dotted_key.rsplit(".", 1)[-1]
    token = bool(_TOKEN_NAME.search(name)) and not _VOCABULARY_TOKEN.search(name)
    return dotted_key.startswith("system_envs.") or token or bool(_SECRET_NAME.search(name))


def is_secret_env(name: str) -> bool:
    """An environment variable (of system_envs) that holds a credential: set in a worker by the worker
    itself, never passed in Ray's runtime_env, which Ray keeps in its logs and actor table.

    >>> [is_secret_env(n) for n in ("HF_TOKEN", "OPENAI_KEY", "GITHUB_PAT", "DATABASE_URL", "OMP_NUM_THREADS")]
    [True, True, True, True, False]
    """
    return is_secret_key(name) or bool(_SECRET_ENV.search(name))


def _is_literal(value: Any) -> bool:
    """A value other than a bare environment reference: `${oc.env:NAME,default}` (or any other
    interpolation) holds its text, default included, in what is stored."""
    return value not in (None, "") and not (
        isinstance(value, str) and _ENV_REFERENCE.match(value.strip("'\""))
    )


def _dict_value(item: str) -> dict[str, Any] | None:
    """The value of a dict-form override (`+system_envs={HF_TOKEN:x}`) as Hydra parses it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        value = OverridesParser.create().parse_override(item).value()
    except HydraException:
        return None  # not ours to report: composing the config names the bad override
    return value if isinstance(value, dict) else None


def _leaves(prefix: str, value: dict[str, Any]) -> list[tuple[str, Any]]:
    """Dotted keys and values of a nested dict: {"a": {"b": 1}} under "k" -> [("k.a.b", 1)]."""
    out: list[tuple[str, Any]] = []
    for k, v in value.items():
        out += _leaves(f"{prefix}.{k}", v) if isinstance(v, dict) else [(f"{prefix}.{k}", v)]
    return out


def _literal_secrets(item: str) -> tuple[list[str], bool]:
    """The dotted keys `item` sets a secret of to a literal value, and whether in dict form."""
    m = _OVERRIDE.match(item)
    if not m:
        return [], False
    if m["value"].startswith("{") and (value := _dict_value(item)) is not None:
        return [k for k, v in _leaves(m["key"], value) if is_secret_key(k) and _is_literal(v)], True
    return ([m["key"]] if is_secret_key(m["key"]) and _is_literal(m["value"]) else []), False


def _may_hold_secrets(key: str) -> bool:
    return key == "system_envs" or is_secret_key(key) or key.endswith("_kwargs")


def literal_secret_overrides(overrides: list[str]) -> list[str]:
    """The keys of overrides that set a secret to a literal value (not a `${...}` reference), also
    inside a dict-form override.

    >>> literal_secret_overrides(["seed=1", "+system_envs.A=x", "tracker_kwargs={api_key:k,log_dir:d}"])
    ['system_envs.A', 'tracker_kwargs.api_key']
    """
    return [key for item in overrides for key in _literal_secrets(item)[0]]


# Never the value itself: the error is printed and may be logged.
_DICT_FORM = (
    "the override of '{key}' sets the secret(s) {secrets} in dict form, which would store them in plain "
    "text with the flow run's parameters. Give each secret as its own override, e.g. '+{first}=<value>' "
    "(the CLI moves it into the environment), or as a reference: '+{first}=${{oc.env:NAME}}'."
)


def move_secrets_to_env(overrides: list[str], environ: dict[str, str]) -> list[str]:
    """Replace each literal secret in `overrides` by an `${oc.env:NAME}` reference, setting NAME in
    `environ` (the name itself for system_envs.NAME, else SFT_SECRET_<KEY>). A literal secret inside
    a dict-form override is refused (ConfigError), with the dotted form to use instead.

    >>> env = {}
    >>> move_secrets_to_env(["seed=1", "+system_envs.HF_TOKEN=hf_x"], env), env
    (['seed=1', '+system_envs.HF_TOKEN=${oc.env:HF_TOKEN}'], {'HF_TOKEN': 'hf_x'})
    """
    out = []
    for item in overrides:
        m = _OVERRIDE.match(item)
        if m and m["value"].startswith("{") and _dict_value(item) is None and _may_hold_secrets(m["key"]):
            raise ConfigError(
                f"the override of '{m['key']}' is not a dict Hydra can read (check its braces, colons and "
                "quotes); its value is not shown, as it may hold secrets."
            )
        keys, dict_form = _literal_secrets(item)
        if m and keys and dict_form:
            raise ConfigError(_DICT_FORM.format(key=m["key"], secrets=", ".join(keys), first=keys[0]))
        if m and keys and m["value"].strip("'\"").startswith("${"):
            raise ConfigError(
                f"the override of '{m['key']}' gives a secret as an interpolation other than a bare "
                "'${oc.env:NAME}' (a default, another resolver), whose text would be stored in plain text "
                "with the flow run's parameters. Use '${oc.env:NAME}' with NAME set in the environment, or "
                "give the value itself (the CLI moves it into the environment)."
            )
        if m and keys:
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
