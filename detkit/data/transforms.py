"""albumentations pipelines from config: boxes, instance masks and semantic maps transformed together.

``data.transforms.train`` / ``.val`` is a preset name or a list of albumentations transforms, each a mapping
``{name: <albumentations class>, <its arguments>...}`` (``OneOf``/``SomeOf``/``Sequential`` take a
``transforms:`` list of the same). Presets, for ``data.image_size = S``:

- ``train``: scale jitter (longest side S, then x0.5-1.5), a random SxS crop (padded where smaller), horizontal
  flip, colour jitter. Boxes keeping less than ``min_visibility`` of their area are dropped (and counted).
- ``val``: ``letterbox`` (longest side S, aspect kept; the batch is padded later) or ``stretch`` (SxS).
- ``none``: nothing.

Every pipeline ends with conversion to ``3 x H x W`` uint8 tensors: the model normalises them itself, on its
device (:meth:`detkit.models.Model.preprocess`), so 4x less data crosses from the loader workers. Each sample
records ``scale = (sx, sy)``, the factors from original to network pixels, so that predictions map back with
``x / sx``. Boxes are clipped to the image; boxes that become degenerate are dropped and counted in
``boxes_dropped``. Evaluation pipelines (``train=False``) also keep a sample's untransformed semantic map as
``semantic_orig``: semantic metrics are computed at the original resolution. :func:`pipeline_from_config` builds
the train or validation pipeline of a config (the data module, ``data show`` and the Predictor use it).

Mosaic
------
``{name: Mosaic, p: 0.5}`` in a transform list (albumentations' ``A.Mosaic``, YOLOv4-style 2x2 mosaic) combines
the sample with ``grid cells - 1`` other samples of the dataset. Where the user does not give them,
``target_size`` defaults to ``(image_size, image_size)``, ``cell_shape`` to ``target_size`` and ``fill`` to the grey
:data:`PAD_VALUE` (these defaults apply to a Mosaic anywhere in the list, also inside ``OneOf``);
``fill_mask`` must stay 0 (padding is "unlabeled" / "no instance"). :attr:`Pipeline.extra_samples` says how
many other samples the pipeline wants; :class:`~detkit.data.dataset.DetectionDataset` loads that many *raw*
samples (random other indices, drawn from :attr:`Pipeline.rng`, which :meth:`Pipeline.reseed` re-seeds
together with albumentations' stream, so augmentations stay a function of (seed, epoch)) and passes them as
``pipeline(sample, extras)``. A dataset of one image, or too few readable extras, fills the mosaic with copies
of the sample. Transforms *before* the Mosaic apply to the primary sample only (the extras enter raw).

Through a mosaic every target stays consistent: boxes with their labels/iscrowd/difficult (each sample's
instances get distinct ids), semantic maps (padding unlabeled), and instance masks, which travel as one
``H x W x L`` uint8 mask target of *layers*: each layer is an id map of non-overlapping instances (value
1..255), so that any number of instances fits in a few channels (OpenCV handles at most 128 channels) and
nearest-neighbour resampling (albumentations' default ``mask_interpolation``; keep it) carries them exactly.
The output's ``orig_size``/``image_id``/``file`` are the primary sample's; ``scale`` stays output size /
the primary's original size, which for a mosaic maps nothing back (training never maps back; mosaic is for
training lists only). ``boxes_dropped`` counts the boxes of all combined samples that did not survive; the
cells crop boxes regardless of ``min_visibility``, so in a pipeline with a Mosaic boxes thinner than 1 pixel are
dropped as well.
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

from detkit.data.dataset import SEMANTIC_IGNORE, box_mask
from detkit.errors import ConfigError

PRESETS = ("train", "val", "none")
PAD_VALUE = 114  # grey padding, as most detectors use
CONTAINERS = ("OneOf", "SomeOf", "Sequential", "OneOrOther", "SelectiveChannelTransform")
INSTANCE_FIELDS = ("labels", "iscrowd", "difficult")  # per-instance values that follow the boxes
MAX_LAYER_IDS = 255  # instances per uint8 mask layer (0 = none) when instance masks travel through a mosaic


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


def build_transform(spec: Mapping, where: str,
                    defaults: Mapping[str, Mapping[str, Any]] | None = None) -> A.BasicTransform:
    """One albumentations transform from ``{name: ..., **arguments}``.

    ``defaults``: per transform name, arguments used where the spec does not give them (applied to nested
    transforms too), e.g. ``{"Mosaic": {"target_size": (512, 512)}}``.
    """
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
        params["transforms"] = [build_transform(t, f"{where}.transforms[{i}]", defaults)
                                for i, t in enumerate(inner)]
    given = set(params)
    params = {**dict((defaults or {}).get(name, {})), **params}
    if name == "Mosaic" and "target_size" in given and "cell_shape" not in given:
        params["cell_shape"] = params["target_size"]  # cells as large as the output, whatever its size
    if name == "Mosaic" and _nonzero(params.get("fill_mask", 0)):
        raise ConfigError(f"{where}: bad arguments for Mosaic: fill_mask must be 0 (padding is unlabeled and "
                          f"belongs to no instance), got {params['fill_mask']!r}")
    try:
        return cls(**params)
    except Exception as e:  # TypeError for unknown arguments, pydantic's ValidationError for bad values
        first = str(e).strip().splitlines()
        reason = " ".join(line.strip() for line in first[:3]) if first else type(e).__name__
        raise ConfigError(f"{where}: bad arguments for {name}: {reason}") from None


def _nonzero(value: Any) -> bool:
    try:
        return bool(np.any(np.asarray(value, dtype=np.float64) != 0))
    except (TypeError, ValueError):
        return False  # not a number: albumentations' own validation says so


def find_mosaics(transforms: Sequence[Any]) -> list[A.Mosaic]:
    """The ``A.Mosaic`` transforms in a list, also inside compositions (``OneOf`` ...)."""
    found = []
    for t in transforms:
        if isinstance(t, A.Mosaic):
            found.append(t)
        elif isinstance(t, A.BaseCompose):
            found += find_mosaics(t.transforms)
    return found


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
    """A sample -> sample callable: albumentations transforms, then tensors (images uint8)."""

    def __init__(self, transforms: Sequence[A.BasicTransform], min_visibility: float = 0.0,
                 keep_original: bool = False) -> None:
        self.transforms = list(transforms)
        self.keep_original = keep_original  # eval: semantic maps are scored at the original resolution
        with warnings.catch_warnings():  # an empty list ("none") has no transform to process boxes: fine
            warnings.filterwarnings("ignore", message="Got processor for bboxes")
            self.mosaics = find_mosaics(self.transforms)
            # a mosaic's cells crop boxes without min_visibility: drop the sub-pixel slivers they leave at least
            thin = {"min_width": 1.0, "min_height": 1.0} if self.mosaics else {}
            self.compose = A.Compose(
                self.transforms,
                bbox_params=A.BboxParams(format="pascal_voc", label_fields=["instance"],
                                         min_visibility=min_visibility, min_area=1.0, clip=True, **thin),
            )
        # the other samples a mosaic combines with the sample: drawn by the dataset from this generator
        self.rng = np.random.default_rng()

    @property
    def extra_samples(self) -> int:
        """How many other (raw) samples each call wants: grid cells - 1 of its largest Mosaic (0 without one)."""
        return max((int(np.prod(m.grid_yx)) - 1 for m in self.mosaics), default=0)

    def reseed(self, seed: int) -> None:
        """Restart the augmentations' random stream (albumentations keeps its own, apart from numpy/torch) and
        :attr:`rng`, from which the dataset draws the extra samples of a mosaic."""
        self.compose.set_random_seed(int(seed) % 2**32)
        self.rng = np.random.default_rng(int(seed) % 2**32)

    def __call__(self, sample: dict[str, Any], extras: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        """``extras``: the other raw samples a Mosaic combines with ``sample`` (ignored without a Mosaic)."""
        if self.mosaics:
            return self._call_mosaic(sample, list(extras or []))
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
            inputs["mask"] = shift_semantic(sample["semantic"])
        out = self.compose(**inputs)
        result, kept = self._outputs(sample, out, {k: np.asarray(sample[k]) for k in INSTANCE_FIELDS})
        h, w = result["image"].shape[-2:]
        if has_masks:
            masks = np.asarray(out["masks"]) if n else np.zeros((0, h, w), np.uint8)
            result["masks"] = torch.as_tensor(masks.reshape(-1, h, w)[kept] if n else masks, dtype=torch.uint8)
        if sample.get("semantic") is not None:
            result["semantic"] = unshift_semantic(out["mask"])
            if self.keep_original:
                result["semantic_orig"] = torch.as_tensor(np.asarray(sample["semantic"]), dtype=torch.int64)
        result["scale"] = (w / w0, h / h0)
        result["boxes_dropped"] = int(n - len(kept))
        return result

    def _outputs(self, sample: dict[str, Any], out: dict[str, Any], fields: dict[str, np.ndarray]
                 ) -> tuple[dict[str, Any], np.ndarray]:
        """The transformed sample's image (3 x H x W uint8), boxes and per-instance ``fields`` of the instances that
        survived (``kept``: their ids), on a copy of ``sample``."""
        kept = np.asarray(out["instance"], np.int64).reshape(-1)
        result = dict(sample)
        result["image"] = self._image_tensor(out["image"])
        result["boxes"] = torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4))
        for key, values in fields.items():
            result[key] = torch.as_tensor(values[kept])
        return result, kept

    def _image_tensor(self, img: np.ndarray) -> torch.Tensor:
        """H x W x 3 -> 3 x H x W uint8."""
        img = np.ascontiguousarray(img) if img.flags.writeable else img.copy()  # albumentations may return views
        return torch.from_numpy(img).permute(2, 0, 1).contiguous()

    def _call_mosaic(self, sample: dict[str, Any], extras: list[dict[str, Any]]) -> dict[str, Any]:
        """A pipeline with a Mosaic: all samples' instances get distinct ids (their position in the concatenated
        labels), and instance masks and the semantic map travel together in one ``mask`` target (A.Mosaic
        combines ``mask``, not ``masks``): channel 0 the shifted semantic map (if any), then id-map layers."""
        need = self.extra_samples
        items = [sample, *extras[:need]]
        items += [sample] * (need + 1 - len(items))  # too few extras: copies of the sample, with their own ids
        h0, w0 = sample["image"].shape[:2]
        has_masks = sample.get("masks") is not None
        has_sem = sample.get("semantic") is not None
        boxes = [np.asarray(s["boxes"], np.float32).reshape(-1, 4) for s in items]
        counts = [len(b) for b in boxes]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        sem_ch = 1 if has_sem else 0
        n_layers, table, pieces = _assign_layers(items, boxes) if has_masks else (0, np.zeros((0, 2), np.int64), [])
        masks: list[np.ndarray | None] = [None] * len(items)
        if sem_ch + n_layers:
            g = 0
            for k, (s, b) in enumerate(zip(items, boxes)):
                masks[k] = np.zeros((*s["image"].shape[:2], sem_ch + n_layers), np.uint8)
                if has_sem and s.get("semantic") is not None:  # shifted: 0 unlabeled (and padding), classes 1..K
                    masks[k][..., 0] = shift_semantic(s["semantic"])
                for _ in range(len(b) if has_masks else 0):
                    (window, crop), (layer, value) = pieces[g], table[g]
                    masks[k][(*window, sem_ch + layer)][crop] = value
                    g += 1
        prepared = []
        for k, (s, b) in enumerate(zip(items, boxes)):
            d: dict[str, Any] = {"image": s["image"], "bboxes": b, "instance": np.arange(starts[k], starts[k + 1])}
            if masks[k] is not None:
                d["mask"] = masks[k]
            prepared.append(d)
        for m in self.mosaics:
            m.params = {}  # albumentations leaves the last call's params on a transform: applied <=> non-empty
        out = self.compose(**prepared[0], mosaic_metadata=prepared[1:])
        applied = any(bool(m.params) for m in self.mosaics)
        for m in self.mosaics:
            m.params = {}  # release the cells' arrays
        result, kept = self._outputs(sample, out, {k: np.concatenate([np.asarray(s[k]).reshape(-1) for s in items])
                                                   for k in INSTANCE_FIELDS})
        h, w = result["image"].shape[-2:]
        mask = np.asarray(out["mask"]) if "mask" in out else None
        if mask is not None and mask.ndim == 2:
            mask = mask[..., None]
        if has_masks:
            if len(kept):
                ids = table[kept]
                inst = mask[..., sem_ch + ids[:, 0]].transpose(2, 0, 1) == ids[:, 1, None, None]
            else:
                inst = np.zeros((0, h, w), bool)
            result["masks"] = torch.from_numpy(np.ascontiguousarray(inst, dtype=np.uint8))
        if has_sem:
            result["semantic"] = unshift_semantic(mask[..., 0])
        result["scale"] = (w / w0, h / h0)  # nominal for a mosaic (four images): training never maps back
        result["boxes_dropped"] = int((starts[-1] if applied else counts[0]) - len(kept))
        result["mosaic"] = applied
        return result


def shift_semantic(semantic: np.ndarray) -> np.ndarray:
    """Class indices 0..K-1 -> 1..K and unlabeled -> 0 (uint8), so that padding (filled with 0) is unlabeled."""
    sem = np.asarray(semantic)
    return np.where(sem == SEMANTIC_IGNORE, 0, sem + 1).astype(np.uint8)


def unshift_semantic(mask: np.ndarray) -> torch.Tensor:
    """The inverse of :func:`shift_semantic`, as int64 with ``SEMANTIC_IGNORE`` for unlabeled."""
    sem = np.asarray(mask).astype(np.int64)
    return torch.as_tensor(np.where(sem == 0, SEMANTIC_IGNORE, sem - 1))


def _assign_layers(items: Sequence[dict[str, Any]], boxes: Sequence[np.ndarray],
                   ) -> tuple[int, np.ndarray, list[tuple[tuple[slice, slice], np.ndarray]]]:
    """Pack the instance masks of all ``items`` into uint8 id-map layers: ``(number of layers, table, pieces)``
    with ``table[g] = (layer, value)`` and ``pieces[g] = (window, boolean mask in the window)`` of instance ``g``
    (numbered across items). Instances of one layer never overlap; a layer holds at most :data:`MAX_LAYER_IDS`
    instances, with values unique across items (the items share one canvas). An instance without a mask gets
    its filled box."""
    table, pieces = [], []
    used: list[int] = []  # values taken, per layer
    for s, b in zip(items, boxes):
        hk, wk = s["image"].shape[:2]
        inst = np.asarray(s["masks"]).reshape(len(b), hk, wk) if s.get("masks") is not None and len(b) else None
        occupied: list[np.ndarray] = []  # this item's pixels taken, per layer
        for i in range(len(b)):
            m = inst[i] if inst is not None else box_mask(b[i], hk, wk)
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)) if len(rows) else \
                (slice(0, 0), slice(0, 0))
            crop = m[window] > 0
            layer = 0  # the first layer with room where the instance overlaps none of this item's instances
            while layer < len(used) and (used[layer] >= MAX_LAYER_IDS
                                         or (layer < len(occupied) and (occupied[layer][window] & crop).any())):
                layer += 1
            if layer == len(used):
                used.append(0)
            while len(occupied) <= layer:
                occupied.append(np.zeros((hk, wk), bool))
            occupied[layer][window] |= crop
            used[layer] += 1
            table.append((layer, used[layer]))
            pieces.append((window, crop))
    return len(used), np.asarray(table, np.int64).reshape(-1, 2), pieces


def build_pipeline(spec: Any, *, image_size: int, train: bool, resize: str = "letterbox", min_visibility: float = 0.3,
                   where: str = "data.transforms") -> Pipeline:
    """``spec``: a preset name or a list of transform mappings (see the module docstring)."""
    spec = _plain(spec)
    if spec is None:
        spec = "train" if train else "val"
    if isinstance(spec, str):
        if int(image_size) <= 0:
            raise ConfigError(f"data.image_size = {image_size}: expected a positive size")
        transforms = preset(spec, image_size, resize)
    elif isinstance(spec, list):
        size = (int(image_size), int(image_size))
        defaults = {"Mosaic": {"target_size": size, "cell_shape": size, "fill": PAD_VALUE}} if min(size) > 0 else {}
        transforms = [build_transform(t, f"{where}[{i}]", defaults) for i, t in enumerate(spec)]
    else:
        raise ConfigError(f"{where}: expected a preset name ({', '.join(PRESETS)}) or a list of transforms, "
                          f"got {spec!r}")
    return Pipeline(transforms, min_visibility if train else 0.0, keep_original=not train)


def without_mosaic(spec: Any) -> Any:
    """A transform list with its Mosaic steps left out (also inside ``OneOf`` and the other containers); a
    preset name as it is."""
    spec = _plain(spec)
    if not isinstance(spec, list):
        return spec
    out = []
    for t in spec:
        if isinstance(t, Mapping) and t.get("name") == "Mosaic":
            continue
        if isinstance(t, Mapping) and isinstance(t.get("transforms"), list):
            t = {**t, "transforms": without_mosaic(t["transforms"])}
        out.append(t)
    return out


def pipeline_from_config(data: Any, train: bool, image_size: int | None = None, mosaic: bool = True) -> Pipeline:
    """The pipeline of ``data.transforms.train`` (``train``) or ``data.transforms.val`` with the config's
    ``data.image_size`` (or ``image_size``), ``resize`` and ``min_visibility``: the one builder the data module,
    ``data show`` and the Predictor share, so prediction resizes exactly as validation does. ``mosaic=False``: the
    same without its Mosaic steps (the last epochs of ``train.close_mosaic``)."""
    split = "train" if train else "val"
    spec = data.transforms[split] if mosaic else without_mosaic(data.transforms[split])
    return build_pipeline(spec, image_size=image_size or data.image_size, train=train,
                          resize=data.resize, min_visibility=data.min_visibility, where=f"data.transforms.{split}")
