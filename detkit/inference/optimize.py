"""Fast inference: BatchNorm folded into the convolution before it, ``channels_last``, optional ``torch.compile``.

Folding is exact up to float rounding: an eval-mode BatchNorm is the affine map ``y = (x - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``, so ``bn(conv(x))`` equals a convolution with weights ``W * s`` (per output
channel) and bias ``(b - mean) * s + beta``. A pair is folded only where that equality is certain: the
BatchNorm and the convolution are children of the same module, and a symbolic trace (``torch.fx``) of that
module shows the convolution's output going to that BatchNorm and nowhere else. Modules that cannot be traced
(data-dependent control flow) keep their BatchNorms; :func:`optimize_for_inference` counts both. Handled norms:
``nn.BatchNorm2d`` (eval mode, with running statistics), torchvision's and timm's ``FrozenBatchNorm2d``, and timm's
``BatchNormAct2d``/``FrozenBatchNormAct2d`` (whose dropout and activation stay in place of the norm).

The model is changed in place and must not be trained afterwards (its BatchNorms are gone): the Predictor and
the exporter apply this to the model they own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx, nn

log = logging.getLogger(__name__)

NORM_CLASS_NAMES = ("FrozenBatchNorm2d", "BatchNormAct2d", "FrozenBatchNormAct2d")


@dataclass
class OptimizeReport:
    """What :func:`optimize_for_inference` did."""

    folded: int = 0  # BatchNorms folded into convolutions
    kept: int = 0  # BatchNorms left in place (no foldable convolution before them)
    channels_last: bool = False
    compiled: bool = False

    def __str__(self) -> str:
        return (f"BatchNorm folded: {self.folded} (kept {self.kept}), channels_last: {self.channels_last}, "
                f"compiled: {self.compiled}")


def is_batch_norm(module: nn.Module) -> bool:
    """An eval-time BatchNorm over 2-d maps that :func:`fold_conv_bn` can fold."""
    if isinstance(module, nn.BatchNorm2d):
        return module.running_mean is not None and not module.training
    return type(module).__name__ in NORM_CLASS_NAMES and hasattr(module, "running_var")


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Fold ``bn`` into ``conv`` in place: afterwards ``conv(x) == bn(conv_before(x))`` (up to rounding)."""
    with torch.no_grad():
        var, mean = bn.running_var.float(), bn.running_mean.float()
        gamma = bn.weight.float() if getattr(bn, "weight", None) is not None else torch.ones_like(var)
        beta = bn.bias.float() if getattr(bn, "bias", None) is not None else torch.zeros_like(var)
        scale = gamma * torch.rsqrt(var + bn.eps)
        weight = conv.weight.float() * scale.view(-1, 1, 1, 1)
        bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(mean)
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(((bias - mean) * scale + beta).to(conv.weight.dtype), requires_grad=False)


def _replacement(bn: nn.Module) -> nn.Module:
    """What stays of a folded norm: timm's norm+act layers keep their dropout and activation."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
            if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


class _Tracer(fx.Tracer):
    """Convolutions and norms are leaves (one node each), whatever library they come from."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Conv2d) or is_batch_norm(m) or super().is_leaf_module(m, qualname)


def _foldable_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv child, norm child) names of ``parent`` whose convolution output feeds only that norm."""
    children = dict(parent.named_children())
    if not any(isinstance(m, nn.Conv2d) for m in children.values()) or \
            not any(is_batch_norm(m) for m in children.values()):
        return []
    try:
        graph = _Tracer().trace(parent)
    except Exception as e:  # data-dependent control flow, unusual signatures: leave this module as it is
        log.debug("not traceable, BatchNorm kept: %s (%s)", type(parent).__name__, e)
        return []
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    pairs = []
    for name, module in children.items():
        if not is_batch_norm(module) or len(calls.get(name, [])) != 1:
            continue
        node = calls[name][0]
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(calls.get(str(src.target), [])) != 1:
            continue
        conv = children.get(str(src.target))
        if isinstance(conv, nn.Conv2d):  # (transposed convs are another class, with weights laid out otherwise)
            if len(src.users) == 1 and conv.out_channels == module.running_var.numel():
                pairs.append((str(src.target), name))
    return pairs


def fold_batch_norms(model: nn.Module) -> OptimizeReport:
    """Fold every foldable eval-mode BatchNorm of ``model`` into its convolution (see the module docstring)."""
    report = OptimizeReport()
    for parent in list(model.modules()):
        for conv_name, bn_name in _foldable_pairs(parent):
            bn = getattr(parent, bn_name)
            fold_conv_bn(getattr(parent, conv_name), bn)
            setattr(parent, bn_name, _replacement(bn))
            report.folded += 1
    report.kept = sum(is_batch_norm(m) for m in model.modules())
    return report


def optimize_for_inference(model: nn.Module, fold_bn: bool = True, channels_last: bool = True,
                           compile: bool | str = False) -> OptimizeReport:
    """Put ``model`` in eval mode and apply the optimisations in place. ``compile``: False, True (inductor with
    weight freezing) or a ``torch.compile`` mode such as ``"max-autotune"``; it compiles ``model.backbone`` and
    ``model.neck`` (the dense part; heads with data-dependent shapes stay eager) on their first call, and again
    for each new input shape."""
    model.eval()
    report = fold_batch_norms(model) if fold_bn else OptimizeReport()
    if channels_last:
        model.to(memory_format=torch.channels_last)
        report.channels_last = True
    if compile:
        mode = compile if isinstance(compile, str) else None
        # freezing: weights become constants that inductor pre-packs for oneDNN (the CPU win); the copy a
        # Predictor owns is never trained again
        options = {"freezing": True} if mode is None else None
        for part in ("backbone", "neck"):
            module = getattr(model, part, None)
            if module is not None:
                setattr(model, part, torch.compile(module, mode=mode, options=options))
        report.compiled = True
    model.optimize_report = report
    log.info("inference optimisations: %s", report)
    return model.optimize_report
