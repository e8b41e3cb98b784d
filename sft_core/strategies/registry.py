"""Every training strategy by its `strategy_name`: the schema of its `strategy_config` and the class
that runs it. The one list of supported names; importing it imports no torch.

`StrategyArgs` (the `sft_train.strategy_args` block) is a pydantic union keyed on `strategy_name`,
so `strategy_config` is checked by that strategy's own schema, with the config's usual messages.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from sft_core.strategies.config_schema import StrategyConfig
from sft_core.strategies.megatron.layout import MegatronConfig
from sft_core.strict import StrictModel

if TYPE_CHECKING:
    from sft_core.config import SFTConfig
    from sft_core.strategies.base import DistContext, Strategy

DEFAULT_STRATEGY = "ddp_train"
# Recognised names that this version does not run, with what to say instead.
PLANNED_STRATEGIES = {"deepspeed_train": "DeepSpeed is not part of this project."}


class _Args(StrictModel):
    strategy_name: str
    strategy_config: StrategyConfig
    implementation: ClassVar[str]  # "module:Class", imported only when a run needs it
    supports_lora: ClassVar[bool] = True
    supports_compile: ClassVar[bool] = True  # model_args.compile

    @model_validator(mode="before")
    @classmethod
    def _own_keys_only(cls, data: Any) -> Any:
        """A key of another strategy's strategy_config: say whose it is."""
        given = data.get("strategy_config") if isinstance(data, dict) else None
        schema = cls.model_fields["strategy_config"].annotation
        if isinstance(given, dict) and isinstance(schema, type):
            foreign = sorted(set(given) - set(schema.model_fields))
            owners = [a.name() for a in ARGS if a is not cls and set(foreign) <= set(a.config_fields())]
            if foreign and owners:
                raise ValueError(
                    f"strategy_config {foreign} applies to {' / '.join(owners)} only; "
                    f"{data.get('strategy_name')} does not take it"
                )
        return data

    @classmethod
    def name(cls) -> str:
        return cls.model_fields["strategy_name"].default

    @classmethod
    def config_fields(cls) -> list[str]:
        schema = cls.model_fields["strategy_config"].annotation
        return list(schema.model_fields) if isinstance(schema, type) else []


class DDPArgs(_Args):
    strategy_name: Literal["ddp_train"] = "ddp_train"
    strategy_config: StrategyConfig = Field(default_factory=StrategyConfig)
    implementation = "sft_core.strategies.ddp:DDPStrategy"


class FSDP2Args(_Args):
    strategy_name: Literal["fsdp2_train"] = "fsdp2_train"
    strategy_config: StrategyConfig = Field(default_factory=StrategyConfig)
    implementation = "sft_core.strategies.fsdp2:FSDP2Strategy"


class MegatronArgs(_Args):
    strategy_name: Literal["megatron_train"] = "megatron_train"
    strategy_config: MegatronConfig = Field(default_factory=MegatronConfig)
    implementation = "sft_core.strategies.megatron.strategy:MegatronStrategy"
    supports_lora = False
    supports_compile = False


ARGS: tuple[type[_Args], ...] = (DDPArgs, FSDP2Args, MegatronArgs)
SUPPORTED_STRATEGIES = tuple(a.name() for a in ARGS)
StrategyArgs = Annotated[DDPArgs | FSDP2Args | MegatronArgs, Field(discriminator="strategy_name")]


def known_strategy_name(name: Any) -> str:
    """`name` if a strategy has it; else a ValueError that says what to use."""
    if name in SUPPORTED_STRATEGIES:
        return name
    if name in PLANNED_STRATEGIES:
        why = PLANNED_STRATEGIES[name]
    else:
        close = difflib.get_close_matches(str(name), SUPPORTED_STRATEGIES, n=1)
        why = f"unknown strategy '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "") + "."
    raise ValueError(f"{why} Supported: {', '.join(SUPPORTED_STRATEGIES)}")


def strategy_for(cfg: SFTConfig) -> type[Strategy]:
    """The class that runs the config's strategy (its module is imported here, not before)."""
    args = {a.name(): a for a in ARGS}[known_strategy_name(cfg.sft_train.strategy_args.strategy_name)]
    module, cls = args.implementation.split(":")
    return getattr(importlib.import_module(module), cls)


def create_strategy(cfg: SFTConfig, ctx: DistContext) -> Strategy:
    return strategy_for(cfg)(cfg, ctx)
