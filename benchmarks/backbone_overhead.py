#!/usr/bin/env python
"""Forward latency of detkit backbones against torchvision's own feature extractor, same weights, same run.

detkit wraps the library's network unchanged and runs its submodules level by level; this checks that the
wrapper costs nothing. Ratio = detkit / reference (1.00 = same speed). Usage:

    .venv/bin/python benchmarks/backbone_overhead.py [--size 224] [--batch 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models.feature_extraction import create_feature_extractor

from detkit.backbones import build_backbone

# detkit name -> the module names torchvision's extractor should return for c2..c5
CASES = {
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "regnet_y_400mf": ["trunk_output.block1", "trunk_output.block2", "trunk_output.block3", "trunk_output.block4"],
    "efficientnet_b0": ["features.2", "features.3", "features.5", "features.8"],
    "mobilenet_v3_large": ["features.3", "features.6", "features.12", "features.16"],
}


def timed(fn, x, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {tuple(x.shape)}")
    print(f"{'backbone':20s} {'detkit ms':>10s} {'torchvision ms':>15s} {'ratio':>6s}")
    for name, nodes in CASES.items():
        ours = build_backbone(name).eval()
        reference = create_feature_extractor(ours.network, {n: f"c{i + 2}" for i, n in enumerate(nodes)}).eval()
        with torch.inference_mode():
            a, b = ours(x), reference(x)
        for level in a:
            torch.testing.assert_close(a[level], b[level])  # same features: same work
        t_ours, t_ref = timed(ours, x, args.repeats), timed(reference, x, args.repeats)
        print(f"{name:20s} {t_ours * 1e3:10.2f} {t_ref * 1e3:15.2f} {t_ours / t_ref:6.2f}")


if __name__ == "__main__":
    main()
