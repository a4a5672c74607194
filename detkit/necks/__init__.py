"""Necks: FPN and PAN over any backbone (``{"c_k"}`` -> ``{"p_k"}`` with one channel count)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from detkit.necks.fpn import FPN, PAN, ExtraLevels
from detkit.necks.registry import NECKS, NO_NECK, Neck


def build_neck(cfg, in_channels: Mapping[str, int], in_strides: Mapping[str, int] | None = None) -> nn.Module | None:
    """Build ``model.neck`` over a backbone's ``out_channels``/``strides``; ``name: none`` returns None."""
    if cfg.name == NO_NECK:
        return None
    neck = NECKS.get(cfg.name)(in_channels, in_strides, out_channels=cfg.out_channels, levels=list(cfg.levels),
                               extra_from=cfg.extra_from, extra_op=cfg.extra_op, norm=cfg.get("norm", "none"))
    return NECKS.check(cfg.name, neck)


__all__ = ["FPN", "NECKS", "NO_NECK", "PAN", "ExtraLevels", "Neck", "build_neck"]
