"""Build a dataset from a ``data.{train,val,test}`` config block: its format's reader (:data:`FORMATS`) with the
block's common keys and the format's own options."""

from __future__ import annotations

from typing import Any

from detkit.data.dataset import DetectionDataset
from detkit.data.formats import FORMATS, check_dataset_config, format_traits
from detkit.errors import ConfigError


def build_dataset(cfg: Any, transform=None, with_masks: bool = True, key: str = "data",
                  max_pixels: int | None = None) -> DetectionDataset:
    """``cfg`` is a ``data.<split>`` node (or a dict with the same keys). ``max_pixels`` (``data.max_image_pixels``):
    images and masks whose header claims more pixels are skipped (counted) before they are decoded; ``None``:
    Pillow's limit (``PIL.Image.MAX_IMAGE_PIXELS``). ``with_masks``: decode instance masks (formats that have
    them)."""
    options = check_dataset_config(cfg, key)
    if options is None:
        raise ConfigError(f"{key}.format is not set: one of {', '.join(FORMATS.names())}")
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    fmt = get("format")
    common = {"images": get("images"), "annotations": get("annotations"), "split": get("split"),
              "classes": get("classes"), "name": get("name"), "transform": transform, "max_pixels": max_pixels}
    if format_traits(fmt, key).masks:
        common["with_masks"] = with_masks
    return FORMATS.get(fmt)(**common, **options)
