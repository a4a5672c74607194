"""Sharing per-image evaluation state across DDP processes, each image counted once."""

from __future__ import annotations

from typing import Any


def gather_first_copy(entries: dict[Any, Any], extra: Any = None) -> tuple[dict[Any, Any], int, list[Any]] | None:
    """Under ``torch.distributed`` with more than one process (call it on all ranks): every rank's ``{image id:
    entry}`` merged, the first copy (lowest rank) of an image winning, so images repeated by DistributedSampler's
    padding count once. Returns ``(merged, copies dropped, every rank's extra)``, or ``None`` when there is
    nothing to gather (one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (entries, extra))
    merged: dict[Any, Any] = {}
    repeated = 0
    for rank_entries, _ in parts:
        for image_id, entry in rank_entries.items():
            if image_id in merged:
                repeated += 1
            else:
                merged[image_id] = entry
    return merged, repeated, [e for _, e in parts]
