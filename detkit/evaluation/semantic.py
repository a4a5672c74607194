"""Semantic segmentation metrics from a confusion matrix: mIoU, pixel accuracy, mean class accuracy, mean Dice.

Usage (every rank, for DDP)::

    evaluator = SemanticEvaluator(num_classes=len(classes), class_names=classes)
    for batch in loader:
        evaluator.update(label_maps, target_maps, image_ids)  # H x W class indices per image
    evaluator.gather()             # all ranks: every rank then holds every image's confusion
    metrics = evaluator.compute()  # {"mIoU": ..., "pixel_acc": ..., "per_class": {...}, "images": n}

Class indices are 0..K-1; target pixels equal to ``ignore_index`` (255, ``SEMANTIC_IGNORE``, by default) are
unlabeled and count nowhere. The K x K confusion matrix has the ground truth in rows and the prediction in
columns; for class k, TP is ``cm[k, k]``, FP the rest of column k, FN the rest of row k, and

- IoU = TP / (TP + FP + FN), Dice = 2 TP / (2 TP + FP + FN), class accuracy (recall) = TP / (TP + FN),
- pixel accuracy = sum of TP / all labelled pixels.

Absent-class rule: a class with TP + FP + FN == 0 (in neither the ground truth nor the prediction) has IoU and
Dice ``None`` and is left out of mIoU and mean Dice; a class absent from the ground truth but predicted somewhere
has IoU and Dice 0 and counts in both means. A class's accuracy is ``None`` when it has no ground-truth pixels, and
``mean_class_acc`` averages the classes that have some. With no labelled pixels at all every value is ``None``.

The evaluator keeps one confusion per image id, first copy wins, as
:class:`~detkit.evaluation.evaluator.DetectionEvaluator` does: an image seen twice (DistributedSampler's padding
repeats images) counts once, so metrics under DDP equal the 1-process ones exactly. Per-image confusions are
stored sparsely (the nonzero cells' flat indices and counts), so K = 133 over thousands of images stays small.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detkit.data.dataset import SEMANTIC_IGNORE
from detkit.evaluation.distributed import gather_first_copy
from detkit.evaluation.table import format_semantic_table

__all__ = ["SemanticEvaluator", "confusion_matrix", "semantic_metrics"]


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int | None = SEMANTIC_IGNORE
                     ) -> torch.Tensor:
    """The ``num_classes`` x ``num_classes`` int64 confusion matrix of two label maps (rows: ground truth,
    columns: prediction), counted with one :func:`torch.bincount` on the device of the inputs.

    ``pred`` and ``target``: tensors or numpy arrays of one shape (any) and any integer dtype. Pixels whose
    target equals ``ignore_index`` (``None``: no ignore value) are left out. Every other target value and every
    prediction value (ignored pixels included) must lie in 0..K-1; else a ``ValueError`` names the value."""
    num_classes = _check_num_classes(num_classes)
    pred, target = _as_labels(pred, "pred"), _as_labels(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1), target.reshape(-1).to(pred.device)
    if ignore_index is not None:
        keep = target != ignore_index
        target = target[keep]
    _check_range(pred, num_classes, "pred")
    _check_range(target, num_classes, "target", ignore_index)
    if ignore_index is not None:
        pred = pred[keep]
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def semantic_metrics(cm: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of a K x K confusion matrix (rows: ground truth, columns: prediction; a tensor or an array):
    ``mIoU``, ``pixel_acc``, ``mean_class_acc``, ``dice`` (mean Dice), and per class (keyed by ``class_names``,
    default ``str(index)``) ``per_class`` (IoU), ``per_class_acc`` (recall) and ``per_class_dice``. Values are
    plain floats in [0, 1] or ``None``, by the absent-class rule of this module's docstring."""
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"confusion matrix shape {cm.shape}: expected K x K with K >= 1")
    if not (np.issubdtype(cm.dtype, np.integer) or np.issubdtype(cm.dtype, np.floating)):
        raise ValueError(f"confusion matrix dtype {cm.dtype}: expected numeric counts")
    if (cm < 0).any():
        raise ValueError(f"confusion matrix has a negative count {cm.min()}")
    names = _class_names(class_names, cm.shape[0])
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    gt = cm.sum(axis=1)  # TP + FN
    predicted = cm.sum(axis=0)  # TP + FP
    union = gt + predicted - tp  # TP + FP + FN
    iou = [float(tp[k] / union[k]) if union[k] > 0 else None for k in range(len(names))]
    dice = [float(2 * tp[k] / (gt[k] + predicted[k])) if union[k] > 0 else None for k in range(len(names))]
    acc = [float(tp[k] / gt[k]) if gt[k] > 0 else None for k in range(len(names))]
    total = cm.sum()
    return {
        "mIoU": _mean(iou),
        "pixel_acc": float(tp.sum() / total) if total > 0 else None,
        "mean_class_acc": _mean(acc),
        "dice": _mean(dice),
        "per_class": dict(zip(names, iou)),
        "per_class_acc": dict(zip(names, acc)),
        "per_class_dice": dict(zip(names, dice)),
    }


class SemanticEvaluator:
    """Collects per-image confusion matrices of semantic label maps (one process or DDP) and computes
    :func:`semantic_metrics` over them; the interface of :class:`~detkit.evaluation.evaluator.DetectionEvaluator`
    (``reset``, ``update``, ``gather``, ``compute``, ``len``)."""

    format_table = staticmethod(format_semantic_table)

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None,
                 ignore_index: int | None = SEMANTIC_IGNORE) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.class_names = _class_names(class_names, self.num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget every image."""
        self._entries: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
        self._repeated = 0

    def __len__(self) -> int:
        """Distinct images held."""
        return len(self._entries)

    def update(self, predictions: Sequence[Any], targets: Sequence[Any], image_ids: Iterable[Any]) -> None:
        """Add one batch: per image a predicted H x W label map (class indices 0..K-1), its target of the same
        shape (``ignore_index`` for unlabeled pixels), and its id. An id already held is skipped (and counted in
        ``_repeated``): the first copy wins."""
        image_ids = [_plain(i) for i in image_ids]
        if not len(predictions) == len(targets) == len(image_ids):
            raise ValueError(f"update: {len(predictions)} predictions, {len(targets)} targets "
                             f"and {len(image_ids)} image ids")
        for pred, target, image_id in zip(predictions, targets, image_ids):
            if image_id in self._entries:
                self._repeated += 1
                continue
            flat = confusion_matrix(pred, target, self.num_classes, self.ignore_index).reshape(-1).cpu().numpy()
            cells = np.flatnonzero(flat)
            self._entries[image_id] = (cells.astype(np.int32), flat[cells])

    def add_batch(self, predictions: Sequence[Any], targets: Sequence[Any]) -> None:
        """The :class:`~detkit.evaluation.metrics.Evaluator` step: a batch's label maps against its targets'
        original-resolution ``semantic_orig`` maps."""
        self.update([p["semantic"].cpu() for p in predictions], [t["semantic_orig"] for t in targets],
                    [int(t["image_id"]) for t in targets])

    def save_plots(self, folder: str | Path) -> Path:
        """The confusion matrix as ``folder/confusion_matrix.png``."""
        return self.plot_confusion_matrix(Path(folder) / "confusion_matrix.png")

    def gather(self) -> None:
        """Under ``torch.distributed`` with more than one process, share every rank's per-image confusions (call
        it on all ranks), keeping one copy per image (the lowest rank's). A no-op otherwise."""
        gathered = gather_first_copy(self._entries)
        if gathered is not None:
            self._entries, repeated, _ = gathered
            self._repeated += repeated

    @property
    def confusion(self) -> torch.Tensor:
        """The K x K int64 confusion matrix summed over the images held (rows: ground truth, columns: prediction)."""
        flat = np.zeros(self.num_classes * self.num_classes, np.int64)
        for cells, counts in self._entries.values():
            flat[cells] += counts  # the cells of one image are distinct
        return torch.from_numpy(flat.reshape(self.num_classes, self.num_classes))

    def compute(self, only_seen: bool = False) -> dict[str, Any]:
        """:func:`semantic_metrics` of :attr:`confusion` plus ``images`` (the number of distinct images).

        ``only_seen`` is accepted for parity with ``DetectionEvaluator.compute`` and changes nothing: semantic
        metrics always cover exactly the images seen (an image never updated has no pixels to count)."""
        del only_seen
        metrics = semantic_metrics(self.confusion, self.class_names)
        metrics["images"] = len(self)
        return metrics

    def plot_confusion_matrix(self, path: str | Path) -> Path:
        """The row-normalised confusion matrix (each ground-truth row sums to 1; rows without ground truth are
        grey) as a PNG at ``path``, class names on the axes; matplotlib's Agg canvas, pyplot's global state is
        not touched. Returns the path."""
        from matplotlib import colormaps
        from matplotlib.figure import Figure

        cm = self.confusion.numpy().astype(np.float64)
        rows = cm.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            normalised = np.where(rows > 0, cm / rows, np.nan)
        k = self.num_classes
        size = min(4.5 + 0.25 * k, 36.0)  # inches: 0.25 a class, at most 36
        font = 8 if k <= 40 else 6
        big = max(10.0, size / 3)  # title and axis labels grow with the figure
        fig = Figure(figsize=(size + 1.0, size), dpi=100)
        ax = fig.add_subplot()
        cmap = colormaps["Blues"].with_extremes(bad="0.85")
        image = ax.imshow(normalised, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ticks = np.arange(k)
        ax.set_xticks(ticks, [str(n) for n in self.class_names], rotation=90, fontsize=font)
        ax.set_yticks(ticks, [str(n) for n in self.class_names], fontsize=font)
        if k <= 20:
            for (i, j), value in np.ndenumerate(normalised):
                if value >= 0.005:
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=font - 1,
                            color="white" if value > 0.5 else "black")
        miou = semantic_metrics(cm, self.class_names)["mIoU"]
        ax.set_xlabel("predicted", fontsize=big)
        ax.set_ylabel("ground truth", fontsize=big)
        ax.set_title(f"confusion matrix (row-normalised), {len(self)} image{'' if len(self) == 1 else 's'}\n"
                     f"mIoU = {'-' if miou is None else f'{miou:.3f}'}", fontsize=big)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
        return out


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes {num_classes!r}: expected an integer >= 1")
    return int(num_classes)


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(k) for k in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"class_names: {len(names)} names for {num_classes} classes")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class_names: duplicate {duplicates[0]!r}")
    return names


def _as_labels(values: Any, what: str) -> torch.Tensor:
    """An int64 tensor of ``values`` (a tensor or an array of an integer dtype)."""
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise ValueError(f"{what} dtype {values.dtype}: expected integer class indices")
        return values.long()
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} dtype {array.dtype}: expected integer class indices")
    return torch.from_numpy(array.astype(np.int64))


def _check_range(values: torch.Tensor, num_classes: int, what: str, ignore_index: int | None = None) -> None:
    bad = (values < 0) | (values >= num_classes)
    if bool(bad.any()):
        value = int(values[bad][0])
        extra = f" (nor ignore_index {ignore_index})" if ignore_index is not None else ""
        raise ValueError(f"{what} has value {value} outside the classes 0..{num_classes - 1}{extra}")


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(sum(present) / len(present)) if present else None


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
