"""albumentations pipelines from config: boxes, instance masks and semantic maps transformed together.

``data.transforms.train`` / ``.val`` is a preset name or a list of albumentations transforms, each a mapping
``{name: <albumentations class>, <its arguments>...}`` (``OneOf``/``SomeOf``/``Sequential`` take a
``transforms:`` list of the same). Presets, for ``data.image_size = S``:

- ``train``: scale jitter (longest side S, then x0.5-1.5), a random SxS crop (padded where smaller), horizontal
  flip, colour jitter. Boxes keeping less than ``min_visibility`` of their area are dropped (and counted).
- ``val``: ``letterbox`` (longest side S, aspect kept; the batch is padded later) or ``stretch`` (SxS).
- ``none``: nothing.

Every pipeline ends with conversion to tensors and normalisation by the *backbone's* mean/std, or, with
``normalize=False`` (what the DataModule uses), uint8 tensors that :class:`Normalizer` normalises on the
training device: 4x less data crosses from the loader workers. Each sample
records ``scale = (sx, sy)``, the factors from original to network pixels, so that predictions map back with
``x / sx``. Boxes are clipped to the image; boxes that become degenerate are dropped and counted in
``boxes_dropped``.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from detkit.data.dataset import SEMANTIC_IGNORE
from detkit.errors import ConfigError

PRESETS = ("train", "val", "none")
PAD_VALUE = 114  # grey padding, as most detectors use
CONTAINERS = ("OneOf", "SomeOf", "Sequential", "OneOrOther", "SelectiveChannelTransform")


def preset(name: str, image_size: int, resize: str = "letterbox") -> list[A.BasicTransform]:
    s = int(image_size)
    if name == "train":
        return [
            A.LongestMaxSize(max_size=s),
            A.RandomScale(scale_limit=(-0.5, 0.5), p=1.0),
            A.RandomCrop(height=s, width=s, pad_if_needed=True, border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE,
                         fill_mask=0, p=1.0),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ]
    if name == "val":
        if resize == "stretch":
            return [A.Resize(height=s, width=s)]
        return [A.LongestMaxSize(max_size=s)]
    if name == "none":
        return []
    raise ConfigError(f"unknown transform preset {name!r}: expected {', '.join(PRESETS)} or a list of transforms")


def build_transform(spec: Mapping, where: str) -> A.BasicTransform:
    """One albumentations transform from ``{name: ..., **arguments}``."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"{where}: expected a mapping with a 'name' key, e.g. {{name: HorizontalFlip, p: 0.5}}, "
                          f"got {spec!r}")
    params = {str(k): _plain(v) for k, v in spec.items() if k != "name"}
    name = str(spec["name"])
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform | A.BaseCompose)):
        known = [n for n in dir(A) if isinstance(getattr(A, n), type)]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown albumentations transform {name!r}{hint}")
    if name in CONTAINERS or "transforms" in params:
        inner = params.pop("transforms", [])
        if not isinstance(inner, list):
            raise ConfigError(f"{where}: {name}.transforms must be a list of transforms, got {inner!r}")
        params["transforms"] = [build_transform(t, f"{where}.transforms[{i}]") for i, t in enumerate(inner)]
    try:
        return cls(**params)
    except Exception as e:  # TypeError for unknown arguments, pydantic's ValidationError for bad values
        first = str(e).strip().splitlines()
        reason = " ".join(line.strip() for line in first[:3]) if first else type(e).__name__
        raise ConfigError(f"{where}: bad arguments for {name}: {reason}") from None


def _plain(value: Any) -> Any:
    """omegaconf containers -> Python lists/dicts (albumentations validates tuples and lists)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


class Pipeline:
    """A sample -> sample callable: albumentations transforms, then normalisation and tensors."""

    def __init__(self, transforms: Sequence[A.BasicTransform], mean: Sequence[float], std: Sequence[float],
                 min_visibility: float = 0.0, normalize: bool = True) -> None:
        self.transforms = list(transforms)
        self.normalize = normalize
        self.mean = np.asarray(mean, np.float32) * 255.0
        self.std = np.asarray(std, np.float32) * 255.0
        self._mean = torch.as_tensor(self.mean).view(3, 1, 1)
        self._inv_std = (1.0 / torch.as_tensor(self.std)).view(3, 1, 1)
        with warnings.catch_warnings():  # an empty list ("none") has no transform to process boxes: fine
            warnings.filterwarnings("ignore", message="Got processor for bboxes")
            self.compose = A.Compose(
                self.transforms,
                bbox_params=A.BboxParams(format="pascal_voc", label_fields=["instance"],
                                         min_visibility=min_visibility, min_area=1.0, clip=True),
            )

    def reseed(self, seed: int) -> None:
        """Restart the augmentations' random stream (albumentations keeps its own, apart from numpy/torch)."""
        self.compose.set_random_seed(int(seed) % 2**32)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"]
        h0, w0 = image.shape[:2]
        boxes = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
        n = len(boxes)
        inputs: dict[str, Any] = {"image": image, "bboxes": boxes, "instance": np.arange(n)}
        has_masks = sample.get("masks") is not None
        if has_masks and n:
            inputs["masks"] = np.asarray(sample["masks"])
        if sample.get("semantic") is not None:
            # shift classes to 1..K and unlabeled to 0, so that padding (filled with 0) becomes unlabeled too
            sem = np.asarray(sample["semantic"])
            inputs["mask"] = np.where(sem == SEMANTIC_IGNORE, 0, sem + 1).astype(np.uint8)
        out = self.compose(**inputs)
        kept = np.asarray(out["instance"], np.int64).reshape(-1)
        img = out["image"]
        h, w = img.shape[:2]
        result = dict(sample)
        # albumentations may return read-only views
        img = np.ascontiguousarray(img) if img.flags.writeable else img.copy()
        chw = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        result["image"] = normalize_images(chw, self._mean, self._inv_std) if self.normalize else chw
        result["boxes"] = torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4))
        for key in ("labels", "iscrowd", "difficult"):
            result[key] = torch.as_tensor(np.asarray(sample[key])[kept])
        if has_masks:
            masks = np.asarray(out["masks"]) if n else np.zeros((0, h, w), np.uint8)
            result["masks"] = torch.as_tensor(masks.reshape(-1, h, w)[kept] if n else masks, dtype=torch.uint8)
        if sample.get("semantic") is not None:
            sem = np.asarray(out["mask"]).astype(np.int64)
            result["semantic"] = torch.as_tensor(np.where(sem == 0, SEMANTIC_IGNORE, sem - 1))
        result["scale"] = (w / w0, h / h0)
        result["boxes_dropped"] = int(n - len(kept))
        return result


def normalize_images(images: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B,] 3 x H x W`` -> float, ``(x - mean) * inv_std`` (mean and 1/std in 0..255 units, 3 x 1 x 1)."""
    return images.float().sub_(mean.to(images.device)).mul_(inv_std.to(images.device))


class Normalizer(torch.nn.Module):
    """Normalises uint8 image batches on their device (the DataModule ships uint8: 4x less to copy)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0, False)
        self.register_buffer("inv_std", 1.0 / (torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0),
                             False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images if images.is_floating_point() else normalize_images(images, self.mean, self.inv_std)


def build_pipeline(spec: Any, *, image_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                   resize: str = "letterbox", min_visibility: float = 0.3, where: str = "data.transforms",
                   normalize: bool = True) -> Pipeline:
    """``spec``: a preset name or a list of transform mappings (see the module docstring)."""
    spec = _plain(spec)
    if spec is None:
        spec = "train" if train else "val"
    if isinstance(spec, str):
        if int(image_size) <= 0:
            raise ConfigError(f"data.image_size = {image_size}: expected a positive size")
        transforms = preset(spec, image_size, resize)
    elif isinstance(spec, list):
        transforms = [build_transform(t, f"{where}[{i}]") for i, t in enumerate(spec)]
    else:
        raise ConfigError(f"{where}: expected a preset name ({', '.join(PRESETS)}) or a list of transforms, "
                          f"got {spec!r}")
    return Pipeline(transforms, mean, std, min_visibility if train else 0.0, normalize)
