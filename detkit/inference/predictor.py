"""The Python predictor: a checkpoint in, detections in original image pixels out.

``Predictor.from_checkpoint(path)(images)`` (or ``Predictor(detkit.load_model(path))``) takes paths, PIL images,
H x W x 3 uint8 arrays or 3 x H x W tensors (one or many, any sizes), resizes them with the run's validation
pipeline (resizing happens once), batches them, and returns per image ``{"boxes", "scores", "labels",
"names"[, "masks"]}`` with boxes mapped back to the original image; for a segmenter (U-Net) ``{"semantic": H x W
class indices 0..K-1 at the original size (255 where the winning probability is below ``score_threshold``),
"scores": that probability per pixel, "names": the classes present}``.

``classes=["a", "b"]`` (or ``"a,b"``) keeps only those classes: other detections are dropped, other pixels of a
label map become 255 (unlabeled); unknown names are a ``ConfigError``. ``None`` or ``""``: every class.

``tta=True`` (the run's ``eval.tta`` settings) or ``tta={"scales": [...], "hflip": ..., "merge": "wbf"|"nms"}``
merges flipped and scaled passes (:mod:`detkit.inference.tta`); ``tiles=640`` or ``tiles={"size", "overlap",
"full_image", "merge", "match", "iou"}`` cuts large images into overlapping tiles at the network's resolution
(:mod:`detkit.inference.tiling`); ``predict_video(source)`` iterates over the frames of a video or stream
(:mod:`detkit.inference.video`).

Fast inference is on by default (``fast=True``): the Predictor runs its own copy of the model with BatchNorm
folded into the convolutions and ``channels_last`` weights and inputs (:mod:`detkit.inference.optimize`; the
detections are the same up to float rounding); ``compile=True`` adds ``torch.compile`` of the backbone and neck.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detkit.data.collate import Collate
from detkit.data.dataset import IMAGE_SUFFIXES, SEMANTIC_IGNORE, list_images, read_image, to_uint8_rgb
from detkit.data.transforms import pipeline_from_config
from detkit.errors import ConfigError, DataError
from detkit.inference.merge import check_merge
from detkit.inference.tiling import Tiling, predict_tiled
from detkit.inference.tta import TTA, raw_predict, tta_predict
from detkit.inference.video import Frame
from detkit.models import load_model
from detkit.models.base import as_model
from detkit.models.segmenter import label_map


def to_rgb_array(image: Any) -> np.ndarray:
    """An H x W x 3 uint8 RGB array from a path, PIL image, array (H x W [x C]) or tensor ([C x] H x W); 16-bit
    images are scaled to 8 bits, float images are taken as 0..1."""
    if isinstance(image, str | Path):
        return read_image(Path(image))
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            return to_uint8_rgb(np.asarray(image), "image")
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):  # C x H x W -> H x W x C
            t = t.permute(1, 2, 0)
        image = t.numpy()
    return to_uint8_rgb(np.asarray(image), "image")


class Predictor:
    """Runs a trained model over images (see the module docstring). ``model``: a :class:`~detkit.models.Model` with
    its ``config`` and ``classes`` (from :func:`detkit.load_model`, or a training module's ``model``)."""

    def __init__(self, model: Any, device: str | torch.device = "cpu", batch_size: int = 4,
                 score_threshold: float | Mapping[str, float | None] = 0.0, fast: bool = True,
                 compile: bool | str = False,
                 classes: str | Sequence[str] | None = None, tta: Any = None, tiles: Any = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and (not torch.cuda.is_available() or
                                           (self.device.index or 0) >= torch.cuda.device_count()):
            raise ConfigError(f"device {device!r}: no such CUDA device here "
                              f"({torch.cuda.device_count()} available); use --device cpu")
        self.source = as_model(model).eval().to(self.device)
        self.model = self.source
        self.channels_last = bool(fast)
        if fast or compile:  # a copy: the model given stays trainable
            from detkit.inference.optimize import optimize_for_inference

            self.model = copy.deepcopy(self.source)
            self.report = optimize_for_inference(self.model, fold_bn=fast, channels_last=fast, compile=compile)
        if self.source.config is None:
            raise ConfigError("this model has no config (build it with detkit.build_model or load it with "
                              "detkit.load_model): the Predictor needs its data.* settings to resize images")
        self.cfg = self.source.config
        self.classes: list[str] = list(self.source.classes)
        self.task: str = self.source.task
        first = 0 if self.task == "semantic" else 1  # label maps hold indices 0..K-1, detections labels 1..K
        self.cat_ids: list[Any] = list(self.source.cat_ids or range(first, len(self.classes) + first))
        self.keep_classes: list[str] | None = select_classes(classes, self.classes)
        self._keep = None if self.keep_classes is None else torch.tensor(
            [self.classes.index(n) + first for n in self.keep_classes])
        self.batch_size = int(batch_size)
        self.score_threshold, self._thresholds = self._thresholds_of(score_threshold)
        self.pipeline = pipeline_from_config(self.cfg.data, train=False)  # resized exactly as in validation
        self.collate = Collate(self.cfg.data.size_divisor)
        if tta is True:  # the run's own settings (eval.tta), else the defaults
            tta = dict((self.cfg.get("eval") or {}).get("tta") or {})
        self.tta = TTA.of(tta)
        self.tiles = Tiling.of(tiles)
        if self.tta is not None:
            check_merge(self.tta.method(bool(self.source.traits.masks)), "iou", self.tta.iou,
                        masks=bool(self.source.traits.masks), what="eval.tta.merge")
        if self.tiles is not None:
            check_merge(self.tiles.merge, self.tiles.match, self.tiles.iou, masks=bool(self.source.traits.masks),
                        what="tile merge")

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> Predictor:
        """A Predictor of a run directory (its ``best.ckpt``) or checkpoint file (:func:`detkit.load_model`)."""
        return cls(load_model(path), device=device, **kwargs)

    def sample(self, image: Any, index: int) -> dict[str, Any]:
        arr = to_rgb_array(image)
        h, w = arr.shape[:2]
        empty = np.zeros((0,), np.int64)
        return self.pipeline({"image": arr, "boxes": np.zeros((0, 4), np.float32), "labels": empty,
                              "iscrowd": empty.astype(bool), "difficult": empty.astype(bool), "image_id": index,
                              "orig_size": (h, w)})

    @torch.inference_mode()
    def __call__(self, images: Any) -> list[dict[str, Any]] | dict[str, Any]:
        single = not isinstance(images, list | tuple)
        items: Sequence[Any] = [images] if single else list(images)
        results: list[dict[str, Any]] = []
        if self.tiles is not None:  # tiles of one image at a time, batched
            for im in items:
                raw = predict_tiled(to_rgb_array(im), self.run, self.tiles, int(self.cfg.data.image_size),
                                    self.batch_size)
                results.append(self._finish(raw))
            return results[0] if single else results
        for start in range(0, len(items), self.batch_size):
            results += [self._finish(raw) for raw in self.run(items[start:start + self.batch_size])]
        return results[0] if single else results

    @torch.inference_mode()
    def run(self, images: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
        """One batch of images through the model (with test-time augmentation when set): per image the
        detections in its pixels before thresholds, or a segmenter's ``{"logits"}``."""
        batch = self.collate([self.sample(im, i) for i, im in enumerate(images)])
        batch["images"] = batch["images"].to(self.device)
        if self.tta is not None:
            return tta_predict(self.model, batch, self.tta, int(self.cfg.data.size_divisor), self.channels_last)
        if self.channels_last:
            batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
        return raw_predict(self.model, batch)

    def predict_video(self, source: Any, vid_stride: int = 1, max_frames: int | None = None,
                      stall_timeout: float = 10.0) -> Iterator[tuple[Frame, dict[str, Any]]]:
        """``(frame, result)`` for the frames of a video file, stream URL (``rtsp://...``) or camera index, read
        ``batch_size`` at a time (every ``vid_stride``-th frame, at most ``max_frames``); ``frame`` has ``index``,
        ``time`` (seconds) and ``image`` (RGB array). A stream that stalls longer than ``stall_timeout`` seconds
        raises :class:`~detkit.errors.DataError` after the frames read so far were yielded
        (:mod:`detkit.inference.video`)."""
        from detkit.inference.video import read_frames

        chunk: list[Frame] = []
        try:
            for frame in read_frames(source, vid_stride=vid_stride, max_frames=max_frames,
                                     stall_timeout=stall_timeout):
                chunk.append(frame)
                if len(chunk) == self.batch_size:
                    batch, chunk = chunk, []
                    yield from zip(batch, self._as_list(self([f.image for f in batch])))
        except GeneratorExit:  # the caller stopped iterating
            raise
        except BaseException:  # the frames read before the source stalled or failed are predicted too
            if chunk:
                yield from zip(chunk, self._as_list(self([f.image for f in chunk])))
            raise
        if chunk:
            yield from zip(chunk, self._as_list(self([f.image for f in chunk])))

    @staticmethod
    def _as_list(out: Any) -> list[dict[str, Any]]:
        return out if isinstance(out, list) else [out]

    def _thresholds_of(self, value: Any) -> tuple[float, torch.Tensor | None]:
        """A score threshold for every class, or one per class name (``{name: t}``, e.g. ``metrics.json``'s
        ``best_score_threshold``; a class left out or ``None``: 0). Returns (the smallest, per-label tensor)."""
        if not isinstance(value, Mapping):
            return float(value), None
        unknown = [n for n in value if n not in self.classes]
        if unknown:
            raise ConfigError(f"score thresholds for unknown classes {', '.join(map(repr, unknown[:5]))}; this "
                              f"model's classes: {', '.join(self.classes)}")
        per = [float(value.get(n) or 0.0) for n in self.classes]
        return min(per, default=0.0), torch.tensor([0.0, *per])  # label k -> per[k - 1]

    def _finish(self, pred: dict[str, torch.Tensor]) -> dict[str, Any]:
        if "logits" in pred:
            pred = label_map(pred["logits"])
        if "semantic" in pred:  # a segmenter: pixels less sure than the threshold become unlabeled (255)
            semantic, scores = pred["semantic"].cpu(), pred["scores"].cpu()
            if self.score_threshold > 0:
                semantic = torch.where(scores >= self.score_threshold, semantic, SEMANTIC_IGNORE)
            if self._keep is not None:
                semantic = torch.where(torch.isin(semantic, self._keep), semantic, SEMANTIC_IGNORE)
            present = [int(v) for v in torch.unique(semantic).tolist() if v != SEMANTIC_IGNORE]
            return {"semantic": semantic, "scores": scores, "names": [self.classes[v] for v in present]}
        if self._thresholds is not None:
            per_label = self._thresholds.to(pred["scores"].device)
            keep = pred["scores"] >= per_label[pred["labels"].clamp(0, len(self.classes))]
        else:
            keep = pred["scores"] >= self.score_threshold
        if self._keep is not None:
            keep &= torch.isin(pred["labels"], self._keep.to(pred["labels"].device))
        out = {k: v[keep].cpu() for k, v in pred.items()}
        out["names"] = [self.classes[int(i) - 1] if 0 < int(i) <= len(self.classes) else str(int(i))
                        for i in out["labels"]]
        return out

    def category_id(self, label: int) -> Any:
        """The dataset's own category id of contiguous label ``label`` (1..K; for a segmenter the class index
        0..K-1), where the dataset's ids are ints; else ``label`` itself (e.g. VOC, whose ids are the names)."""
        cat = self.cat_ids[int(label) - (0 if self.task == "semantic" else 1)]
        return int(cat) if isinstance(cat, int | np.integer) else int(label)


def select_classes(wanted: str | Sequence[str] | None, classes: Sequence[str]) -> list[str] | None:
    """``"a,b"`` or ``["a", "b"]`` checked against the model's ``classes`` (``None`` for all classes)."""
    if wanted is None:
        return None
    names = wanted.split(",") if isinstance(wanted, str) else [str(n) for n in wanted]
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        return None
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ConfigError(f"unknown class{'es' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                          f"this model's classes: {', '.join(classes)}")
    return names


def expand_inputs(inputs: Iterable[str], exclude: str | Path | None = None, found_all: list[Path] | None = None
                  ) -> list[Path]:
    """Files, folders (recursive) and globs -> image paths (sorted per input, no duplicates). Images inside
    ``exclude`` (the output folder, inside an input folder) are left out; ``found_all`` receives every image found,
    those included (they must not be overwritten either)."""
    import glob

    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += list_images(p)
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"{item}: no such file, folder or matching glob")
            found += [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
    seen, unique = set(), []
    skip = Path(exclude).resolve() if exclude is not None else None
    if skip is not None and skip in {Path(i).resolve() for i in inputs}:
        skip = None  # predicting into the input folder itself: its images are the inputs
    if found_all is not None:
        found_all.extend(found)
    for f in found:
        if skip is not None and f.resolve().is_relative_to(skip):
            continue
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique
