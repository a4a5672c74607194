"""``model.weights``: start a run from a trained detector -- a detkit run or checkpoint, or torchvision's detection
weights (a local file, or their name when the machine is online).

The source's keys are mapped to detkit's (:func:`torchvision_to_detkit`), the tensors whose shape depends on the
number of classes (the class layers) are rebuilt for the target's classes: a target class that the source knows
(``model.weights_classes: {target: source}``, or the same name) keeps its rows, the others keep their fresh
initialisation. Everything else loads when the shapes agree. The :class:`WeightsReport` says what loaded, what was
re-initialised and why, and what the model has that the file does not.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from detkit.errors import PretrainedError
from detkit.utils.io import torch_load_data

log = logging.getLogger(__name__)

# torchvision detection key prefixes -> detkit's (first match wins)
TORCHVISION_KEYS = (
    ("backbone.fpn.extra_blocks.p6.", "neck.fpn.extra_blocks.convs.0."),  # RetinaNet / FCOS P6, P7 (convs)
    ("backbone.fpn.extra_blocks.p7.", "neck.fpn.extra_blocks.convs.1."),
    ("backbone.body.", "backbone.network."),
    ("backbone.fpn.", "neck.fpn."),
    ("rpn.", "head.rpn."),
    ("roi_heads.", "head.roi_heads."),
    ("head.", "head.net.head."),  # RetinaNet / FCOS subnets (detkit's DenseHead keeps torchvision's detector)
)
# class layers: (key pattern, rows per class, background first): their first dimension is (anchors x) classes x rows
CLASS_LAYERS = (
    (re.compile(r"roi_heads\.box_predictor\.cls_score\.(weight|bias)$"), 1, True),
    (re.compile(r"roi_heads\.box_predictor\.bbox_pred\.(weight|bias)$"), 4, True),
    (re.compile(r"roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)$"), 1, True),
    (re.compile(r"classification_head\.cls_logits\.(weight|bias)$"), 1, True),  # RetinaNet, FCOS
    (re.compile(r"^head\.cls\.\d+\.2\.(weight|bias)$"), 1, False),  # detkit's anchor-free YOLO-style head
    # SSD300 (the conv itself) and SSDlite (the 1x1 after the depthwise conv): (anchors x classes) outputs
    (re.compile(r"^head\.predictor\.classification_head\.module_list\.\d+\.(1\.)?(weight|bias)$"), 1, True),
)


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


def from_torchvision(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Any torchvision detection state dict under detkit's keys: the SSDs through
    :func:`detkit.heads.ssd.from_torchvision_ssd` (``configs/_base_/models/ssd300_vgg16.yaml``,
    ``ssdlite_torchvision.yaml``), the others through :func:`torchvision_to_detkit` (the MobileNetV3-FPN R-CNNs
    into ``faster_rcnn_mobilenet_v3_fpn.yaml``, whose backbone taps a second stride-32 map)."""
    keys = list(state)
    if any(k.startswith("head.classification_head.module_list.") for k in keys):
        from detkit.heads.ssd import from_torchvision_ssd

        try:
            return from_torchvision_ssd(state)
        except (KeyError, ValueError, IndexError) as e:
            raise PretrainedError(f"model.weights = {source}: looks like a torchvision SSD but {e}") from None
    return torchvision_to_detkit(state)


def torchvision_to_detkit(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision detection keys (``fasterrcnn_*``, ``maskrcnn_*``, ``retinanet_*``, ``fcos_*``) -> detkit's.
    MobileNet bodies index ``features`` directly (``backbone.body.N`` -> ``backbone.network.features.N``)."""
    out = {}
    for key, value in state.items():
        for old, new in TORCHVISION_KEYS:
            if key.startswith(old):
                rest = key[len(old):]
                if old == "backbone.body." and rest[:1].isdigit():
                    rest = "features." + rest
                out[new + rest] = value
                break
        else:
            out[key] = value  # kept as it is: reported as skipped unless the model has it
    return out


def read_source(spec: str) -> tuple[dict[str, Tensor], list[str] | None, str]:
    """``(detkit-keyed state, source class names for labels 1..K or None, description)`` of ``model.weights``."""
    path = Path(spec)
    if path.is_dir() or path.suffix == ".ckpt":
        from detkit.models.load import model_state, read_checkpoint, resolve_checkpoint

        ckpt_path = resolve_checkpoint(path, "best")
        ckpt = read_checkpoint(ckpt_path)
        return model_state(ckpt), list(ckpt["hyper_parameters"].get("classes") or []) or None, str(ckpt_path)
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
        state = from_torchvision(data, spec)
        return state, _coco_names(state), str(path)
    return _named(spec)


def _coco_names(state: Mapping[str, Tensor]) -> list[str] | None:
    """torchvision's COCO detectors have 91 class outputs (background, 80 classes, 10 unused ids): their names."""
    from torchvision.models._meta import _COCO_CATEGORIES

    n = len(_COCO_CATEGORIES)
    sizes = [v.shape[0] // rows for k, v in state.items() for pattern, rows, _ in CLASS_LAYERS if pattern.search(k)]
    return list(_COCO_CATEGORIES[1:]) if sizes and all(s % n == 0 for s in sizes) else None


def _named(spec: str) -> tuple[dict[str, Tensor], list[str] | None, str]:
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
    state = from_torchvision(state, spec)
    return state, list(categories[1:]) if categories else _coco_names(state), f"torchvision {spec}"


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


def _rebuild(dst: Tensor, src: Tensor, rows: dict[int, int], layer: tuple[int, bool], num_classes: int
             ) -> Tensor | None:
    """``dst`` with the rows of ``src`` for the kept classes (and background, where the layer has it), or None when
    the layouts differ. The first dimension is (anchors x classes x rows per class)."""
    per_class, background = layer
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
    state, source_classes, source = read_source(spec)
    report = WeightsReport(source)
    target = model.state_dict()
    rows = class_rows(list(classes), source_classes, mapping)
    report.class_rows = {classes[j - 1]: (source_classes[i - 1] if source_classes and i <= len(source_classes)
                                          else str(i)) for j, i in rows.items()}
    new: dict[str, Tensor] = {}
    same_classes = source_classes is None or list(source_classes) == list(classes)
    for key, value in state.items():
        per_class = _class_layer(key)
        if key not in target:
            report.skipped.append(f"{key}: not in this model")
        elif target[key].shape == value.shape and (per_class is None or same_classes):
            new[key] = value
        elif per_class is not None:
            rebuilt = _rebuild(target[key], value, rows, per_class, len(classes))
            if rebuilt is None:
                report.skipped.append(f"{key}: class layer {tuple(value.shape)} does not fit "
                                      f"{tuple(target[key].shape)}")
            else:
                new[key] = rebuilt
                report.reinitialised.append(key)
        else:
            report.skipped.append(f"{key}: shape {tuple(value.shape)} != {tuple(target[key].shape)}")
    report.loaded = len(new)
    report.missing = [k for k in target if k not in new]
    # by the weights' values, not the tensors: a different network can share many small norm vectors by name
    total = sum(v.numel() for v in target.values() if v.is_floating_point())
    fitted = sum(v.numel() for k, v in new.items() if target[k].is_floating_point())
    if fitted < 0.5 * total:
        first = report.skipped[0] if report.skipped else "no key in common"
        raise PretrainedError(f"model.weights = {source}: only {100 * fitted / max(total, 1):.0f} % of the model's "
                              f"weights ({report.loaded} of its {len(target)} tensors) fit (e.g. {first}); is it the "
                              f"same architecture (model.backbone/neck/head)?")
    model.load_state_dict(new, strict=False)
    log.info(report.summary())
    return report


def _class_layer(key: str) -> tuple[int, bool] | None:
    return next(((rows, bg) for pattern, rows, bg in CLASS_LAYERS if pattern.search(key)), None)
