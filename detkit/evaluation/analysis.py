"""Why a detector is wrong, not only its AP: a confusion matrix with a background row and column, precision /
recall / F1 against the score threshold (the best threshold per class), and a TIDE-style breakdown of the AP lost
to each kind of error.

Every function takes the COCO ground-truth dict (category ids 1..K, as :func:`dataset_to_coco` makes it; ``iscrowd``
and ``difficult`` objects are ignored: neither a miss nor a match target) and the detections as COCO results
(``image_id``, ``category_id``, ``bbox`` xywh, ``score``).

**Confusion matrix** (``K + 1`` square, rows = ground truth, columns = prediction, the last row/column is
background): detections above ``score_thresh`` are matched to objects greedily by descending IoU (class-agnostic,
IoU >= ``iou_thresh``, each object and detection once); a match counts ``[object class, detection class]``, an
unmatched object ``[class, background]`` (missed), an unmatched detection ``[background, class]`` (a false alarm).

**Thresholds**: per class, detections by descending score, each a true positive when it matches a not yet matched
object of its class at IoU >= ``iou_thresh`` (the VOC rule); precision, recall and F1 after each detection; the
best threshold is the score where F1 peaks (ties: the higher score).

**TIDE-style breakdown** (Bolya et al. 2020) at IoU 0.5 (foreground) / 0.1 (background): each false positive is a
*classification* error (IoU >= 0.5 with an object of another class), *localisation* error (right class, 0.1 <= IoU
< 0.5), *both* (another class, 0.1 <= IoU < 0.5), *duplicate* (right class, IoU >= 0.5, object already taken by a
higher score) or *background* (IoU < 0.1 with every object); an object no detection found is *missed*. Each error's
``dAP`` is how much AP50 (mean over classes) rises when that kind alone is fixed by an oracle: a classification
error gets the right class, a localisation error the object's box, duplicates and background detections are
removed, *both* is removed, and missed objects are added as perfect detections at the top score.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detkit.evaluation.voc import voc_ap

ERROR_KINDS = ("classification", "localisation", "both", "duplicate", "background", "missed")


def _xyxy(b: Sequence[float]) -> np.ndarray:
    x, y, w, h = (float(v) for v in b)
    return np.array([x, y, x + w, y + h])


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes ``a [N, 4]`` and ``b [M, 4]``."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def _by_image(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]]):
    """Per image: (object boxes, classes, ignored flags), (detection boxes, classes, scores)."""
    objects: dict[Any, list] = {img["id"]: [] for img in gt["images"]}
    for a in gt["annotations"]:
        objects.setdefault(a["image_id"], []).append(a)
    dets: dict[Any, list] = {}
    for r in results:
        dets.setdefault(r["image_id"], []).append(r)
    for image_id in objects.keys() | dets.keys():
        obj = objects.get(image_id, [])
        ob = np.array([_xyxy(a["bbox"]) for a in obj]).reshape(-1, 4)
        oc = np.array([int(a["category_id"]) for a in obj], dtype=int)
        ignored = np.array([bool(a.get("iscrowd")) or bool(a.get("difficult")) for a in obj], dtype=bool)
        det = sorted(dets.get(image_id, []), key=lambda r: -float(r["score"]))
        db = np.array([_xyxy(r["bbox"]) for r in det]).reshape(-1, 4)
        dc = np.array([int(r["category_id"]) for r in det], dtype=int)
        ds = np.array([float(r["score"]) for r in det])
        yield image_id, (ob, oc, ignored), (db, dc, ds)


def confusion_matrix(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], num_classes: int,
                     iou_thresh: float = 0.5, score_thresh: float = 0.25) -> np.ndarray:
    """``(K + 1) x (K + 1)`` counts (see the module docstring); index K is background, class k is index k - 1."""
    k = num_classes
    cm = np.zeros((k + 1, k + 1), dtype=np.int64)
    for _, (ob, oc, ignored), (db, dc, ds) in _by_image(gt, results):
        keep = ds >= score_thresh
        db, dc = db[keep], dc[keep]
        ob, oc = ob[~ignored], oc[~ignored]
        iou = _iou(ob, db)
        taken_o, taken_d = set(), set()
        for o, d in sorted(zip(*np.nonzero(iou >= iou_thresh)), key=lambda od: -iou[od]):
            if o not in taken_o and d not in taken_d:
                taken_o.add(o)
                taken_d.add(d)
                cm[oc[o] - 1, dc[d] - 1] += 1
        for o in set(range(len(ob))) - taken_o:
            cm[oc[o] - 1, k] += 1
        for d in set(range(len(db))) - taken_d:
            cm[k, dc[d] - 1] += 1
    return cm


def _class_matches(gt, results, iou_thresh: float) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """Per class: (scores, true-positive flags) of its detections in descending score order, and its object count
    (ignored objects neither count nor make a detection false)."""
    per: dict[int, list] = {}
    counts: dict[int, int] = {}
    for _, (ob, oc, ignored), (db, dc, ds) in _by_image(gt, results):
        for c in set(oc.tolist()) | set(dc.tolist()):
            o, d = oc == c, dc == c
            counts[c] = counts.get(c, 0) + int((o & ~ignored).sum())
            iou = _iou(db[d], ob[o])
            ign = ignored[o]
            taken = np.zeros(int(o.sum()), dtype=bool)
            for i, s in enumerate(ds[d]):  # already in descending score order
                cand = np.where(iou[i] >= iou_thresh)[0] if iou.size else np.array([], dtype=int)
                free = [j for j in cand[np.argsort(-iou[i][cand])] if not taken[j] or ign[j]]
                if free and ign[free[0]]:
                    continue  # matches an ignored object: neither true nor false
                if free:
                    taken[free[0]] = True
                per.setdefault(c, []).append((s, bool(free)))
    out = {}
    for c in counts.keys() | per.keys():
        rows = sorted(per.get(c, []), key=lambda r: -r[0])
        out[c] = (np.array([r[0] for r in rows]), np.array([r[1] for r in rows], dtype=bool), counts.get(c, 0))
    return out


def threshold_curves(gt, results, class_names: Sequence[str], iou_thresh: float = 0.5) -> dict[str, Any]:
    """Per class: score thresholds with precision, recall, F1, and the best threshold (peak F1)."""
    curves = {}
    for c, (scores, tp, n) in sorted(_class_matches(gt, results, iou_thresh).items()):
        if not len(scores) or n == 0:
            curves[class_names[c - 1]] = {"best_threshold": None, "best_f1": None}
            continue
        ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
        precision, recall = ctp / (ctp + cfp), ctp / n
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f1))  # the first peak: the highest such threshold
        curves[class_names[c - 1]] = {"thresholds": scores.tolist(), "precision": precision.tolist(),
                                      "recall": recall.tolist(), "f1": f1.tolist(),
                                      "best_threshold": float(scores[best]), "best_f1": float(f1[best])}
    return curves


def _ap50(gt, results, num_classes: int) -> float:
    aps = []
    for _, tp, n in _class_matches(gt, results, 0.5).values():
        if n == 0:
            continue
        ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
        aps.append(voc_ap(ctp / n, ctp / np.maximum(ctp + cfp, 1e-12)) if len(tp) else 0.0)
    return float(np.mean(aps)) if aps else 0.0


def classify_errors(gt, results, fg: float = 0.5, bg: float = 0.1) -> tuple[list[str | None], list[tuple]]:
    """Each detection's error kind (None for a true positive), and the missed objects ``(image_id, box xywh, class)``.
    Detections are taken per image in descending score order (the duplicate rule needs it)."""
    kinds: dict[int, str | None] = {}
    missed = []
    index = {id(r): i for i, r in enumerate(results)}
    dets_by_image: dict[Any, list] = {}
    for r in results:
        dets_by_image.setdefault(r["image_id"], []).append(r)
    objects: dict[Any, list] = {}
    for a in gt["annotations"]:
        objects.setdefault(a["image_id"], []).append(a)
    for image_id in {img["id"] for img in gt["images"]} | dets_by_image.keys():
        obj = [a for a in objects.get(image_id, []) if not (a.get("iscrowd") or a.get("difficult"))]
        ob = np.array([_xyxy(a["bbox"]) for a in obj]).reshape(-1, 4)
        oc = np.array([int(a["category_id"]) for a in obj], dtype=int)
        det = sorted(dets_by_image.get(image_id, []), key=lambda r: -float(r["score"]))
        iou = _iou(np.array([_xyxy(r["bbox"]) for r in det]).reshape(-1, 4), ob)
        taken = np.zeros(len(obj), dtype=bool)
        for i, r in enumerate(det):
            c = int(r["category_id"])
            same = oc == c
            best_same = iou[i][same].max() if same.any() else 0.0
            best_any = iou[i].max() if len(obj) else 0.0
            candidates = np.flatnonzero(same & (iou[i] >= fg)) if len(obj) else np.array([], dtype=int)
            free = [k for k in candidates if not taken[k]]
            if free:  # a true positive: the best overlapping object of its class not yet taken
                taken[max(free, key=lambda k: iou[i][k])] = True
                kinds[index[id(r)]] = None
            elif len(candidates):
                kinds[index[id(r)]] = "duplicate"
            elif best_any >= fg:
                kinds[index[id(r)]] = "classification"
            elif best_same >= bg:
                kinds[index[id(r)]] = "localisation"
            elif best_any >= bg:
                kinds[index[id(r)]] = "both"
            else:
                kinds[index[id(r)]] = "background"
        missed += [(image_id, obj[k]["bbox"], int(oc[k])) for k in np.flatnonzero(~taken)]
    return [kinds.get(i) for i in range(len(results))], missed


def error_breakdown(gt, results, num_classes: int, fg: float = 0.5, bg: float = 0.1) -> dict[str, Any]:
    """``{"AP50": ..., "dAP": {kind: AP50 gain when that kind alone is fixed}, "counts": {kind: n}}``."""
    results = [dict(r) for r in results]
    kinds, missed = classify_errors(gt, results, fg, bg)
    base = _ap50(gt, results, num_classes)
    boxes: dict[Any, list] = {}
    for a in gt["annotations"]:
        if not (a.get("iscrowd") or a.get("difficult")):
            boxes.setdefault(a["image_id"], []).append(a)
    out = {"AP50": base, "dAP": {}, "counts": {k: 0 for k in ERROR_KINDS}}
    for k in kinds:
        if k is not None:
            out["counts"][k] += 1
    out["counts"]["missed"] = len(missed)
    top = max((float(r["score"]) for r in results), default=1.0) + 1.0
    for kind in ERROR_KINDS:
        fixed = []
        for r, k in zip(results, kinds):
            if k != kind:
                fixed.append(r)
            elif kind in ("classification", "localisation"):
                objs = boxes.get(r["image_id"], [])
                best = max(objs, key=lambda a: float(_iou(_xyxy(r["bbox"])[None], _xyxy(a["bbox"])[None])[0, 0])
                           if kind == "classification" or int(a["category_id"]) == int(r["category_id"]) else -1)
                fixed.append({**r, "category_id": int(best["category_id"])} if kind == "classification"
                             else {**r, "bbox": list(best["bbox"])})
        if kind == "missed":
            fixed += [{"image_id": i, "bbox": list(b), "category_id": c, "score": top} for i, b, c in missed]
        out["dAP"][kind] = _ap50(gt, fixed, num_classes) - base
    return out


def write_confusion(cm: np.ndarray, class_names: Sequence[str], folder: Path, iou: float, score: float
                    ) -> tuple[Path, Path]:
    """``confusion_matrix_detection.{csv,png}`` in ``folder``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    names = [*class_names, "background"]
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, png = folder / "confusion_matrix_detection.csv", folder / "confusion_matrix_detection.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ground truth \\ prediction", *names])
        for name, row in zip(names, cm.tolist()):
            w.writerow([name, *row])
    n = len(names)
    fig = Figure(figsize=(max(5, 0.35 * n + 2), max(4, 0.35 * n + 1.5)))
    ax = fig.subplots()
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(f"detections (IoU >= {iou:g}, score >= {score:g}); rows normalised, counts shown")
    if n <= 30:
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                        color="white" if shown[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return csv_path, png


def write_threshold_plot(curves: Mapping[str, Any], path: Path) -> Path:
    """F1 (and precision, recall) against the score threshold, one line per class (the first 20)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, c in list(curves.items())[:20]:
        if c.get("thresholds"):
            ax.plot(c["thresholds"], c["f1"], label=f"{name} (best {c['best_threshold']:.2f})")
    ax.set_xlabel("score threshold")
    ax.set_ylabel("F1 at IoU 0.5")
    ax.set_xlim(1, 0)
    ax.legend(fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
