"""The encoding spec: everything an encoded split depends on besides its files and tokenizer.

Built once from the config (`EncodeSpec.from_config`); the encoder takes it and the pipeline's
cache key hashes it, so a setting cannot change the samples without changing the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sft_core.data.messages import FieldMapping

if TYPE_CHECKING:
    from sft_core.config import SFTConfig

# Each split's block of data settings in the config.
SPLIT_ARGS = {"train": "sft_train.data_args", "validation": "validation.data_args"}


@dataclass(frozen=True)
class EncodeSpec:
    sequence_length: int
    template: str = "native"  # native | a built-in name | a .jinja path
    fields: FieldMapping = FieldMapping()
    # Longer than sequence_length: cut the answer (counted), drop the sample, or stop.
    length_policy: Literal["truncate", "drop_oldest_turns", "drop", "error"] = "truncate"
    truncate_keep_end_token: bool = False  # end a cut answer with the (supervised) end token
    on_bad_row: Literal["error", "skip"] = "error"  # skip: into the rejects file, counted
    supervise: Literal["all_assistant_turns", "last_assistant_turn", "each_assistant_turn_as_sample"] = (
        "all_assistant_turns"
    )
    supervise_empty_think: bool = False
    config_key: str = f"{SPLIT_ARGS['train']}.file_name"  # the key that names these files, in error messages

    @classmethod
    def from_config(cls, cfg: SFTConfig, split: str = "train") -> EncodeSpec:
        args = cfg.data_args_for(split)
        return cls(
            sequence_length=cfg.sequence_length,
            template=cfg.template_for(split),
            fields=FieldMapping(cfg.prompt_key, cfg.response_key, cfg.query_key, cfg.system_key, args.format),
            length_policy=args.length_policy,
            truncate_keep_end_token=args.truncate_keep_end_token,
            on_bad_row=args.on_bad_row,
            supervise=args.supervise,
            supervise_empty_think=args.supervise_empty_think,
            config_key=f"{SPLIT_ARGS[split]}.file_name",
        )

    @property
    def args_key(self) -> str:
        """The config block of this split's data settings, e.g. `validation.data_args`."""
        return self.config_key.rsplit(".", 1)[0]

    def override(self, setting: str) -> str:
        """A command-line override of this split's `setting` that Hydra takes: validation.data_args
        holds only file_name in a config, so its other keys are added (`++` also replaces one)."""
        prefix = "" if self.args_key.startswith("sft_train.") else "++"
        return f"{prefix}{self.args_key}.{setting}"

    def as_dict(self) -> dict[str, Any]:
        """Plain data: what the cache key hashes. A template file is named by path, so its contents
        are hashed too: an edited template must not reuse the encoding of the old one."""
        return {**dataclasses.asdict(self), "template_sha256": _template_digest(self.template)}


def _template_digest(template: str) -> str | None:
    """sha256 of a .jinja template file's contents (None for native and the built-ins, whose text is
    the tokenizer's or the code's, both in the key already)."""
    path = Path(template)
    if not template.endswith(".jinja"):
        return None
    if not path.is_file():
        return "missing"  # encoding stops on it with a config error
    return hashlib.sha256(path.read_bytes()).hexdigest()
