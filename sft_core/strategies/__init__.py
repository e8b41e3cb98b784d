"""Training strategies behind `Strategy`; pick one by `strategy_args.strategy_name`."""

from __future__ import annotations

from sft_core.config import SUPPORTED_STRATEGIES, SFTConfig
from sft_core.errors import ConfigError
from sft_core.strategies.base import DistContext, Strategy


def create_strategy(cfg: SFTConfig, ctx: DistContext) -> Strategy:
    name = cfg.sft_train.strategy_args.strategy_name
    if name == "ddp_train":
        from sft_core.strategies.ddp import DDPStrategy

        return DDPStrategy(cfg, ctx)
    if name == "fsdp2_train":
        from sft_core.strategies.fsdp2 import FSDP2Strategy

        return FSDP2Strategy(cfg, ctx)
    if name == "megatron_train":
        from sft_core.strategies.megatron import MegatronStrategy

        return MegatronStrategy(cfg, ctx)
    raise ConfigError(f"strategy '{name}' is not supported; use one of: {', '.join(SUPPORTED_STRATEGIES)}")
