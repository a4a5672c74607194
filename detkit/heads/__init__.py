"""Heads: what turns pyramid features into losses (training) and detections (eval).

``HEADS`` maps ``model.head.name`` to the head's parameter dataclass (``model.head.params``) and builder.
"""

from __future__ import annotations

from detkit.heads.params import parse_params
from detkit.heads.roi_pool import MultiScaleRoIPool, map_levels
from detkit.heads.two_stage import TwoStageHead, TwoStageParams, build_two_stage_head, paste_masks

__all__ = ["MultiScaleRoIPool", "TwoStageHead", "TwoStageParams", "build_two_stage_head", "map_levels",
           "parse_params", "paste_masks"]
