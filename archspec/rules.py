"""Validation primitives shared by the spec models: the strict base model, rule errors, kernel checks.

Cross-field rules raise `PydanticCustomError` with a `field` in the context, so that the loader
can point at the exact field (and YAML line) even when the rule is checked on a parent model.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

# Branches (kernel, dilation) of UniRepLKNet's DilatedRepConv per large kernel size K, as the
# reference builds them (ARCHITECTURE.md section 3). The builder reads this table too; a kernel
# size missing here cannot be built, so the schema rejects it.
DILATED_REPCONV_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 1), (3, 2), (3, 3)),
    9: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (7, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    19: ((5, 1), (7, 1), (9, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}
SUPPORTED_LARGE_KERNELS = tuple(sorted(DILATED_REPCONV_BRANCHES))


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a spec must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


PosInt = Annotated[int, Field(gt=0)]


def rule_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field violation located at `field` (dotted, relative to the model raising it)."""
    return PydanticCustomError("spec_rule", message, {"field": field})


def check_odd_kernel(field: str, value: int, minimum: int = 3) -> None:
    name = field.rsplit(".", 1)[-1]
    if value < minimum:
        raise rule_error(field, f"{name}={value} is too small: kernels must be odd and at least {minimum}")
    if value % 2 == 0:
        raise rule_error(
            field, f"{name}={value} is even: kernels must be odd (centred), e.g. {value - 1} or {value + 1}"
        )


def check_large_kernel(field: str, value: int) -> None:
    """Large kernels go through DilatedRepConv, which only knows the sizes of its branch table."""
    check_odd_kernel(field, value)
    if value not in DILATED_REPCONV_BRANCHES:
        valid = ", ".join(map(str, SUPPORTED_LARGE_KERNELS))
        name = field.rsplit(".", 1)[-1]
        raise rule_error(field, f"{name}={value} has no DilatedRepConv branch table; supported: {valid}")


def check_mlp(width: int, ratio: float) -> None:
    if int(width * ratio) < 1:
        raise rule_error(
            "mlp_ratio", f"mlp_ratio={ratio} gives an empty MLP for width {width}: need width x mlp_ratio >= 1"
        )
