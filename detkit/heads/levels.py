"""The one check of "the levels a head reads", used by every head's builder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from detkit.errors import ConfigError
from detkit.heads.params import WHERE

RULES = {
    # each stride strictly coarser than the previous one
    "increasing": (lambda a, b: b > a, "distinct"),
    # the same stride or twice the previous one (torchvision's MobileNet FPN has strides 32, 32, 64)
    "consecutive": (lambda a, b: b in (a, 2 * a), "consecutive"),
    # strictly coarser, each a multiple of the previous one (a decoder doubles its way up)
    "multiple": (lambda a, b: b > a and b % a == 0, "nested (each stride a multiple of the previous)"),
}


def select_levels(key: str, chosen: Sequence[str] | None, strides: Mapping[str, int], default: Sequence[str], *,
                  rule: str = "increasing") -> list[str]:
    """``model.head.params.<key>``: ``chosen`` (``None``: ``default``), checked to be among the levels the head
    receives (``strides``: ``{level: stride}``, the neck's or the backbone's) and ordered fine to coarse by
    ``rule`` (:data:`RULES`). Any mistake is one :class:`ConfigError` line naming the key and the levels."""
    available = list(strides)
    levels = list(default if chosen is None else chosen)
    unknown = [k for k in levels if k not in strides]
    if not levels or unknown:
        raise ConfigError(f"{WHERE}.{key} = {levels}: {unknown or 'none'} not among the available levels {available}")
    ok, words = RULES[rule]
    ks = [int(strides[k]) for k in levels]
    if any(not ok(a, b) for a, b in zip(ks, ks[1:])):
        raise ConfigError(f"{WHERE}.{key} = {levels} (strides {ks}): give {words} levels from fine to coarse "
                          f"(available: {available})")
    return levels
