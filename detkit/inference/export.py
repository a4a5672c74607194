"""Export a trained model to ONNX or TorchScript (``detkit export``).

The exported graph takes ``images``: ``B x 3 x H x W`` float32 RGB in 0..255, already resized the way the run's
validation pipeline does it (``data.resize`` to ``data.image_size``, padded to a multiple of
``data.size_divisor``: the size the file was exported at, in its ``.json`` sidecar). Normalisation (the
backbone's mean/std) is inside the graph. Outputs, in input pixels:

- detectors (Faster R-CNN, SSD, YOLO): ``boxes [M, 4]`` (xyxy), ``scores [M]``, ``labels [M]`` (1..K, names in
  the sidecar), ``batch_index [M]`` (the image each detection belongs to), each image's detections in
  descending score order; Mask R-CNN adds ``mask_probs [M, 1, m, m]`` (the mask head's probabilities inside each
  box, to be pasted into the box as :func:`detkit.heads.paste_masks` does);
- U-Net: ``logits [B, K, H, W]`` (:meth:`detkit.models.Segmenter.logits`).

BatchNorms are folded into the convolutions first (:mod:`detkit.inference.optimize`). One-stage heads and U-Net
post-process the whole batch at once (:mod:`detkit.heads.postprocess`), so ``dynamic_batch`` works for them;
torchvision's RPN and RoI heads loop over the images in Python, which a trace unrolls at the export batch size,
so two-stage models are exported for a fixed batch (``batch_size``).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detkit.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
TWO_STAGE = ("faster_rcnn", "mask_rcnn")
DETECTION_OUTPUTS = ["boxes", "scores", "labels", "batch_index"]


class ExportModel(nn.Module):
    """A model as exported: ``images`` (0..255) -> the outputs listed in the module docstring."""

    def __init__(self, model: nn.Module, head_name: str, mean, std) -> None:
        super().__init__()
        self.model, self.head_name = model, head_name
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0, False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0, False)

    @property
    def output_names(self) -> list[str]:
        if getattr(self.model, "task", "detection") == "semantic":
            return ["logits"]
        return DETECTION_OUTPUTS + (["mask_probs"] if self.head_name == "mask_rcnn" else [])

    def forward(self, images: Tensor):
        x = (images - self.mean) / self.std
        if getattr(self.model, "task", "detection") == "semantic":
            return self.model.logits(x)
        features = self.model.features(x)
        sizes = [(int(x.shape[-2]), int(x.shape[-1]))] * int(x.shape[0])
        if self.head_name not in TWO_STAGE:
            return self.model.head.flat_detections(features, x, sizes)
        detections, _ = self.model.head(features, x, sizes)
        out = [torch.cat([d[key] for d in detections]) for key in ("boxes", "scores", "labels")]
        out.append(torch.cat([torch.full_like(d["labels"], i) for i, d in enumerate(detections)]))
        if self.head_name == "mask_rcnn":
            out.append(torch.cat([d["masks"] for d in detections]))
        return tuple(out)


@dataclass
class ExportInfo:
    """What was written (also saved as ``<file>.json`` beside the exported file)."""

    file: str
    format: str
    head: str
    task: str
    input_shape: list[Any]  # [B or "batch", 3, H, W]
    outputs: list[str]
    classes: list[str]
    category_ids: list[Any]
    resize: str
    mean: list[float]
    std: list[float]
    batchnorms_folded: int = 0
    notes: list[str] = field(default_factory=list)


def export_model(module, fmt: str, out: str | Path, *, dynamic_batch: bool = False, batch_size: int = 1,
                 image_size: int | None = None, opset: int = 17, fold_bn: bool = True) -> ExportInfo:
    """Export a :class:`detkit.engine.module.DetectionModule` (see the module docstring)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    cfg = module.cfg
    head = str(cfg.model.head.name)
    if dynamic_batch and head in TWO_STAGE:
        raise ConfigError(f"--dynamic-batch: not possible for {head}: torchvision's RPN and RoI heads loop over the "
                          f"images in Python, which the export unrolls at a fixed batch; use --batch-size N instead")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: expected at least 1")
    size = _input_size(image_size or int(cfg.data.image_size), int(cfg.data.size_divisor))
    model = copy.deepcopy(module.model).cpu().eval()
    from detkit.inference.optimize import fold_batch_norms

    folded = fold_batch_norms(model).folded if fold_bn else 0
    backbone = model.backbone
    wrapper = ExportModel(model, head, backbone.mean, backbone.std).eval().requires_grad_(False)
    example = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values baked into the graph (sizes)
        if fmt == "onnx":
            to_onnx(wrapper, example, out, dynamic_batch, opset)
        else:
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, (example,), check_trace=False)
            traced.save(str(out))
    info = ExportInfo(
        file=str(out), format=fmt, head=head, task=getattr(model, "task", "detection"),
        input_shape=["batch" if dynamic_batch else batch_size, 3, size, size], outputs=wrapper.output_names,
        classes=list(module.classes), category_ids=list(module.hparams.get("cat_ids") or []),
        resize=str(cfg.data.resize), mean=list(backbone.mean), std=list(backbone.std), batchnorms_folded=folded,
        notes=["input: float32 RGB 0..255, resized like the run's validation pipeline; outputs in input pixels"])
    Path(f"{out}.json").write_text(json.dumps(asdict(info), indent=2, default=str))
    return info


def _input_size(size: int, divisor: int) -> int:
    if size < 32:
        raise ConfigError(f"--image-size {size}: expected at least 32")
    return -(-size // divisor) * divisor


def to_onnx(wrapper: ExportModel, example: Tensor, out: str | Path, dynamic_batch: bool, opset: int = 17) -> None:
    """``torch.onnx.export`` of an :class:`ExportModel` (input ``images``, its outputs; detections' first axis
    dynamic, the batch too with ``dynamic_batch``)."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install 'detkit[onnx]'") from None
    names = wrapper.output_names
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch:
        axes["images"] = {0: "batch"}
    for name in names:
        axes[name] = {0: "batch"} if name == "logits" else {0: "detections"}
    if names == ["logits"] and not dynamic_batch:
        axes.pop("logits")
    try:
        torch.onnx.export(wrapper, (example,), str(out), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=names, dynamic_axes=axes or None, do_constant_folding=True)
    except Exception as e:  # an op without an ONNX counterpart, say: one line, the op named
        raise ConfigError(f"ONNX export of {wrapper.head_name} failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None


def run_onnx(path: str | Path, images: Tensor | Any) -> dict[str, Any]:
    """Run an exported ONNX file in onnxruntime (CPU): ``{output name: numpy array}``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("running ONNX files needs onnxruntime: pip install 'detkit[onnx]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    array = images.detach().cpu().float().numpy() if isinstance(images, Tensor) else images
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": array})))
