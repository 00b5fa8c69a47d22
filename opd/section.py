"""The base of every config section (``opd.config`` and each objective's own, in
``opd.trainer.objectives``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # inf and nan pass a `gt=0` bound; no value of this tree means either
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
