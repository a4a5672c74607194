"""A U-Net decoder for semantic segmentation over any backbone's levels.

The decoder starts from the coarsest level and, per finer level, upsamples to that level's exact size (so any
input size works, multiples of 32 or not), concatenates the level as a skip connection and applies two 3x3
conv-norm-ReLU layers. With ``final_block`` one more block (no skip) upsamples from the finest level to the
input resolution. A 1x1 classifier gives K logits per pixel, resized (bilinear) to the input when the last block
does not reach it. ``decoder_channels`` lists each block's width, deepest first (default 256, 128, 64, 32, 16,
as many as there are blocks); ``upsample`` is ``nearest``, ``bilinear`` or ``transpose`` (a learned
``ConvTranspose2d`` with kernel = stride = the level's stride ratio).

Losses (:func:`segmentation_loss`): cross-entropy (``ce_weight``; ``class_weights`` per class, optional label
smoothing) plus an optional soft Dice loss (``dice_weight``). Pixels labelled ``ignore_index`` (255: where the
data pipeline puts unlabeled pixels, whatever the file's own ``data.*.ignore_index`` is, and the padding of a
batch) count in neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from detkit.data.dataset import SEMANTIC_IGNORE
from detkit.errors import ConfigError, DataError
from detkit.heads.levels import select_levels
from detkit.heads.params import WHERE, parse_params

UPSAMPLE_MODES = ("nearest", "bilinear", "transpose")
NORMS = ("bn", "gn", "none")


@dataclass
class UNetParams:
    """``model.head.params`` of ``model.head.name: unet`` (see the module docstring)."""

    levels: list[str] | None = None  # skip levels, fine to coarse; default: every level the backbone returns
    decoder_channels: list[int] | None = None  # per block, deepest first; default 256, 128, 64, 32, 16 (>= 16)
    upsample: str = "nearest"  # nearest | bilinear | transpose
    final_block: bool = True  # a last block (no skip) from the finest level's stride up to the input resolution
    norm: str = "bn"  # bn | gn (32 groups or fewer) | none
    dropout: float = 0.0  # before the classifier
    ce_weight: float = 1.0
    dice_weight: float = 0.0  # > 0 adds a soft Dice loss
    class_weights: list[float] | None = None  # cross-entropy weight per class (K values)
    label_smoothing: float = 0.0


def _norm(norm: str, channels: int) -> nn.Module | None:
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return None


def _conv(cin: int, cout: int, norm: str) -> Conv2dNormActivation:
    return Conv2dNormActivation(cin, cout, 3, norm_layer=(lambda c: _norm(norm, c)) if norm != "none" else None,
                                activation_layer=nn.ReLU, inplace=True)


class DecoderBlock(nn.Module):
    """Upsample ``x`` by ``scale`` to the skip's exact size, concatenate the skip (if any), two 3x3 convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, scale: int, upsample: str,
                 norm: str) -> None:
        super().__init__()
        self.upsample = upsample
        self.up = nn.ConvTranspose2d(in_channels, in_channels, scale, stride=scale) if upsample == "transpose" else None
        self.convs = nn.Sequential(_conv(in_channels + skip_channels, out_channels, norm),
                                   _conv(out_channels, out_channels, norm))

    def forward(self, x: Tensor, size: tuple[int, int], skip: Tensor | None = None) -> Tensor:
        if self.up is not None:
            x = self.up(x)
        if tuple(x.shape[-2:]) != tuple(size):  # interpolation, or a transposed conv off by one on odd sizes
            mode = "nearest" if self.upsample == "transpose" else self.upsample
            x = F.interpolate(x, size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class UNetHead(nn.Module):
    """The U-Net decoder and classifier over ``levels`` (fine to coarse) with ``channels``/``strides`` per level.

    ``forward(features, images, image_sizes, targets)`` returns ``(logits, losses)``: logits ``B x K x H x W`` at
    the (padded) input's resolution, and in training (``targets``: ``B x H x W`` class indices, 255 ignored) the
    losses of :func:`segmentation_loss`.
    """

    task = "semantic"

    def __init__(self, levels: list[str], channels: list[int], strides: list[int], num_classes: int,
                 params: UNetParams) -> None:
        super().__init__()
        self.levels, self.params, self.num_classes = list(levels), params, int(num_classes)
        n_blocks = len(levels) - 1 + int(params.final_block and strides[0] > 1)
        widths = list(params.decoder_channels or [max(16, 256 >> i) for i in range(n_blocks)])
        if len(widths) != n_blocks:
            raise ConfigError(f"{WHERE}.decoder_channels has {len(widths)} widths for {n_blocks} decoder blocks "
                              f"(levels {levels}{', final_block' if params.final_block and strides[0] > 1 else ''})")
        blocks, cin = [], channels[-1]
        for i in range(len(levels) - 1):  # coarse to fine: the block that joins level -2-i
            k = len(levels) - 2 - i
            blocks.append(DecoderBlock(cin, channels[k], widths[i], strides[k + 1] // strides[k], params.upsample,
                                       params.norm))
            cin = widths[i]
        self.final = None
        if n_blocks > len(levels) - 1:
            self.final = DecoderBlock(cin, 0, widths[-1], strides[0], params.upsample, params.norm)
            cin = widths[-1]
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout2d(params.dropout) if params.dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(cin, num_classes, 1)
        weights = torch.tensor(params.class_weights, dtype=torch.float32) if params.class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

    def logits(self, features: dict[str, Tensor], size: tuple[int, int]) -> Tensor:
        feats = [features[k] for k in self.levels]
        x = feats[-1]
        for i, block in enumerate(self.blocks):
            skip = feats[len(feats) - 2 - i]
            x = block(x, tuple(skip.shape[-2:]), skip)
        if self.final is not None:
            x = self.final(x, size)
        x = self.classifier(self.dropout(x))
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def forward(self, features: dict[str, Tensor], images: Tensor, image_sizes=None, targets: Tensor | None = None):
        logits = self.logits(features, tuple(images.shape[-2:]))
        if targets is None:
            return logits, {}
        p = self.params
        return logits, segmentation_loss(logits, targets, ce_weight=p.ce_weight, dice_weight=p.dice_weight,
                                         class_weights=self.class_weights, label_smoothing=p.label_smoothing)


def segmentation_loss(logits: Tensor, target: Tensor, ce_weight: float = 1.0, dice_weight: float = 0.0,
                      class_weights: Tensor | None = None, ignore_index: int = SEMANTIC_IGNORE,
                      label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """``loss_ce`` (and ``loss_dice`` with ``dice_weight > 0``) of ``logits`` (B x K x H x W) against ``target``
    (B x H x W class indices; ``ignore_index`` pixels left out). A batch without a labelled pixel gives zero
    losses (still connected to the graph)."""
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise DataError(f"semantic targets are {tuple(target.shape)}, the logits {tuple(logits.shape)}: "
                        f"expected B x H x W targets of the input's size")
    target = target.long()
    valid = target != ignore_index
    k = logits.shape[1]
    bad = valid & ((target < 0) | (target >= k))
    if bad.any():
        raise DataError(f"semantic target value {int(target[bad][0])} is not a class index 0..{k - 1} (or "
                        f"{ignore_index} for unlabeled): check model.num_classes against the data's classes")
    zero = logits.sum() * 0.0
    losses: dict[str, Tensor] = {}
    if ce_weight:
        ce = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index,
                             label_smoothing=label_smoothing) if valid.any() else zero
        losses["loss_ce"] = ce_weight * ce
    if dice_weight:
        losses["loss_dice"] = dice_weight * dice_loss(logits, target, ignore_index)
    return losses


def dice_loss(logits: Tensor, target: Tensor, ignore_index: int = SEMANTIC_IGNORE, eps: float = 1.0) -> Tensor:
    """1 - the mean soft Dice (softmax probabilities vs one-hot targets, over labelled pixels) of the classes
    present in ``target``; 0 when no pixel is labelled."""
    valid = (target != ignore_index).unsqueeze(1)
    k = logits.shape[1]
    probs = logits.float().softmax(dim=1) * valid
    onehot = F.one_hot(torch.where(valid.squeeze(1), target, 0), k).permute(0, 3, 1, 2).to(probs.dtype) * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    card = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims) > 0
    if not present.any():
        return logits.sum() * 0.0
    dice = (2 * inter + eps) / (card + eps)
    return 1 - dice[present].mean()


def build_unet_head(params, channels: dict[str, int], strides: dict[str, int], num_classes: int,
                    image_size: int) -> UNetHead:
    """The registry's builder (see :data:`detkit.heads.HEADS`); U-Net predicts K classes 0..K-1 (no background
    class is added: a dataset's background, if it has one, is one of its classes)."""
    p = parse_params(UNetParams, params)
    if p.upsample not in UPSAMPLE_MODES:
        raise ConfigError(f"{WHERE}.upsample = {p.upsample!r}: expected one of {', '.join(UPSAMPLE_MODES)}")
    if p.norm not in NORMS:
        raise ConfigError(f"{WHERE}.norm = {p.norm!r}: expected one of {', '.join(NORMS)}")
    if not 0 <= p.dropout < 1:
        raise ConfigError(f"{WHERE}.dropout = {p.dropout}: expected 0 <= dropout < 1")
    if p.ce_weight < 0 or p.dice_weight < 0 or p.ce_weight + p.dice_weight == 0:
        raise ConfigError(f"{WHERE}: ce_weight = {p.ce_weight}, dice_weight = {p.dice_weight}: expected weights "
                          f">= 0, at least one positive")
    if p.class_weights is not None and (len(p.class_weights) != num_classes or min(p.class_weights) < 0):
        raise ConfigError(f"{WHERE}.class_weights has {len(p.class_weights)} values: expected model.num_classes = "
                          f"{num_classes} non-negative weights")
    if p.decoder_channels is not None and any(int(c) < 1 for c in p.decoder_channels):
        raise ConfigError(f"{WHERE}.decoder_channels = {p.decoder_channels}: widths must be positive")
    levels = select_levels("levels", p.levels, strides, list(strides), rule="multiple")
    ks = [int(strides[k]) for k in levels]
    return UNetHead(levels, [int(channels[k]) for k in levels], ks, num_classes, p)
