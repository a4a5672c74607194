#!/usr/bin/env python
"""detkit SSDlite-MobileNetV3 against torchvision's ``ssdlite320_mobilenet_v3_large``: inference latency and
training-step throughput at the same input size.

Sides (random weights, ``weights=None, weights_backbone=None``, 91 outputs = 90 classes + background):

- ``torchvision``: ``ssdlite320_mobilenet_v3_large`` (reduced tail: C5 has 480 channels without ImageNet weights).
- ``detkit config``: ``build_model`` from ``configs/_base_/models/ssdlite_mobilenet_v3.yaml`` with
  ``model.backbone.kwargs={reduced_tail: true}`` (as torchvision without ImageNet weights). One architectural
  difference: torchvision's C4 is the 672-channel output of the expansion conv inside ``features.13`` (the
  first stride-32 block); detkit's ``c4`` is the 112-channel output of ``features.12`` (the last stride-16
  block), so its C4 prediction heads are smaller (fewer parameters and FLOPs, the same default boxes).
- ``detkit taps`` (``--taps``, on by default): detkit's Backbone/head/Detector over a level plan cut like
  torchvision's (``c4`` ends after ``features.13.block.0``), torchvision's state dict loaded
  (``from_torchvision_ssdlite``); the script first checks that both networks give the same outputs (head
  regression and logits; tests/test_ssd.py checks detections and losses). Same network, so the ratio is the
  cost of detkit's code around it (and of its post-processing, which runs the per-class top-k in one call
  where torchvision loops over the classes).

Inference: batch 1, the same random image; each side's normalisation inside the timed call (torchvision's
``GeneralizedRCNNTransform``: 0.5/0.5; detkit: the backbone's ImageNet mean/std), torchvision's post-processing
to the original size (scale 1) included. torchvision's transform also resizes every image to 320x320 (a
bilinear interpolation even at 320): that resize is skipped (the input is already 320 px; detkit never resizes in
the model) unless ``--tv-resize``. Median of ``--repeats`` interleaved runs after ``--warmup``.
Random weights give near-uniform class scores (about 1/91, above the 0.001 threshold of both models): every
class then keeps its 300 best boxes, 27,000 candidates go through NMS, and post-processing dominates the time;
``--score-thresh 0.05`` leaves (almost) only the network.
Training: forward + backward + SGD step (lr 0.01, momentum 0.9) at batch ``--batch`` of random images with 1-6
random boxes each (seeded, the same for both), images/s over ``--steps`` steps after ``--warmup`` steps, both
sides alternating for ``--rounds`` rounds (median). Usage:

    .venv/bin/python benchmarks/ssdlite.py [--size 320] [--repeats 20] [--warmup 3] [--batch 8] [--steps 10]
        [--rounds 2] [--threads N] [--device cpu|cuda] [--no-taps] [--tv-resize] [--score-thresh T]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torchvision
from common import cores, device_name, environment, write_json
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from detkit import build_model, load_config
from detkit.backbones.base import Backbone, split_by_stride
from detkit.heads.ssd import build_ssd_head, from_torchvision_ssdlite
from detkit.models import Detector

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/_base_/models/ssdlite_mobilenet_v3.yaml"
TV_MEAN, TV_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------------------ models
def detkit_config(size: int, num_classes: int) -> Detector:
    cfg = load_config(CONFIG, [f"data.image_size={size}", f"model.num_classes={num_classes}",
                               "model.backbone.kwargs={reduced_tail: true}"])
    return build_model(cfg)


def detkit_taps(size: int, num_classes: int) -> Detector:
    """detkit's parts over MobileNetV3 with torchvision's taps: c4 = the expansion conv of features.13."""
    cfg = load_config(CONFIG, [f"data.image_size={size}", f"model.num_classes={num_classes}"])
    net = torchvision.models.mobilenet_v3_large(reduced_tail=True,
                                                norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=0.03))
    plan = split_by_stride(net, "features")
    c4 = [level for level, _ in plan].index("c4")
    first = plan[c4 + 1][1].pop(0)
    plan[c4][1].append(f"{first}.block.0")
    plan[c4 + 1][1][:0] = [f"{first}.block.{j}" for j in (1, 2, 3)]
    backbone = Backbone(net, plan, ["c4", "c5"], ("avgpool", "classifier"), name="mobilenet_v3_large")
    head = build_ssd_head(cfg.model.head.params, backbone.out_channels, backbone.strides, num_classes, size)
    return Detector(backbone, None, head, mean=TV_MEAN, std=TV_STD)  # torchvision SSDlite's normalisation


def torchvision_ssdlite(num_classes: int, resize: bool) -> nn.Module:
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    if not resize:  # inputs are already 320x320: skip the identity bilinear resize (normalisation stays)
        model.transform.resize = lambda image, target=None: (image, target)
    return model


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(fn) -> float:
    """Multiply-adds (GFLOPs as the project counts them: FlopCounterMode / 2) of one call."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2 / 1e9


# ----------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_inference(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        sync(device)
        for i in range(repeats):
            order = list(fns.items())
            for name, fn in order if i % 2 == 0 else order[::-1]:  # interleaved, alternating who goes first
                t = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t)
    return times


def random_batch(batch: int, size: int, num_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 7, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = (0.05 + torch.rand(n, 2, generator=g) * 0.5) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (n,), generator=g)})
    return images, targets


def train_rate(step, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="square input size (torchvision's SSDlite: 320)")
    parser.add_argument("--num-classes", type=int, default=90, help="classes without background (COCO: 90)")
    parser.add_argument("--repeats", type=int, default=20, help="timed inference runs of each side (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs / steps first")
    parser.add_argument("--batch", type=int, default=8, help="training batch size")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="training rounds per side, alternating (median)")
    parser.add_argument("--threads", type=int, default=cores(), help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--no-taps", dest="taps", action="store_false",
                        help="skip the detkit side with torchvision's taps (and the parity check)")
    parser.add_argument("--tv-resize", action="store_true", help="keep torchvision's (identity) resize to 320")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="box score threshold of both sides while timing (default: their own, 0.001)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = parser.parse_args()
    if min(args.repeats, args.batch, args.steps, args.rounds, args.threads) < 1 or args.warmup < 0:
        parser.error("--repeats, --batch, --steps, --rounds, --threads must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    # random weights (torchvision's normal(0, 0.03) init) make activations tiny: without flushing denormals
    # to zero, CPU arithmetic on them is up to 100x slower and the timings measure that, not the models
    torch.set_flush_denormal(True)
    size, k = args.size, args.num_classes

    torch.manual_seed(args.seed)
    models: dict[str, nn.Module] = {"torchvision": torchvision_ssdlite(k, args.tv_resize),
                                    "detkit config": detkit_config(size, k)}
    if args.taps:
        models["detkit taps"] = detkit_taps(size, k)
        result = models["detkit taps"].load_state_dict(from_torchvision_ssdlite(models["torchvision"].state_dict()))
        assert not result.missing_keys and not result.unexpected_keys
    for m in models.values():
        m.to(device).eval()
        if args.score_thresh is not None:
            (m if m is models["torchvision"] else m.head).score_thresh = args.score_thresh
    tv = models["torchvision"]
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)

    def norm(mean, std):
        return torch.tensor(mean, device=device)[:, None, None], torch.tensor(std, device=device)[:, None, None]

    calls = {"torchvision": lambda: tv(list(x))}
    for name in models:
        if name != "torchvision":
            mean, std = norm(models[name].backbone.mean, models[name].backbone.std)
            if name == "detkit taps":  # the same weights as torchvision: its normalisation, for the parity check
                mean, std = norm(TV_MEAN, TV_STD)
            calls[name] = (lambda m, mean, std: lambda: m((x - mean) / std))(models[name], mean, std)

    # what each side computes: parameters, default boxes, multiply-adds of one 320x320 image
    with torch.no_grad():
        images, _ = tv.transform(list(x))
        tv_boxes = len(tv.anchor_generator(images, list(tv.backbone(images.tensors).values()))[0])
        info = {"torchvision": {"params": params(tv), "default_boxes": tv_boxes, "gflops": flops(calls["torchvision"])}}
        for name in models:
            if name != "torchvision":
                m = models[name]
                boxes = len(m.head.default_boxes(x, m.head.feature_maps(m.features(x))))
                info[name] = {"params": params(m), "default_boxes": boxes, "gflops": flops(calls[name])}
        parity = None
        if args.taps:  # the same network: the same head outputs (box regression, class logits) on the same input
            m = models["detkit taps"]
            mean, std = norm(TV_MEAN, TV_STD)
            ours = m.head.predictor(m.head.feature_maps(m.features((x - mean) / std)))
            theirs = tv.head(list(tv.backbone(images.tensors).values()))
            parity = max((ours[key] - theirs[key]).abs().max().item() for key in ours)

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device} ({device_name(device)}); input {size}x{size}, {k} classes + background; torchvision "
          f"resize {'on' if args.tv_resize else 'skipped'}, score threshold "
          f"{args.score_thresh if args.score_thresh is not None else 'the models own (0.001)'}")
    if parity is not None:
        print(f"detkit taps vs torchvision, same weights: head outputs differ by at most {parity:.2g}")

    # (a) inference latency, batch 1
    times = time_inference(calls, args.repeats, args.warmup, device)
    # (b) training throughput
    images, targets = random_batch(args.batch, size, k, args.seed)
    images = images.to(device)
    targets = [{key: v.to(device) for key, v in t.items()} for t in targets]
    steps = {}
    for name, m in models.items():
        m.train()
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        if name == "torchvision":
            def forward(m=m):
                return m(list(images), [dict(t) for t in targets])
        else:
            mean, std = norm(TV_MEAN, TV_STD) if name == "detkit taps" else norm(m.backbone.mean, m.backbone.std)

            def forward(m=m, mean=mean, std=std):
                return m((images - mean) / std, [dict(t) for t in targets])

        def step(opt=opt, forward=forward):
            loss = sum(forward().values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    rates: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        order = list(steps.items())
        for name, step in order if r % 2 == 0 else order[::-1]:
            rates[name].append(train_rate(step, args.batch, args.steps, args.warmup, device))

    rows = []
    ref_ms = statistics.median(times["torchvision"]) * 1e3
    ref_rate = statistics.median(rates["torchvision"])
    for name in models:
        ms = statistics.median(times[name]) * 1e3
        rate = statistics.median(rates[name])
        rows.append({"side": name, **info[name], "latency_ms": ms, "latency_ratio": ms / ref_ms,
                     "train_images_per_s": rate, "throughput_ratio": rate / ref_rate,
                     "latency_times_ms": [t * 1e3 for t in times[name]], "train_rates": rates[name]})
    print()
    print(f"{'side':15s} {'params':>9s} {'boxes':>6s} {'GMACs':>6s} {'infer ms':>9s} {'ratio':>6s} "
          f"{'train img/s':>12s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['side']:15s} {r['params'] / 1e6:8.2f}M {r['default_boxes']:6d} {r['gflops']:6.2f} "
              f"{r['latency_ms']:9.2f} {r['latency_ratio']:6.3f} {r['train_images_per_s']:12.2f} "
              f"{r['throughput_ratio']:6.3f}")
    print(f"inference: batch 1, median of {args.repeats} interleaved runs (ratio = detkit / torchvision ms); "
          f"training: batch {args.batch}, {args.steps} steps x {args.rounds} rounds (ratio = detkit / torchvision "
          f"images/s)")
    if args.json:
        out = {**environment(args.device), "size": size, "num_classes": k, "repeats": args.repeats,
               "warmup": args.warmup, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
               "score_thresh": args.score_thresh, "tv_resize": args.tv_resize, "taps_max_abs_diff": parity,
               "results": rows}
        write_json(out, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
