"""Build a dataset from a ``data.{train,val,test}`` config block."""

from __future__ import annotations

from typing import Any

from detkit.data.coco import CocoDataset
from detkit.data.dataset import DetectionDataset
from detkit.data.masks import InstanceMaskDataset, SemanticMaskDataset
from detkit.data.voc import VocDataset
from detkit.data.yolo import YoloDataset
from detkit.errors import ConfigError

FORMATS = {
    "coco": CocoDataset,
    "voc": VocDataset,
    "yolo": YoloDataset,
    "masks": SemanticMaskDataset,
    "instance_masks": InstanceMaskDataset,
}


def build_dataset(cfg: Any, transform=None, with_masks: bool = True, key: str = "data",
                  max_pixels: int | None = None) -> DetectionDataset:
    """``cfg`` is a ``data.<split>`` node (or a dict with the same keys). ``max_pixels`` (``data.max_image_pixels``):
    images and masks whose header claims more pixels are skipped (counted) before they are decoded; ``None``:
    Pillow's limit (``PIL.Image.MAX_IMAGE_PIXELS``)."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    fmt = get("format")
    if fmt is None:
        raise ConfigError(f"{key}.format is not set: one of {', '.join(FORMATS)}")
    if fmt not in FORMATS:
        raise ConfigError(f"{key}.format = {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not get("images"):
        raise ConfigError(f"{key}.images is not set: the image folder")
    if fmt in ("coco", "voc", "masks", "instance_masks") and not get("annotations"):
        raise ConfigError(f"{key}.annotations is not set ({fmt}: "
                          f"{'the JSON file' if fmt == 'coco' else 'the annotation folder'})")
    common = {"images": get("images"), "annotations": get("annotations"), "split": get("split"),
              "classes": get("classes"), "name": get("name"), "transform": transform, "max_pixels": max_pixels}
    if fmt in ("coco", "yolo"):
        return FORMATS[fmt](**common, with_masks=with_masks)
    if fmt == "masks":
        return SemanticMaskDataset(**common, label_suffix=get("label_suffix", ""),
                                   ignore_index=get("ignore_index", 255))
    if fmt == "instance_masks":
        return InstanceMaskDataset(**common, label_suffix=get("label_suffix", ""))
    return VocDataset(**common)
