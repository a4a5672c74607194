#!/usr/bin/env python
"""Inference latency of detkit's Faster R-CNN against torchvision's own builder, same weights, same input.

Each case builds a torchvision detector (random weights, seeded), loads its state dict into the detkit model of
the same architecture (key map), checks that both give the same detections, then times batch-1 inference of
both with their runs interleaved, so machine noise hits both alike. Ratio = detkit / torchvision (1.00 = same
speed); wrapper overhead = (ratio - 1) * 100 %. Usage:

    .venv/bin/python benchmarks/detector_inference.py [--cases resnet50_fpn@800 mobilenet_v3_large_320_fpn]
        [--repeats 20] [--warmup 3] [--threads N] [--device cpu|cuda] [--precision 32|16-mixed|bf16-mixed]
        [--json OUT]

Cases (``name@size`` sets the square input size, a multiple of 32; the default is the model's own):

- ``resnet50_fpn`` (800): ``fasterrcnn_resnet50_fpn`` vs detkit's config (ResNet-50, BN, P2-P6, P6 by max-pool).
- ``mobilenet_v3_large_320_fpn`` (320) and ``mobilenet_v3_large_fpn`` (800): torchvision's builders vs detkit
  models built from detkit's parts (Backbone, FPN, two-stage head, Detector) with one change that no config can
  express: torchvision's FPN reads the output of ``features.13`` (the *first* block of the stride-32 stage,
  160 channels) and ``features.16`` (the last, 960 channels), both at stride 32, and adds a max-pooled level at
  stride 64, whereas detkit's levels end at the last block of each stride (``c4`` = ``features.12``, stride 16).
  Here the detkit backbone's level plan is cut after ``features.13`` instead, so the networks are the same.
- ``mobilenet_v3_large_320_c4c5`` (320): detkit's config as it is (``c4``/``c5`` at strides 16/32 -> P4-P6)
  vs torchvision's ``FasterRCNN`` class over ``BackboneWithFPN`` tapping the same two blocks.

torchvision's detectors normalise (and would resize) inside; the inputs here are already at the model's size
(torchvision still runs its transform, at scale 1), and detkit's timed call includes the same normalisation.
The parity check runs with box score threshold 0 (100 detections per image); the timed runs use
``--score-thresh`` (0.05, torchvision's default: with random weights almost nothing passes it, so the time is
that of the network, RPN and RoI heads, where a wrapper's cost shows most).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torchvision
from common import cores, device_name, environment, write_json
from torch import nn
from torchvision.models.detection import (
    FasterRCNN,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
)
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detkit import build_model, load_config
from detkit.backbones import build_backbone
from detkit.backbones.base import Backbone
from detkit.heads import TwoStageParams, build_two_stage_head, parse_params
from detkit.heads.two_stage import from_torchvision_rcnn
from detkit.models import Detector
from detkit.necks import build_neck

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MOBILENET_ANCHORS = [[32, 64, 128, 256, 512]] * 3


def _params(**kw) -> str:
    """A ``model.head.params={...}`` override (YAML flow mapping)."""
    return "model.head.params={" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in kw.items()) + "}"


RESNET50_FPN = ["model.backbone.name=resnet50", "model.backbone.norm=bn", "model.neck.levels=[p2,p3,p4,p5,p6]",
                "model.neck.extra_op=maxpool", "model.num_classes=90"]
MOBILENET_FPN = ["model.backbone.name=mobilenet_v3_large", "model.backbone.norm=bn",
                 "model.backbone.out_levels=[c4,c5]", "model.neck.levels=[p4,p5,p6]", "model.neck.extra_op=maxpool",
                 "model.num_classes=90"]


# ------------------------------------------------------------------------------------------------ models
def mobilenet_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's mobilenet detector keys -> detkit's: its body is ``features`` itself (an
    IntermediateLayerGetter over the Sequential), detkit wraps the whole MobileNetV3 as ``backbone.network``."""
    body = {k: v for k, v in state_dict.items() if k.startswith("backbone.body.")}
    rest = from_torchvision_rcnn({k: v for k, v in state_dict.items() if k not in body})
    return {**{"backbone.network.features." + k[len("backbone.body."):]: v for k, v in body.items()}, **rest}


def detkit_mobilenet_torchvision_taps(cfg, size: int) -> Detector:
    """detkit's parts assembled like torchvision's mobilenet FPN detector (see the module docstring)."""
    ref = build_backbone(cfg.model.backbone)
    plan = [(level, list(names)) for level, names in ref.plan]
    c4 = [level for level, _ in plan].index("c4")
    plan[c4][1].append(plan[c4 + 1][1].pop(0))  # c4 now ends with features.13 (stride 32, 160 channels)
    # torchvision's builder (random init) passes norm_layer=BatchNorm2d: eps 1e-5 instead of MobileNetV3's 1e-3
    network = torchvision.models.mobilenet_v3_large(norm_layer=nn.BatchNorm2d)
    backbone = Backbone(network, plan, ["c4", "c5"], ref.dropped, name=ref.name, mean=ref.mean, std=ref.std)
    neck = build_neck(cfg.model.neck, backbone.out_channels, backbone.strides)
    # the neck names its levels p4/p5/p6 by position; the head gets their real strides (32, 32, 64), so the RoI
    # pooler has torchvision's scales (1/32, 1/32) and level mapping
    with torch.no_grad():
        feats = neck.eval()(backbone.eval()(torch.zeros(1, 3, size, size)))
    strides = {k: size // v.shape[-1] for k, v in feats.items()}
    params = parse_params(TwoStageParams, cfg.model.head.params)
    head = build_two_stage_head(params, neck.out_channels, strides, int(cfg.model.num_classes))
    return Detector(backbone, neck, head, mask_threshold=params.mask_threshold)


def torchvision_mobilenet_c4c5(size: int, **kwargs) -> FasterRCNN:
    """torchvision's FasterRCNN over MobileNetV3-large tapped at the ends of the stride-16 and -32 stages."""
    features = torchvision.models.mobilenet_v3_large().features
    backbone = BackboneWithFPN(features, {"12": "0", "16": "1"}, [112, 960], 256, extra_blocks=LastLevelMaxPool())
    anchors = AnchorGenerator(tuple(tuple(s) for s in MOBILENET_ANCHORS), ((0.5, 1.0, 2.0),) * 3)
    return FasterRCNN(backbone, 91, min_size=size, max_size=size, rpn_anchor_generator=anchors, **kwargs)


@dataclass
class Case:
    size: int
    torchvision: Callable[[int], torch.nn.Module]  # size -> model (its state dict is loaded into detkit's)
    detkit: Callable[[int], torch.nn.Module]
    key_map: Callable[[dict], dict]
    what: str


def _mobilenet_cfg(pre_post: int):
    return load_config(None, [*MOBILENET_FPN, _params(
        anchor_sizes=MOBILENET_ANCHORS, rpn_score_thresh=0.05, rpn_pre_nms_top_n_test=pre_post,
        rpn_post_nms_top_n_test=pre_post, box_score_thresh=0.0)])


CASES = {
    "resnet50_fpn": Case(
        800,
        lambda s: fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=s, max_size=s,
                                          box_score_thresh=0.0),
        lambda s: build_model(load_config(None, [*RESNET50_FPN, _params(box_score_thresh=0.0)])),
        from_torchvision_rcnn, "detkit config"),
    "mobilenet_v3_large_320_fpn": Case(
        320,
        lambda s: fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, min_size=s,
                                                        max_size=s, box_score_thresh=0.0),
        lambda s: detkit_mobilenet_torchvision_taps(_mobilenet_cfg(150), s),
        mobilenet_state_dict, "detkit parts, c4 cut after features.13"),
    "mobilenet_v3_large_fpn": Case(
        800,
        lambda s: fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, min_size=s, max_size=s,
                                                    box_score_thresh=0.0),
        lambda s: detkit_mobilenet_torchvision_taps(_mobilenet_cfg(1000), s),
        mobilenet_state_dict, "detkit parts, c4 cut after features.13"),
    "mobilenet_v3_large_320_c4c5": Case(
        320,
        lambda s: torchvision_mobilenet_c4c5(s, rpn_score_thresh=0.05, rpn_pre_nms_top_n_test=150,
                                             rpn_post_nms_top_n_test=150, box_score_thresh=0.0),
        lambda s: build_model(_mobilenet_cfg(150)),
        mobilenet_state_dict, "detkit config; torchvision FasterRCNN class"),
}
DEFAULT_CASES = ["resnet50_fpn", "mobilenet_v3_large_320_fpn", "mobilenet_v3_large_320_c4c5"]


# ----------------------------------------------------------------------------------------------- running
def autocast(device: str, precision: str):
    if precision == "32":
        return nullcontext()
    return torch.autocast(device, dtype=torch.float16 if precision == "16-mixed" else torch.bfloat16)


def check_same(expected: list[dict], got: list[dict], atol: float) -> float:
    """Asserts the same detections (boxes, scores within ``atol``; same labels); returns the largest difference."""
    worst = 0.0
    for e, g in zip(expected, got, strict=True):
        if len(e["boxes"]) != len(g["boxes"]) or not len(e["boxes"]):
            raise AssertionError(f"detections differ: {len(g['boxes'])} (detkit) vs {len(e['boxes'])} (torchvision)")
        for key in ("boxes", "scores"):
            torch.testing.assert_close(g[key].float(), e[key].float(), atol=atol, rtol=0)
            worst = max(worst, (g[key].float() - e[key].float()).abs().max().item())
        if not torch.equal(g["labels"], e["labels"]):
            raise AssertionError("detections differ: labels")
    return worst


def run_case(name: str, case: Case, size: int, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    tv = case.torchvision(size).eval()
    ours = case.detkit(size).eval()
    result = ours.load_state_dict(case.key_map(tv.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    tv, ours = tv.to(device), ours.to(device)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    mean = torch.tensor(MEAN, device=device)[:, None, None]
    std = torch.tensor(STD, device=device)[:, None, None]
    sizes = [(size, size)] * x.shape[0]
    images = list(x)
    def sync() -> None:  # CUDA runs asynchronously: wait for the work before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_tv():
        with autocast(device.type, args.precision):
            return tv(images)

    def run_ours():
        with autocast(device.type, args.precision):
            return ours((x - mean) / std, image_sizes=sizes)  # torchvision's normalisation, inside the timed call

    with torch.inference_mode():
        worst = check_same(run_tv(), run_ours(), args.atol)  # both built with box_score_thresh 0: 100 detections
        tv.roi_heads.score_thresh = ours.head.roi_heads.score_thresh = args.score_thresh
        for _ in range(args.warmup):
            run_tv()
            run_ours()
        sync()
        times: dict[str, list[float]] = {"torchvision": [], "detkit": []}
        for i in range(args.repeats):
            # interleaved, alternating which goes first: A B B A A B ...
            order = [("torchvision", run_tv), ("detkit", run_ours)]
            for label, fn in order if i % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                fn()
                sync()
                times[label].append(time.perf_counter() - t)
    t_tv, t_ours = statistics.median(times["torchvision"]), statistics.median(times["detkit"])
    paired = statistics.median(a / b for a, b in zip(times["detkit"], times["torchvision"], strict=True))
    return {"case": name, "size": size, "detkit_model": case.what, "identical_detections": True,
            "max_abs_diff": worst, "torchvision_ms": t_tv * 1e3, "detkit_ms": t_ours * 1e3,
            "ratio": t_ours / t_tv, "overhead_pct": (t_ours / t_tv - 1) * 100, "paired_ratio": paired,
            "torchvision_times_ms": [t * 1e3 for t in times["torchvision"]],
            "detkit_times_ms": [t * 1e3 for t in times["detkit"]]}


def parse_case(spec: str) -> tuple[str, int]:
    name, _, size = spec.partition("@")
    if name not in CASES:
        raise SystemExit(f"detector_inference.py: unknown case {name!r} (known: {', '.join(CASES)})")
    if size and (not size.isdigit() or int(size) < 32 or int(size) % 32):
        # torchvision pads its batches to multiples of 32: other sizes would give the two models different inputs
        raise SystemExit(f"detector_inference.py: bad size in {spec!r} (expected name@N, N a multiple of 32)")
    return name, int(size) if size else CASES[name].size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="NAME[@SIZE]",
                        help=f"default: {' '.join(DEFAULT_CASES)}; known: {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each model (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each model first")
    parser.add_argument("--threads", type=int, default=cores(),
                        help="torch.set_num_threads (default: all cores available)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--precision", default="32", choices=["32", "16-mixed", "bf16-mixed"],
                        help="16-mixed/bf16-mixed: both models under torch.autocast (fp16 / bf16)")
    parser.add_argument("--atol", type=float, default=None,
                        help="parity tolerance on boxes (pixels) and scores (default 1e-4; 1e-2 under autocast)")
    parser.add_argument("--score-thresh", type=float, default=0.05,
                        help="box score threshold while timing (the parity check uses 0.0: 100 detections each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.precision == "16-mixed" and not args.device.startswith("cuda"):
        parser.error("--precision 16-mixed needs --device cuda (on the CPU use bf16-mixed or 32)")
    if args.atol is None:
        args.atol = 1e-4 if args.precision == "32" else 1e-2
    cases = [parse_case(s) for s in args.cases]
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device} ({device_name(args.device)}), precision {args.precision}, batch 1, median of "
          f"{args.repeats} interleaved runs after {args.warmup} warmup, box score threshold {args.score_thresh}")
    header = (f"{'case':30s} {'size':>5s} {'torchvision ms':>15s} {'detkit ms':>10s} {'ratio':>6s} "
              f"{'overhead %':>11s} {'paired':>7s}")
    rows = []
    for name, size in cases:
        row = run_case(name, CASES[name], size, args)
        print(f"{name}@{size}: identical detections: yes (max |diff| {row['max_abs_diff']:.2g}; "
              f"detkit side: {row['detkit_model']})")
        rows.append(row)
    print()
    print(header)
    for r in rows:
        print(f"{r['case']:30s} {r['size']:5d} {r['torchvision_ms']:15.2f} {r['detkit_ms']:10.2f} {r['ratio']:6.3f} "
              f"{r['overhead_pct']:+11.1f} {r['paired_ratio']:7.3f}")
    print("ratio = median detkit / median torchvision; paired = median of per-pair ratios; "
          "requirement: overhead <= 2 %")
    if args.json:
        out = {**environment(args.device), "precision": args.precision, "batch": 1, "repeats": args.repeats,
               "warmup": args.warmup, "score_thresh": args.score_thresh, "results": rows}
        write_json(out, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
