"""Optimizer and learning-rate schedule from ``train.*``.

Parameter groups: normalisation weights and all biases get ``train.norm_weight_decay`` (0 by default), depthwise
convolution weights ``train.depthwise_weight_decay`` (by default ``train.weight_decay``), the rest
``train.weight_decay``; frozen parameters are left out. The schedule is per optimizer step: a linear
warmup from ``warmup_factor * lr`` over ``warmup_iters`` steps, then cosine to 0 over the rest of the run, multistep
(``lr * gamma**k`` after the k-th milestone epoch) or constant.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution: one filter per input channel (MobileNet, EfficientNet, ...)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float,
                 depthwise_weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Normalisation weights and biases: ``norm_weight_decay``; depthwise convolution weights:
    ``depthwise_weight_decay`` (``None``: ``weight_decay``); the rest ``weight_decay``."""
    decay, no_decay, depthwise, seen = [], [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, NORM_TYPES) or name == "bias" or p.ndim <= 1:
                no_decay.append(p)
            elif depthwise_weight_decay is not None and is_depthwise(module):
                depthwise.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": norm_weight_decay},
              {"params": depthwise, "weight_decay": depthwise_weight_decay}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, t: Any) -> torch.optim.Optimizer:
    depthwise = t.depthwise_weight_decay
    groups = param_groups(model, float(t.weight_decay), float(t.norm_weight_decay),
                          None if depthwise is None else float(depthwise))
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.momentum, 0.999))
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)


def lr_factor(step: int, t: Any, total_steps: int, steps_per_epoch: int) -> float:
    """The multiplier of ``train.lr`` at optimizer step ``step`` (0-based). The warmup ramps from
    ``warmup_factor`` to 1 over ``warmup_iters`` steps (at most a third of the run: a short run, e.g. a small time
    budget, still reaches the full learning rate); the cosine runs from 1 at the warmup's end to 0 at
    ``total_steps``. The warmup does not depend on the run's length, so a time budget can re-plan the steps during
    it and a rerun with the final step count repeats the run (engine/budget.py)."""
    warmup = min(int(t.warmup_iters), total_steps // 3) if total_steps > 0 else int(t.warmup_iters)
    if t.scheduler == "cosine":
        span = max(1, total_steps - warmup)
        factor = 0.5 * (1.0 + math.cos(math.pi * min(max(step - warmup, 0), span) / span))
    elif t.scheduler == "multistep":
        factor = float(t.gamma) ** bisect.bisect_right(sorted(t.milestones), step // max(1, steps_per_epoch))
    else:
        factor = 1.0
    if step < warmup:
        alpha = step / warmup
        factor *= float(t.warmup_factor) * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, t: Any, total_steps: int | Callable[[], int],
                    steps_per_epoch: int):
    """``LambdaLR`` of :func:`lr_factor`; ``total_steps`` may be a function, read at every step (a time budget
    re-plans the run's length once, during the warmup)."""
    total = total_steps if callable(total_steps) else (lambda: total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t, total(), steps_per_epoch))
