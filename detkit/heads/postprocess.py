"""Batched post-processing of one-stage heads: candidates, top-k, NMS and the per-image cap for a whole batch.

One implementation serves eager inference and export (ONNX / TorchScript): there is no Python loop over the
images, so a traced graph works for any batch size. Detections come out flat -- ``boxes [M, 4]``, ``scores [M]``,
``labels [M]`` (1..K) and ``batch_index [M]`` (which image) -- in descending score order per image;
:func:`split_per_image` gives the per-image dicts of the head contract.

NMS runs per image and class. Eagerly that is torchvision's ``batched_nms``; in an ONNX export it is ONNX's own
``NonMaxSuppression`` over a ``[B, K, N]`` score tensor holding the selected candidates (zero elsewhere), which
runtimes evaluate per image and class. (``batched_nms`` traced would become one NMS over every candidate of the
batch, with a cost that grows with the square of the batch.) Both suppress a box whose IoU with a higher-scored
box of its image and class is above ``nms_thresh``, so the two give the same detections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

Flat = tuple[Tensor, Tensor, Tensor, Tensor]


def rank_within_image(batch_index: Tensor, num_images: int | Tensor) -> Tensor:
    """For entries in some order, each one's position among the entries of its own image (0, 1, ...)."""
    one_hot = batch_index[:, None] == torch.arange(num_images, device=batch_index.device)[None]
    return one_hot.long().cumsum(0).gather(1, batch_index[:, None])[:, 0] - 1


def _best_per_image(scores: Tensor, batch_index: Tensor, k: int, num_images: int | Tensor) -> Tensor:
    """Indices of the ``k`` best entries of every image (all of them where an image has fewer)."""
    if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export() and len(batch_index) and \
            int(torch.bincount(batch_index).max()) <= k:
        return torch.arange(len(scores), device=scores.device)  # nothing to cut (the usual case, no sort)
    order = scores.argsort(descending=True)
    return order[rank_within_image(batch_index[order], num_images) < k]


class _OnnxNMS(torch.autograd.Function):
    """Per image and class NMS: ``boxes [B, N, 4]``, ``scores [B, K, N]`` (entries <= ``score_thresh`` ignored)
    -> ``[M, 3]`` (image, class, box index). Exported as ONNX ``NonMaxSuppression``; computed eagerly otherwise."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, iou: float, score_thresh: float) -> Tensor:
        b, c, n = (scores > score_thresh).nonzero().unbind(1)
        keep = batched_nms(boxes[b, n], scores[b, c, n], b * scores.shape[1] + c, iou)
        return torch.stack([b[keep], c[keep], n[keep]], 1)

    @staticmethod
    def symbolic(g, boxes, scores, iou: float, score_thresh: float):
        const = lambda v, dtype: g.op("Constant", value_t=torch.tensor([v], dtype=dtype))  # noqa: E731
        return g.op("NonMaxSuppression", boxes, scores, const(2**31 - 1, torch.int64), const(iou, torch.float32),
                    const(score_thresh, torch.float32))


def _clip(boxes: Tensor, image_sizes: Sequence[tuple[int, int]], batch_index: Tensor) -> Tensor:
    if len(set(image_sizes)) == 1:
        h, w = image_sizes[0]
        return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                            boxes[:, 3].clamp(0, h)], 1)
    hw = torch.as_tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)[batch_index]  # [M, 2]
    wh = hw.flip(1).repeat(1, 2)
    return torch.minimum(boxes.clamp(min=0), wh)


def batched_detections(boxes: Tensor, scores: Tensor, image_sizes: Sequence[tuple[int, int]], *,
                       score_thresh: float, nms_thresh: float, max_detections: int, topk: int,
                       per_class_topk: bool = False, multi_label: bool = True) -> Flat:
    """Detections of a batch from decoded ``boxes [B, N, 4]`` (xyxy, input pixels) and ``scores [B, N, K]``.

    Candidates are the (box, class) pairs above ``score_thresh`` (``multi_label=False``: each box's best class
    only); ``per_class_topk`` (SSD) keeps each class's ``topk`` best boxes per image before the threshold
    (torchvision's SSD), otherwise the ``topk`` best candidates per image are kept (YOLO). Boxes are clipped to
    their image, NMS runs per image and class, and each image keeps its ``max_detections`` best.
    """
    num_images, n, k = scores.shape
    if per_class_topk:
        top, index = scores.topk(min(topk, n), dim=1)  # [B, k, K]: each class's best boxes
        b, i, label = (top > score_thresh).nonzero().unbind(1)
        s, box_index = top[b, i, label], index[b, i, label]
    else:
        if multi_label:
            b, box_index, label = (scores > score_thresh).nonzero().unbind(1)
            s = scores[b, box_index, label]
        else:
            best, best_label = scores.max(2)
            b, box_index = (best > score_thresh).nonzero().unbind(1)
            s, label = best[b, box_index], best_label[b, box_index]
        keep = _best_per_image(s, b, topk, num_images)
        b, box_index, label, s = b[keep], box_index[keep], label[keep], s[keep]
    if torch.onnx.is_in_onnx_export():
        return _onnx_nms(boxes, b, box_index, label, s, k, image_sizes, score_thresh, nms_thresh, max_detections)
    selected = _clip(boxes[b, box_index], image_sizes, b)
    keep = batched_nms(selected, s, b * k + label, nms_thresh)
    keep = keep[rank_within_image(b[keep], num_images) < max_detections]
    return selected[keep], s[keep], label[keep] + 1, b[keep]


def _onnx_nms(boxes: Tensor, b: Tensor, box_index: Tensor, label: Tensor, s: Tensor, num_classes: int,
              image_sizes: Sequence[tuple[int, int]], score_thresh: float, nms_thresh: float,
              max_detections: int) -> Flat:
    """The export's NMS (see the module docstring): the candidates scattered into ``[B, K, N]``."""
    if len(set(image_sizes)) != 1:
        raise ValueError("an exported graph has one input size for every image")
    num_images, n = boxes.shape[:2]
    dense = boxes.new_zeros((num_images, num_classes, n))
    dense[b, label, box_index] = s
    clipped = _clip(boxes.reshape(-1, 4), image_sizes, b).view(boxes.shape)
    b, label, box_index = _OnnxNMS.apply(clipped, dense, float(nms_thresh), float(score_thresh)).unbind(1)
    s = dense[b, label, box_index]
    order = s.argsort(descending=True)
    keep = order[rank_within_image(b[order], num_images) < max_detections]
    return clipped[b[keep], box_index[keep]], s[keep], label[keep] + 1, b[keep]


def split_per_image(flat: Flat, num_images: int) -> list[dict[str, Tensor]]:
    """Flat detections -> one ``{"boxes", "scores", "labels"}`` per image (score order kept)."""
    boxes, scores, labels, batch_index = flat
    out = []
    for i in range(num_images):
        m = batch_index == i
        out.append({"boxes": boxes[m], "scores": scores[m], "labels": labels[m]})
    return out
