"""The base of every config schema: an unknown key or a wrong type is an error, never ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    # inf and nan pass every bound (learning_rate=inf trained to nan and registered the model).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
