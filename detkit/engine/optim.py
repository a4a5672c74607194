"""Optimizer and schedules from ``train.*``: the learning rate per step, the run's length in steps, the no-mosaic phase.

Parameter groups: normalisation weights and all biases get ``train.norm_weight_decay`` (0 by default), depthwise
convolution weights ``train.depthwise_weight_decay`` (by default ``train.weight_decay``), the rest
``train.weight_decay``; frozen parameters are left out. The schedule is per optimizer step: a linear
warmup from ``warmup_factor * lr`` over ``warmup_iters`` steps, then cosine to 0 over the rest of the run, multistep
(``lr * gamma**k`` after the k-th milestone epoch) or constant. The run's length is ``train.total_steps`` (a time
budget's plan) or ``train.epochs`` x :func:`steps_per_epoch`; the last ``train.close_mosaic`` of its epochs train
without Mosaic (:func:`no_mosaic_epoch`).
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


def build_optimizer(model: nn.Module, t: Any, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`param_groups`. ``fused``: torch's fused kernels (one pass over each parameter for
    the whole update, on CPU as on CUDA: about 2-3x faster a step on a CPU than the per-op default) where every
    parameter is a floating-point tensor on a CPU or CUDA device. The module asks for it in full precision only:
    Lightning's mixed-precision plugin does not clip the gradients of a fused optimizer (a ``GradScaler`` must
    unscale them first)."""
    depthwise = t.depthwise_weight_decay
    groups = param_groups(model, float(t.weight_decay), float(t.norm_weight_decay),
                          None if depthwise is None else float(depthwise))
    params = [p for g in groups for p in g["params"]]
    kwargs = {"fused": True} if fused and params and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) else {}
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.momentum, 0.999), **kwargs)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, **kwargs)


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


def limited(batches: int, limit: Any) -> int:
    """``batches`` after a Lightning ``limit_*_batches`` (an int caps them, a float keeps that fraction)."""
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(batches, limit)
    if isinstance(limit, float):
        return max(1, int(batches * limit)) if batches else 0
    return batches


def steps_per_epoch(cfg: Any, batches: int) -> int:
    """Optimizer steps per epoch of ``batches`` training batches (``trainer.limit_train_batches`` applied)."""
    batches = limited(batches, cfg.trainer.limit_train_batches)
    return max(1, math.ceil(batches / int(cfg.trainer.accumulate_grad_batches)))


def no_mosaic_epoch(cfg: Any, batches: int) -> int | None:
    """The first epoch trained without Mosaic (``train.close_mosaic``: the last fraction of the epochs), for a
    training loader of ``batches`` batches; ``None`` when every epoch may use it."""
    if not cfg.train.close_mosaic:
        return None
    spe = steps_per_epoch(cfg, batches)
    epochs = math.ceil(int(cfg.train.total_steps) / spe) if cfg.train.total_steps else int(cfg.train.epochs)
    return max(1, math.floor(epochs * (1 - float(cfg.train.close_mosaic))))
