"""`strategy_config` of megatron_train: the parallel layout, with megatron's own names."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sft_core.strategies.config_schema import StrategyConfig


class MegatronConfig(StrategyConfig):
    """Data parallel size is what is left: len(device_mapping) / (tensor x pipeline x context)."""

    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)
    # Model chunks per pipeline stage (interleaved 1F1B); None: one chunk.
    virtual_pipeline_model_parallel_size: int | None = Field(None, ge=2)
    context_parallel_size: int = Field(1, ge=1)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = Field(None, ge=1)

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )

    @model_validator(mode="after")
    def _consistent(self) -> MegatronConfig:
        if self.virtual_pipeline_model_parallel_size and self.pipeline_model_parallel_size < 2:
            raise ValueError("virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2")
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ValueError("sequence_parallel needs tensor_model_parallel_size >= 2")
        if self.recompute_granularity == "full" and not (self.recompute_method and self.recompute_num_layers):
            raise ValueError("recompute_granularity 'full' needs recompute_method and recompute_num_layers")
        if self.recompute_granularity != "full" and (self.recompute_method or self.recompute_num_layers):
            # Megatron reads them only with full recompute: set alone, they would do nothing, unseen.
            raise ValueError(
                "recompute_method and recompute_num_layers take effect only with recompute_granularity 'full'"
            )
        return self

    def state_layout(self, data_parallel_size: int) -> dict[str, object]:
        """What decides how the per-rank resume state is sharded: the parallel sizes, and the data-
        parallel size too where the distributed optimizer shards Adam's state over it. Recompute
        settings change memory only, so a resume may change them."""
        layout = self.model_dump(
            exclude={"recompute_granularity", "recompute_method", "recompute_num_layers"}
        )
        if self.use_distributed_optimizer:
            layout["data_parallel_size"] = data_parallel_size
        return layout

    def world_problem(self, world_size: int) -> str | None:
        if world_size % self.model_parallel_size:
            return (
                f"{world_size} workers cannot be split into tensor x pipeline x context parallel groups of "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} x "
                f"{self.context_parallel_size} = {self.model_parallel_size}; use a multiple of "
                f"{self.model_parallel_size} workers"
            )
        return None

    def machine_problem(self, device_kind: str, has_transformer_engine: bool) -> str | None:
        if self.context_parallel_size > 1 and (device_kind != "cuda" or not has_transformer_engine):
            missing = "no GPU" if device_kind != "cuda" else "no transformer_engine"
            return (
                "context_parallel_size: context parallelism needs megatron's Transformer Engine attention "
                f"(GPU, transformer_engine installed); this machine has {missing}. Use context_parallel_size: 1."
            )
        return None

    def describe(self) -> str:
        vpp = self.virtual_pipeline_model_parallel_size
        return (
            f"tensor {self.tensor_model_parallel_size} x pipeline {self.pipeline_model_parallel_size}"
            + (f" (x{vpp} virtual)" if vpp else "")
            + f" x context {self.context_parallel_size}"
            + (", sequence parallel" if self.sequence_parallel else "")
            + (", distributed optimizer" if self.use_distributed_optimizer else "")
        )
