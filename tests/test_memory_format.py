"""channels_last training without the convolution whose CPU backward crashes in it (detkit/utils/memory_format.py):
the rewritten network computes the same outputs and gradients as the plain one, and trains a step without
aborting the process."""

from __future__ import annotations

import copy

import torch
from torch import nn

from detkit.utils.memory_format import breaks_channels_last, to_channels_last


def narrow_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 1, stride=2, bias=False),  # the one torch's CPU backward breaks
                         nn.BatchNorm2d(8), nn.Conv2d(8, 16, 1, stride=2), nn.Conv2d(16, 16, 1, stride=2))


def test_the_narrow_strided_1x1_convolution_is_rewritten_and_computes_the_same():
    plain = narrow_net()
    fast = copy.deepcopy(plain)
    assert [breaks_channels_last(m) for m in fast] == [False, False, False, True, False, True, False]
    assert to_channels_last(fast) == 2
    assert to_channels_last(fast) == 0  # once rewritten, a second call changes nothing
    x = torch.randn(8, 3, 96, 96)
    out_plain = plain(x)
    out_fast = fast(x.contiguous(memory_format=torch.channels_last))  # trains: the backward does not abort
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    out_plain.square().mean().backward()
    out_fast.square().mean().backward()
    for a, b in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert fast[0].weight.is_contiguous(memory_format=torch.channels_last)
