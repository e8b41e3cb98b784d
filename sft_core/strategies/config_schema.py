"""What every strategy's `strategy_config` schema answers when the config is checked, before any
model, data or worker exists (pydantic only: importing this costs nothing)."""

from __future__ import annotations

from sft_core.strict import StrictModel


class StrategyConfig(StrictModel):
    """A strategy without settings of its own (ddp_train, fsdp2_train): an empty strategy_config."""

    @property
    def model_parallel_size(self) -> int:
        """Workers that hold one model replica together; data parallel = workers / this."""
        return 1

    def world_problem(self, world_size: int) -> str | None:
        """Why `world_size` workers cannot run this layout, or None."""
        if world_size % self.model_parallel_size:
            return (
                f"{world_size} workers cannot be split into model-parallel groups of "
                f"{self.model_parallel_size}; use a multiple of {self.model_parallel_size} workers"
            )
        return None

    def machine_problem(self, device_kind: str, has_transformer_engine: bool) -> str | None:
        """Why this machine cannot run the layout (a missing library or device kind), or None."""
        return None
