"""``model.weights``: start a run from a trained detector -- a detkit run or checkpoint, or torchvision's detection
weights (a local file, or their name when the machine is online).

This module knows no head's keys: it asks the model's head for its weight layout (``model.traits``, declared with
the head's registry line: :class:`detkit.heads.layout.WeightLayout`). A state dict file whose keys are mostly the
model's own is detkit's and used as it is; any other (and torchvision's named weights) goes through the head's
torchvision key map (a head without one takes no torchvision weights: one line saying which heads do). The tensors
whose shape depends on the number of classes (the head's class layers) are rebuilt for the target's classes: a
target class that the source knows (``model.weights_classes: {target: source}``, or the same name) keeps its rows,
the others keep their fresh initialisation. Everything else loads when the shapes agree. The
:class:`WeightsReport` says what loaded, what was re-initialised and why, and what the model has that the file does
not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor, nn

from detkit.errors import PretrainedError
from detkit.heads.layout import ClassLayer, WeightLayout
from detkit.heads.registry import HeadTraits, torchvision_heads
from detkit.utils.io import torch_load_data

log = logging.getLogger(__name__)


@dataclass
class WeightsReport:
    """What ``model.weights`` did: counts and key lists (``class_rows``: target class -> the source class whose
    rows it kept)."""

    source: str
    loaded: int = 0
    reinitialised: list[str] = field(default_factory=list)  # class layers rebuilt for the target's classes
    skipped: list[str] = field(default_factory=list)  # in the file, not usable ("key: why")
    missing: list[str] = field(default_factory=list)  # in the model, not in the file (fresh initialisation)
    class_rows: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        kept = ", ".join(f"{t} <- {s}" for t, s in self.class_rows.items()) or "none"
        return (f"model.weights = {self.source}: {self.loaded} tensors loaded, {len(self.reinitialised)} class "
                f"layers rebuilt (classes kept: {kept}), {len(self.skipped)} skipped, {len(self.missing)} not in "
                f"the file")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Source(NamedTuple):
    """``model.weights`` as read: its state dict (keys as stored), its class names for labels 1..K (None: unknown),
    a description, and whether its keys may be torchvision's (a file or torchvision's named weights, not a run)."""

    state: dict[str, Tensor]
    classes: list[str] | None
    description: str
    foreign: bool


def head_layout(model: nn.Module) -> tuple[str, WeightLayout | None]:
    """The model's head name (``model.head.name`` of its config) and the weight layout its traits declare."""
    traits = getattr(model, "traits", None)
    layout = traits.weight_layout() if isinstance(traits, HeadTraits) else None
    try:
        name = str(model.config.model.head.name)
    except AttributeError:  # a model assembled by hand (no config)
        name = type(getattr(model, "head", model)).__name__
    return name, layout


def to_model_keys(src: Source, target: Mapping[str, Any], name: str, layout: WeightLayout | None
                  ) -> tuple[dict[str, Tensor], bool]:
    """``(the source's state under the model's keys, whether the head's torchvision key map was used)``. A state
    whose keys are mostly the model's own is used as it is; so is a foreign one when the head has no torchvision map
    (:func:`load_weights` then says which heads take torchvision weights if it does not fit)."""
    state = src.state
    if not src.foreign or 2 * sum(k in target for k in state) > len(state) or layout is None \
            or layout.torchvision is None:
        return dict(state), False
    try:
        return layout.torchvision(state), True
    except (KeyError, ValueError, IndexError) as e:
        why = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise PretrainedError(f"model.weights = {src.description}: not torchvision weights that {name} takes "
                              f"({layout.detectors}): {why}") from None


def read_source(spec: str) -> Source:
    """``model.weights`` read: a run directory or ``.ckpt`` (detkit's keys and classes), a state dict file, or
    torchvision's weight name."""
    path = Path(spec)
    if path.is_dir() or path.suffix == ".ckpt":
        from detkit.models.load import model_state, read_checkpoint, resolve_checkpoint

        ckpt_path = resolve_checkpoint(path, "best")
        ckpt = read_checkpoint(ckpt_path)
        classes = list(ckpt["hyper_parameters"].get("classes") or []) or None
        return Source(model_state(ckpt), classes, str(ckpt_path), foreign=False)
    if path.is_file():
        try:
            data = torch_load_data(path)
        except ValueError as e:
            raise PretrainedError(f"model.weights: {e}") from None
        for key in ("state_dict", "model"):
            if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
                data = data[key]
        if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
            raise PretrainedError(f"model.weights = {spec}: not a state dict (a mapping of names to tensors)")
        return Source(dict(data), None, str(path), foreign=True)
    return _named(spec)


def _coco_names(state: Mapping[str, Tensor], layout: WeightLayout | None) -> list[str] | None:
    """torchvision's COCO detectors have 91 class outputs (background, 80 classes, 10 unused ids): their names."""
    from torchvision.models._meta import _COCO_CATEGORIES

    n = len(_COCO_CATEGORIES)
    layers = {k: layout.class_layer(k) for k in state} if layout is not None else {}
    sizes = [state[k].shape[0] // layer.rows for k, layer in layers.items() if layer is not None]
    return list(_COCO_CATEGORIES[1:]) if sizes and all(s % n == 0 for s in sizes) else None


def _named(spec: str) -> Source:
    """torchvision weight names (``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``), downloaded when online."""
    from torchvision.models import get_weight

    try:
        weights = get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise PretrainedError(f"model.weights = {spec!r}: no such file or run directory, and not torchvision weights "
                              f"(e.g. FasterRCNN_ResNet50_FPN_Weights.COCO_V1)") from None
    from detkit.backbones.pretrained import fetch_named

    state = fetch_named("model.weights", spec, lambda: weights.get_state_dict(progress=False, check_hash=True))
    categories = weights.meta.get("categories")
    return Source(dict(state), list(categories[1:]) if categories else None, f"torchvision {spec}", foreign=True)


def class_rows(target: list[str], source: list[str] | None, mapping: Mapping[str, Any] | None) -> dict[int, int]:
    """Target label (1..K) -> source label whose class-layer rows it keeps: ``mapping`` (target name -> source name
    or label), else equal names (case-insensitive)."""
    source = source or []
    lower = {name.lower(): i + 1 for i, name in enumerate(source)}
    rows = {}
    for j, name in enumerate(target, start=1):
        want = (mapping or {}).get(name)
        if want is None:
            i = lower.get(name.lower())
        elif isinstance(want, int) and not isinstance(want, bool):
            i = int(want)
        else:
            i = lower.get(str(want).lower())
            if i is None:
                raise PretrainedError(f"model.weights_classes: {name} -> {want!r}: the source has no such class "
                                      f"(its classes: {', '.join(source[:12])}{', ...' if len(source) > 12 else ''})")
        if i is not None:
            rows[j] = i
    return rows


def _rebuild(dst: Tensor, src: Tensor, rows: dict[int, int], layer: ClassLayer, num_classes: int) -> Tensor | None:
    """``dst`` with the rows of ``src`` for the kept classes (and background, where the layer has it), or None when
    the layouts differ. The first dimension is (anchors x classes x rows per class)."""
    per_class, background = layer.rows, layer.background
    num_target = num_classes + int(background)
    if dst.shape[1:] != src.shape[1:] or dst.shape[0] % (num_target * per_class):
        return None
    anchors = dst.shape[0] // (num_target * per_class)
    if src.shape[0] % (anchors * per_class):
        return None
    source_classes = src.shape[0] // (anchors * per_class)
    shift = 0 if background else 1  # label k is row k with a background row, row k - 1 without
    pairs = ([(0, 0)] if background else []) + [(j - shift, i - shift) for j, i in rows.items()]
    if any(i >= source_classes for _, i in pairs):
        return None
    out = dst.clone()
    for a in range(anchors):
        for j, i in pairs:
            t0, s0 = (a * num_target + j) * per_class, (a * source_classes + i) * per_class
            out[t0:t0 + per_class] = src[s0:s0 + per_class]
    return out


def load_weights(model: nn.Module, spec: str, classes: list[str], mapping: Mapping[str, Any] | None = None
                 ) -> WeightsReport:
    """Load ``model.weights`` into ``model`` (see the module docstring); raises a one-line
    :class:`PretrainedError` when almost nothing fits (another architecture)."""
    name, layout = head_layout(model)
    src = read_source(spec)
    target = model.state_dict()
    state, mapped = to_model_keys(src, target, name, layout)
    source_classes = _coco_names(state, layout) if mapped and src.classes is None else src.classes
    report = WeightsReport(src.description)
    rows = class_rows(list(classes), source_classes, mapping)
    report.class_rows = {classes[j - 1]: (source_classes[i - 1] if source_classes and i <= len(source_classes)
                                          else str(i)) for j, i in rows.items()}
    same_classes = source_classes is None or list(source_classes) == list(classes)
    new = _fit(state, target, layout, rows, same_classes, len(classes), report)
    report.loaded = len(new)
    report.missing = [k for k in target if k not in new]
    # by the weights' values, not the tensors: a different network can share many small norm vectors by name
    total = sum(v.numel() for v in target.values() if v.is_floating_point())
    fitted = sum(v.numel() for k, v in new.items() if target[k].is_floating_point())
    if fitted < 0.5 * total:
        first = report.skipped[0] if report.skipped else "no key in common"
        foreign = src.foreign and not mapped and 2 * sum(k in target for k in state) <= len(state)
        why = (f"model.head.name = {name} takes no torchvision detection weights (the heads that do: "
               f"{', '.join(torchvision_heads())})" if foreign and (layout is None or layout.torchvision is None)
               else "is it the same architecture (model.backbone/neck/head)?")
        raise PretrainedError(f"model.weights = {src.description}: only {100 * fitted / max(total, 1):.0f} % of the "
                              f"model's weights ({report.loaded} of its {len(target)} tensors) fit (e.g. {first}); "
                              f"{why}")
    model.load_state_dict(new, strict=False)
    log.info(report.summary())
    return report


def _fit(state: Mapping[str, Tensor], target: Mapping[str, Tensor], layout: WeightLayout | None,
         rows: dict[int, int], same_classes: bool, num_classes: int, report: WeightsReport) -> dict[str, Tensor]:
    """The tensors of ``state`` that load into ``target``: equal shapes (a class layer only when the source's classes
    are the target's), else class layers rebuilt keeping ``rows``; the rest is reported."""
    new: dict[str, Tensor] = {}
    for key, value in state.items():
        layer = layout.class_layer(key) if layout is not None else None
        if key not in target:
            report.skipped.append(f"{key}: not in this model")
        elif target[key].shape == value.shape and (layer is None or same_classes):
            new[key] = value
        elif layer is not None:
            rebuilt = _rebuild(target[key], value, rows, layer, num_classes)
            if rebuilt is None:
                report.skipped.append(f"{key}: class layer {tuple(value.shape)} does not fit "
                                      f"{tuple(target[key].shape)}")
            else:
                new[key] = rebuilt
                report.reinitialised.append(key)
        else:
            report.skipped.append(f"{key}: shape {tuple(value.shape)} != {tuple(target[key].shape)}")
    return new
