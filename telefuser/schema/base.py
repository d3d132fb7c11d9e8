"""Shared pydantic configuration: unknown keys are errors, NaN/inf are refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A recipe section: extra keys rejected, NaN and inf refused, enums kept as values."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        populate_by_name=True,
        use_enum_values=True,
        validate_default=True,
    )


class FrozenModel(StrictModel):
    """A plan section: immutable once compiled."""

    model_config = ConfigDict(frozen=True)
