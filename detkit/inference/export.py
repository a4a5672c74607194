"""Export a trained model to ONNX or TorchScript (``detkit export``).

The exported graph takes ``images``: ``B x 3 x H x W`` float32 RGB in 0..255, already resized the way the run's
validation pipeline does it (``data.resize`` to ``data.image_size``, padded to a multiple of
``data.size_divisor``: the size the file was exported at, in its ``.json`` sidecar). The graph is the model's
own :meth:`~detkit.models.Model.export_outputs`, normalisation included. Outputs, in input pixels:

- detectors (Faster R-CNN, SSD, YOLO): ``boxes [M, 4]`` (xyxy), ``scores [M]``, ``labels [M]`` (1..K, names in
  the sidecar), ``batch_index [M]`` (the image each detection belongs to), each image's detections in
  descending score order; Mask R-CNN adds ``mask_probs [M, 1, m, m]`` (the mask head's probabilities inside each
  box, to be pasted into the box as :func:`detkit.heads.paste_masks` does);
- U-Net: ``logits [B, K, H, W]`` (:meth:`detkit.models.Segmenter.logits`).

BatchNorms are folded into the convolutions first (:mod:`detkit.inference.optimize`). Heads registered with
``export: flat`` (one-stage heads) and semantic heads post-process the whole batch at once
(:mod:`detkit.heads.postprocess`), so ``dynamic_batch`` works for them; ``export: per_image`` heads (torchvision's
RPN and RoI heads) loop over the images in Python, which a trace unrolls at the export batch size, so they are
exported for a fixed batch (``batch_size``).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detkit.errors import ConfigError
from detkit.utils.io import write_json

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")


class ExportModel(nn.Module):
    """A model as exported: ``images`` (float, 0..255) -> :meth:`~detkit.models.Model.export_outputs`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def output_names(self) -> list[str]:
        return list(self.model.output_names)

    @property
    def head_name(self) -> str:
        cfg = self.model.config
        return str(cfg.model.head.name) if cfg is not None else type(self.model.head).__name__

    def forward(self, images: Tensor):
        return self.model.export_outputs(images)


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


def export_model(model: Any, fmt: str, out: str | Path, *, dynamic_batch: bool = False, batch_size: int = 1,
                 image_size: int | None = None, opset: int = 17, fold_bn: bool = True) -> ExportInfo:
    """Export a model (:func:`detkit.load_model`, or a training module holding one; see the module docstring)."""
    from detkit.inference.optimize import fold_batch_norms
    from detkit.models.base import as_model

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    source = as_model(model)
    cfg = source.config
    head = str(cfg.model.head.name)
    if dynamic_batch and source.traits.export == "per_image":
        raise ConfigError(f"--dynamic-batch: not possible for {head}: its heads loop over the images in Python "
                          f"(torchvision's RPN and RoI heads), which the export unrolls at a fixed batch; use "
                          f"--batch-size N instead")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: expected at least 1")
    size = _input_size(image_size or int(cfg.data.image_size), int(cfg.data.size_divisor))
    copy_ = copy.deepcopy(source).cpu().eval()
    folded = fold_batch_norms(copy_).folded if fold_bn else 0
    wrapper = ExportModel(copy_).eval().requires_grad_(False)
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
        file=str(out), format=fmt, head=head, task=source.task,
        input_shape=["batch" if dynamic_batch else batch_size, 3, size, size], outputs=wrapper.output_names,
        classes=list(source.classes), category_ids=list(source.cat_ids), resize=str(cfg.data.resize),
        mean=list(source.mean), std=list(source.std), batchnorms_folded=folded,
        notes=["input: float32 RGB 0..255, resized like the run's validation pipeline; outputs in input pixels"])
    write_json(asdict(info), f"{out}.json")
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


def onnx_session(path: str | Path) -> Any:
    """An onnxruntime (CPU) session of an exported ONNX file."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("running ONNX files needs onnxruntime: pip install 'detkit[onnx]'") from None
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path | Any, images: Tensor | Any) -> dict[str, Any]:
    """Run an exported ONNX file (or an :func:`onnx_session` of one) in onnxruntime (CPU): ``{output name: numpy
    array}``."""
    session = onnx_session(path) if isinstance(path, str | Path) else path
    array = images.detach().cpu().float().numpy() if isinstance(images, Tensor) else images
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": array})))


def onnx_tile_runner(path: str, image_size: int) -> Callable[[list[np.ndarray]], list[dict[str, Tensor]]]:
    """A ``run`` for :func:`detkit.inference.tiling.predict_tiled` from an exported ONNX detector
    (``--dynamic-batch``, input ``image_size``): the tiles as one batch, each at the top left of its slot
    (bottom/right zero-padded), a larger one (the full-image pass) shrunk to fit first; the flat outputs split per
    tile, in its pixels (labels 1..K)."""
    import cv2

    session = onnx_session(path)

    def run(tiles: Sequence[np.ndarray]) -> list[dict[str, Tensor]]:
        batch = np.zeros((len(tiles), 3, image_size, image_size), np.float32)
        scales = []
        for i, t in enumerate(tiles):
            h, w = t.shape[:2]
            s = min(1.0, image_size / max(h, w))
            if s < 1.0:
                t = cv2.resize(t, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_LINEAR)
            batch[i, :, : t.shape[0], : t.shape[1]] = t.transpose(2, 0, 1)
            scales.append((t.shape[1] / w, t.shape[0] / h))
        out = run_onnx(session, batch)
        idx = torch.as_tensor(out["batch_index"]).long()
        results = []
        for i, (sx, sy) in enumerate(scales):
            boxes = torch.as_tensor(out["boxes"])[idx == i].float() / torch.tensor([sx, sy, sx, sy])
            results.append({"boxes": boxes, "scores": torch.as_tensor(out["scores"])[idx == i].float(),
                            "labels": torch.as_tensor(out["labels"])[idx == i].long()})
        return results

    return run
