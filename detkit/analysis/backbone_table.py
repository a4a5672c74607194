"""The backbone table of ``detkit backbones``: name, complexity, channels and strides of each backbone."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from detkit.analysis.complexity import count_built, count_complexity
from detkit.backbones import build_backbone, build_classifier, list_backbones
from detkit.errors import ConfigError

COLUMNS = ("name", "params", "flops", "activations", "out_channels", "strides")


def describe_backbone(name: str, input_size: int = 224, imagenet: bool = False) -> dict:
    """One row: complexity of the backbone at ``input_size`` (or of its ImageNet classifier with ``imagenet``)."""
    with torch.device("meta"):
        backbone = build_backbone(name)
    if imagenet:
        counts = count_built(lambda: build_classifier(name, num_classes=1000), input_size)
    else:
        counts = count_complexity(backbone, input_size)
    return {
        "name": name,
        "params": counts.params,
        "flops": counts.flops,
        "activations": counts.activations,
        "out_channels": dict(backbone.out_channels),
        "strides": dict(backbone.strides),
    }


def backbone_table(names: Iterable[str] | None = None, input_size: int = 224, imagenet: bool = False,
                   pattern: str | None = None) -> list[dict]:
    names = list(names) if names else list_backbones()
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"--filter {pattern!r}: bad regular expression ({e})") from None
        names = [n for n in names if regex.search(n)]
    return [describe_backbone(n, input_size, imagenet) for n in names]


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"
