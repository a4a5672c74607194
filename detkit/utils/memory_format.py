"""``channels_last`` for training, without the convolution whose CPU backward it breaks.

In torch 2.14 on the CPU, the backward of a 1x1 convolution of stride 2 with fewer than 16 input channels
corrupts the heap (``double free or corruption``; the process aborts) in channels-last memory once its input is
larger than about 48 x 48 (reproduced with ``Conv2d(8, 8, 1, stride=2)`` on a ``8 x 8 x 80 x 80`` batch; 16
channels, a 3x3 kernel, stride 1 or the default layout are fine). Such convolutions occur in narrow networks: the
projection of an X block of width 8 in an AnyNet sample. :func:`to_channels_last` converts a model and runs each of
them as what it computes, the input subsampled by the stride then a stride-1 1x1 convolution (exactly equal; a
pre-hook does the subsampling).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)
NARROW = 16  # in-channels below which a strided 1x1 convolution is rewritten


def breaks_channels_last(module: nn.Module) -> bool:
    """A convolution whose CPU backward fails in channels-last (see the module docstring)."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and max(module.stride) > 1
            and module.padding == (0, 0) and module.in_channels < NARROW)


class _Subsample:
    def __init__(self, stride: tuple[int, int]) -> None:
        self.stride = stride

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        sh, sw = self.stride
        return (args[0][:, :, ::sh, ::sw], *args[1:])


def to_channels_last(model: nn.Module) -> int:
    """``model`` in channels-last memory; each convolution :func:`breaks_channels_last` names (on a CPU) becomes a
    subsampling pre-hook and a stride-1 convolution. Returns how many were rewritten."""
    model.to(memory_format=torch.channels_last)
    rewritten = 0
    for module in model.modules():
        if breaks_channels_last(module) and module.weight.device.type == "cpu":
            module.register_forward_pre_hook(_Subsample(tuple(module.stride)))
            module.stride = (1, 1)
            rewritten += 1
    if rewritten:
        log.info("channels_last: %d strided 1x1 convolution(s) with < %d input channels run as subsampling + "
                 "stride 1 (torch's CPU backward of those fails in channels-last)", rewritten, NARROW)
    return rewritten
