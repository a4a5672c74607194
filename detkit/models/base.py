"""What every detkit model shares: backbone -> neck -> head, its input normalisation, and one way to predict.

A model takes image batches as the data pipeline makes them: ``B x 3 x H x W`` **uint8** pixels (RGB, already
resized, padded to a multiple of ``data.size_divisor``), which it normalises itself with the mean/std its
backbone's weights expect (non-persistent buffers: checkpoints do not store them, and any checkpoint loads). A
floating-point batch counts as normalised already (what :meth:`Model.features` takes). So whoever holds a model
runs it without knowing which backbone is inside:

- ``model.losses(batch)`` in training mode: a dict of named losses for a collated batch;
- ``model.predict(batch)`` in eval mode: one dict per image, in the original image's pixels;
- ``model.export_outputs(images)``: the flat tensors an exported graph returns, for float images in 0..255;
- ``model(images, targets=None, image_sizes=None, scales=None, orig_sizes=None)``: the same as tensors.

``classes`` (names of labels 1..K, or of classes 0..K-1 for segmenters), ``cat_ids`` (the training set's own
ids of those classes) and ``config`` (the resolved config) travel with a model built by
:func:`detkit.models.build_model` / loaded by :func:`detkit.models.load_model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from detkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from detkit.heads.registry import HeadTraits


class Model(nn.Module):
    """``backbone`` ({"c_k"}) -> optional ``neck`` ({"p_k"}) -> ``head``, with ``traits`` (the head's
    :class:`HeadTraits`) and the input normalisation (``mean``/``std`` in [0, 1] units, default: the backbone's)."""

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module, traits: HeadTraits,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.backbone, self.neck, self.head, self.traits = backbone, neck, head, traits
        mean = tuple(mean if mean is not None else getattr(backbone, "mean", IMAGENET_MEAN))
        std = tuple(std if std is not None else getattr(backbone, "std", IMAGENET_STD))
        self.mean, self.std = mean, std
        # 0..255 units; not persistent: a checkpoint holds weights, the normalisation follows the backbone
        self.register_buffer("pixel_mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("pixel_inv_std",
                             1.0 / (torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0),
                             persistent=False)
        self.classes: list[str] = []
        self.cat_ids: list[Any] = []
        self.config: Any = None

    @property
    def task(self) -> str:
        """``detection``, ``instance`` or ``semantic`` (the head's trait)."""
        return self.traits.task

    # ------------------------------------------------------------------------------------------ preprocessing
    def normalize(self, images: Tensor) -> Tensor:
        """Pixels (uint8 or float, 0..255) -> the backbone's input: ``(x - mean) / std`` per channel."""
        return (images.float() - self.pixel_mean) * self.pixel_inv_std

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 pixels are normalised; a floating-point batch is taken as normalised already."""
        return images if images.is_floating_point() else self.normalize(images)

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """Backbone (and neck) features of a *normalised* batch."""
        feats = self.backbone(images)
        return self.neck(feats) if self.neck is not None else feats

    # --------------------------------------------------------------------------------------- batches in
    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Named training losses for a collated batch (:class:`detkit.data.collate.Collate`)."""
        return self(batch["images"], self.training_targets(batch), batch["image_sizes"])

    def training_targets(self, batch: dict[str, Any]) -> Any:
        return batch["targets"]

    def predict(self, batch: dict[str, Any]) -> list[dict[str, Tensor]]:
        """Eval-mode outputs per image of a collated batch, mapped back to each image's original pixels (the
        ``scale`` and ``orig_size`` its pipeline recorded). The engine, the Predictor and the studies call this."""
        targets = batch.get("targets") or []
        scales = [t.get("scale") for t in targets] if targets and "scale" in targets[0] else None
        orig_sizes = [t["orig_size"] for t in targets] if targets and "orig_size" in targets[0] else None
        return self(batch["images"], image_sizes=batch["image_sizes"], scales=scales, orig_sizes=orig_sizes)

    @staticmethod
    def input_sizes(images: Tensor, image_sizes: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
        if image_sizes is None:
            return [tuple(images.shape[-2:])] * images.shape[0]
        return [(int(h), int(w)) for h, w in image_sizes]


def as_model(obj: Any) -> Model:
    """A :class:`Model`, or the model an engine module (``.model``) holds."""
    model = obj if isinstance(obj, Model) else getattr(obj, "model", None)
    if not isinstance(model, Model):
        raise TypeError(f"expected a detkit model (detkit.load_model) or a module holding one, "
                        f"got {type(obj).__name__}")
    return model
