"""What every dataset reader shares: the sample format, class maps, problem counting, and image loading.

A reader parses its annotations once, into :class:`Record` objects (no pixels), repairing what can be
repaired and counting every repair in :class:`Problems`; :meth:`DetectionDataset.load` then reads one image
(and its masks) into a *sample*:

``image``      H x W x 3 uint8 RGB
``boxes``      N x 4 float32, xyxy in pixels
``labels``     N int64, contiguous 1..K (0 is background)
``iscrowd``    N bool (kept, not trained on; evaluation respects it)
``difficult``  N bool (VOC)
``masks``      N x H x W uint8, optional (instance segmentation)
``semantic``   H x W int64, optional (class index 0..K-1, 255 where unlabeled)
``image_id``, ``orig_size`` (h, w), ``file``

Images and masks are opened header first (:func:`detkit.data.fields.open_image`): one that claims more pixels than
the dataset's ``max_pixels`` (``data.max_image_pixels``; default Pillow's limit) is skipped, counted, when the
dataset is built, and refused with a one-line :class:`DataError` by :func:`read_image`, never decoded.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from detkit.data.fields import ImageTooLarge, exists, header_size, int_key, open_image, pixel_limit, show
from detkit.data.samplers import sample_seed
from detkit.errors import ConfigError, DataError

log = logging.getLogger("detkit.data")

SEMANTIC_IGNORE = 255  # the value of unlabeled pixels in every semantic sample (class indices are 0..K-1)
FLOAT32_MAX = float(np.finfo(np.float32).max)
CLIP_TOLERANCE = 1.0  # pixels a box may overshoot the image before its clipping is counted as a repair
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Record:
    """One image's annotations, parsed (no pixels)."""

    image_id: int
    file: Path
    width: int | None = None
    height: int | None = None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    segmentations: list | None = None  # per instance: COCO polygons / RLE, in pixels
    mask_file: Path | None = None  # instance-id PNG or semantic index PNG
    source: Path | None = None  # the annotation file this record came from (for messages)
    ann_ids: list[int] = field(default_factory=list)


class Problems:
    """Counts repairs and problems of one dataset, and reports them once, in one line.

    ``add(kind, file)`` counts one occurrence in one image: ``raccoon: 3 boxes clipped, 1 box dropped
    (zero area) in 2 images``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()
        self.files: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, file: str | Path | None = None, n: int = 1) -> None:
        self.counts[kind] += n
        if file is not None:
            self.files[kind].append(str(file))

    def __bool__(self) -> bool:
        return bool(self.counts)

    def images(self) -> int:
        return len({f for files in self.files.values() for f in files})

    def summary(self) -> str:
        parts = [f"{n} {kind}" for kind, n in self.counts.most_common()]
        where = f" in {self.images()} images" if self.files else ""
        return f"{self.name}: {', '.join(parts)}{where}"

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {kind: {"count": n, "examples": self.files.get(kind, [])[:5]} for kind, n in self.counts.items()}

    def report(self) -> None:
        if self.counts:
            log.warning(self.summary())


def box_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """A filled box as an H x W uint8 mask: the best mask an instance without a segmentation has."""
    mask = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = np.round(box).astype(int)
    mask[max(y1, 0):y2, max(x1, 0):x2] = 1
    return mask


def instance_masks_from_ids(ids: np.ndarray) -> np.ndarray:
    """An instance-id map (0 background, 1..N) as N x H x W uint8 masks, in id order."""
    instances = np.unique(ids[ids > 0])
    return (ids[None] == instances[:, None, None]).astype(np.uint8)


def to_uint8_rgb(arr: np.ndarray, what: str = "image") -> np.ndarray:
    """H x W (x 1/3/4) of any numeric type -> H x W x 3 uint8: integers scaled by their type's range (16-bit:
    / 257), floats taken as 0..1 (a float image outside 0..1 raises :class:`DataError`)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise DataError(f"{what}: expected an H x W x 3 image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return np.ascontiguousarray(arr.astype(np.uint8) * 255)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1):
            raise DataError(f"{what}: float images must hold values in 0..1 (found {np.nanmin(arr):.3g}.."
                            f"{np.nanmax(arr):.3g})")
        return np.ascontiguousarray(np.round(np.nan_to_num(arr) * 255).astype(np.uint8))
    if np.issubdtype(arr.dtype, np.integer):
        top = 65535 if arr.dtype.itemsize == 2 or (arr.size and arr.max() > 255) else 255
        if arr.dtype.itemsize > 2 and arr.size and arr.max() > 65535:
            top = int(np.iinfo(arr.dtype).max)
        return np.ascontiguousarray(np.round(arr.astype(np.float64) * (255.0 / top)).clip(0, 255).astype(np.uint8))
    raise DataError(f"{what}: unsupported pixel type {arr.dtype}")


def read_image(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as H x W x 3 uint8 RGB; a missing, corrupt or truncated file raises :class:`DataError`, and so
    does one whose header claims more than ``max_pixels`` pixels (default: Pillow's limit), before decoding."""
    try:
        with open_image(path, max_pixels) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / 32-bit grey: PIL's RGB would clip to 255
                return to_uint8_rgb(np.asarray(im), str(path))
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def read_label_png(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an index/instance-id PNG as H x W integers (palette indices, not colours); over ``max_pixels`` pixels
    (default: Pillow's limit) it is refused before decoding."""
    try:
        with open_image(path, max_pixels) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(f"{path}: expected a single-channel index PNG, got mode {im.mode}")
            im.load()
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode mask ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def safe_join(root: Path, name: str, what: str = "file_name") -> Path:
    """``root / name``, refusing names that escape ``root`` (``../../x.jpg``, absolute paths)."""
    normalized = os.path.normpath(name)
    if os.path.isabs(name) or normalized == ".." or normalized.startswith(".." + os.sep):
        raise DataError(f"{what} {name!r} escapes the image folder {root}: refused")
    return root / normalized  # symlinks inside the folder are fine: the check is on the name


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_split(path: str | Path | None) -> list[str] | None:
    """A split file: one image id / file stem per line (``#`` comments and blank lines ignored)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not ids:
        raise DataError(f"{path}: split file lists no images")
    return ids


def resolve_classes(value: Any) -> tuple[list[str], list[Any]] | None:
    """Class names and their original ids from config: a list of names (ids = positions), a mapping
    ``{id: name}``, or a path to a YAML file (with ``names:`` or ``classes:``) or a text file (one name a line).
    """
    if value is None:
        return None
    if isinstance(value, str | os.PathLike):
        path = Path(value)
        if not exists(path):
            raise DataError(f"classes file not found: {show(str(path))}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except (yaml.YAMLError, ValueError, RecursionError) as e:
                raise DataError(f"{path}: malformed YAML ({' '.join(str(e).split())[:120]})") from None
            data = data.get("names", data.get("classes")) if isinstance(data, dict) else data
            if data is None:
                raise DataError(f"{path}: no 'names' or 'classes' key")
            if not isinstance(data, Mapping | list):  # a string would be read as another file
                raise DataError(f"{path}: names = {show(data)}: expected a list or a mapping")
            return resolve_classes(data)
        return resolve_classes([line.strip() for line in text.splitlines() if line.strip()])
    if isinstance(value, Mapping):
        items = [(int_key(k), str(v)) for k, v in value.items()]
        if len({type(k) for k, _ in items}) > 1:
            raise DataError(f"classes mapping mixes number and name keys: {list(value)[:6]}")
        items.sort()
        return [name for _, name in items], [k for k, _ in items]
    if isinstance(value, Sequence):
        names = [str(v) for v in value]
        if len(set(names)) != len(names):
            raise DataError(f"classes list has duplicates: {names}")
        return names, list(range(len(names)))
    raise DataError(f"classes: expected a list, a mapping or a file, got {type(value).__name__}")


class DetectionDataset(Dataset):
    """Base of all readers. Subclasses fill ``records``, ``classes`` and ``cat_ids`` in ``__init__``.

    ``classes[i]`` is the name of contiguous label ``i + 1`` and ``cat_ids[i]`` its id in the dataset's own
    annotations (COCO category id, VOC name, YOLO class index), so predictions can be written back.
    ``transform`` (optional) maps a sample to a sample (see :mod:`detkit.data.transforms`). A transform whose
    ``extra_samples`` is positive (a pipeline with a Mosaic) is called as ``transform(sample, extras)`` with that
    many other raw samples (:meth:`load_extras`).
    """

    task = "detection"
    ignore_index: int = 255

    def __init__(self, name: str, transform=None, max_pixels: int | None = None) -> None:
        self.name = name
        self.transform = transform
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                       or max_pixels <= 0):
            raise ConfigError(f"data.max_image_pixels = {max_pixels!r}: expected a positive integer (or null: "
                              "Pillow's limit)")
        self.max_pixels = max_pixels  # images (and masks) whose header claims more are skipped, before decoding
        self.records: list[Record] = []
        self.classes: list[str] = []
        self.cat_ids: list[Any] = []
        self.problems = Problems(name)
        self.extras_skipped = 0  # unreadable images drawn as a mosaic's extra samples (in this process)
        # the epoch's augmentation seed (set by the data module): each sample's augmentations are then a function of
        # (seed, index), whichever worker loads it and whatever was loaded before
        self.augment_seed: int | None = None

    # ---- class maps
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label_to_cat(self, label: int) -> Any:
        return self.cat_ids[int(label) - 1]

    def cat_to_label(self) -> dict[Any, int]:
        return {c: i + 1 for i, c in enumerate(self.cat_ids)}

    # ---- images and boxes
    def image_header(self, file: Path) -> tuple[int, int] | None | bool:
        """``(width, height)`` from ``file``'s header (never decoded); ``None`` when the header cannot be read (the
        image then fails, counted, when it is loaded); ``False`` when it claims more pixels than the limit: the
        caller skips the image, counted here."""
        try:
            return header_size(file, self.max_pixels)
        except ImageTooLarge:
            self.count_too_large(file)
            return False

    def count_too_large(self, file: Path) -> None:
        """Count an image (or mask) skipped because its header claims more pixels than the limit."""
        self.problems.add(f"images skipped (over {pixel_limit(self.max_pixels)} pixels)", file)

    def clean_boxes(self, boxes: np.ndarray, width: int | None, height: int | None, file: Path) -> np.ndarray:
        """Keep-mask of valid boxes; clips boxes to the image in place. Every repair is counted. Work in float64
        (a finite 1e300 would overflow float32) and cast once the boxes are clipped."""
        keep = np.ones(len(boxes), bool)
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            if not np.all(np.isfinite(boxes[i])):
                self.problems.add("boxes dropped (not finite)", file)
                keep[i] = False
                continue
            if x2 < x1 or y2 < y1:
                self.problems.add("boxes dropped (x2 < x1 or y2 < y1)", file)
                keep[i] = False
                continue
            if width is not None and height is not None:
                if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
                    self.problems.add("boxes dropped (outside the image)", file)
                    keep[i] = False
                    continue
                clipped = np.clip(boxes[i], 0, [width, height, width, height])
                if np.abs(clipped - boxes[i]).max() > CLIP_TOLERANCE:  # sub-pixel overshoot is rounding, not a problem
                    self.problems.add("boxes clipped", file)
                boxes[i] = clipped
            elif np.abs(boxes[i]).max() > FLOAT32_MAX:  # unclipped (no image size): would be inf as float32
                self.problems.add("boxes dropped (coordinates beyond float32)", file)
                keep[i] = False
                continue
            x1, y1, x2, y2 = boxes[i].astype(np.float32)  # positive area as the samples will hold it
            if x2 - x1 <= 0 or y2 - y1 <= 0:
                self.problems.add("boxes dropped (zero area)", file)
                keep[i] = False
        return keep

    # ---- samples
    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict[str, Any]:
        """The raw sample of record ``index`` (no transform). Raises :class:`DataError` for a bad image."""
        r = self.records[index]
        image = read_image(r.file, self.max_pixels)
        h, w = image.shape[:2]
        sample: dict[str, Any] = {
            "image": image,
            "boxes": r.boxes.copy(),
            "labels": r.labels.copy(),
            "iscrowd": r.iscrowd.copy(),
            "difficult": r.difficult.copy(),
            "image_id": r.image_id,
            "orig_size": (h, w),
            "file": str(r.file),
        }
        if r.width is not None and (r.width, r.height) != (w, h):
            raise DataError(f"{r.file}: image is {w}x{h} but {r.source or 'its annotation'} says {r.width}x{r.height}")
        self.add_masks(sample, r)
        return sample

    def add_masks(self, sample: dict[str, Any], record: Record) -> None:
        """Subclasses with masks add ``masks`` and/or ``semantic``."""

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """A transformed sample, or ``None`` for an image that cannot be read (the collate counts it)."""
        try:
            sample = self.load(index)
        except DataError as e:
            log.warning("skipping %s", e)
            return {"skipped": str(e)}
        if self.transform is None:
            return sample
        if self.augment_seed is not None and hasattr(self.transform, "reseed"):
            self.transform.reseed(sample_seed(self.augment_seed, index))
        need = int(getattr(self.transform, "extra_samples", 0) or 0)
        if need > 0:
            return self.transform(sample, self.load_extras(index, need, getattr(self.transform, "rng", None)))
        return self.transform(sample)

    def load_extras(self, index: int, n: int, rng: np.random.Generator | None = None) -> list[dict[str, Any]]:
        """``n`` raw samples of random other records (j != ``index``, repeats possible), for a mosaic.

        ``rng`` is the pipeline's generator (re-seeded with albumentations' stream, so the draw is a function of
        (seed, epoch) like every augmentation). An unreadable image is skipped, counted in ``extras_skipped`` and
        another drawn; after ``2 n + 8`` draws fewer are returned (the pipeline fills in copies of the sample).
        A dataset of one image has no others: ``[]``.
        """
        others = len(self) - 1
        if n <= 0 or others <= 0:
            return []
        rng = rng if rng is not None else np.random.default_rng()
        extras: list[dict[str, Any]] = []
        for _ in range(2 * n + 8):
            if len(extras) == n:
                break
            j = int(rng.integers(others))
            j += j >= index  # uniform over the records other than index
            try:
                extras.append(self.load(j))
            except DataError as e:
                self.extras_skipped += 1
                log.warning("mosaic: skipping an extra sample (%d so far): %s", self.extras_skipped, e)
        return extras

    def describe(self) -> str:
        return f"{self.name}: {len(self)} images, {self.num_classes} classes"
