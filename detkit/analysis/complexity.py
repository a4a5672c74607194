"""Complexity of a backbone or a whole model: parameters, FLOPs and activations, from one counter.

- params: number of parameters.
- flops: multiply-adds of convolutions and matrix products (torch's ``FlopCounterMode`` counts 2 per
  multiply-add; we report multiply-adds, the unit of published ImageNet tables).
- activations: the RegNet paper's definition, the total size of the output tensors of all convolution
  layers, for one image.

Counting runs one forward pass of a batch of one. Build the model under ``torch.device("meta")`` (see
:func:`count_built`) and nothing is computed or allocated: only shapes flow, so even RegNetY-128GF counts
in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Complexity:
    params: int
    flops: int
    activations: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _size(input_size: int | tuple[int, int]) -> tuple[int, int]:
    return (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))


def count_complexity(model: nn.Module, input_size: int | tuple[int, int] = 224, inputs: Any = None) -> Complexity:
    """Count ``model``'s complexity on one ``3 x H x W`` image (or on ``inputs``, passed as the argument)."""
    params = sum(p.numel() for p in model.parameters())
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    if inputs is None:
        inputs = torch.zeros(1, 3, *_size(input_size), device=device, dtype=dtype)
    activations = 0

    def count_output(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        nonlocal activations
        activations += output[0].numel()  # one image of the batch

    handles = [m.register_forward_hook(count_output) for m in model.modules() if isinstance(m, CONV_TYPES)]
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Complexity(params=params, flops=int(counter.get_total_flops() // 2), activations=int(activations))


def count_built(build: Callable[[], nn.Module], input_size: int | tuple[int, int] = 224) -> Complexity:
    """Build a model on the meta device (no memory, no init cost) and count it."""
    with torch.device("meta"):
        model = build()
    return count_complexity(model, input_size)
