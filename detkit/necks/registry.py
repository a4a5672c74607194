"""The neck registry and the neck contract.

A neck is registered once in :data:`NECKS` with its class, built as ``cls(in_channels, in_strides,
out_channels=, levels=, extra_from=, extra_op=)`` from ``model.neck``; ``model.neck.name: none`` means no neck.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from detkit.utils.registry import Registry


class Neck(Protocol):
    """The neck contract: built from the backbone's ``out_channels``/``strides``, ``forward({"c_k": ...}) ->
    {"p_k": ...}`` for ``levels`` (fine to coarse), with one channel count ``out_channels`` and ``strides``
    (``{"p_k": 2**k}``) declared at construction."""

    out_channels: int
    strides: dict[str, int]
    levels: list[str]

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]: ...


NO_NECK = "none"
NECKS: Registry = Registry("neck", "model.neck.name", contract=Neck, hint=f"or {NO_NECK} for no neck")

NECKS.register("fpn", "detkit.necks.fpn:FPN")
NECKS.register("pan", "detkit.necks.fpn:PAN")
