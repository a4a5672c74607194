#!/usr/bin/env python
"""Inference speed of each model family: detkit plain, detkit fast and ONNX Runtime against a reference.

Each case times up to four variants on the same real images, batch 1 (latency, ms per call) and batch 8
(throughput, images/s), their runs interleaved, alternating the order each round (A B C D, D C B A, ...) so
machine noise hits all alike; medians of ``--repeats`` runs after ``--warmup``. Usage:

    .venv/bin/python benchmarks/inference.py [--cases faster_rcnn_resnet50_fpn@512 unet_lite0 ...]
        [--batch 1 8] [--repeats 10] [--warmup 2] [--threads N] [--device cpu|cuda] [--no-onnx]
        [--score-thresh T] [--atol 1e-3] [--box-atol 1e-2] [--json OUT]

Variants: ``torchvision``, its own builder where one exists (the reference, ratio 1.00; elsewhere the
reference is ``detkit plain``); ``detkit plain``, the detkit model with the same weights, eval mode,
``inference_mode``; ``detkit fast``, the same after ``optimize_for_inference`` (BatchNorm folded,
``channels_last`` weights and input, the input's conversion timed); ``detkit fast+compile``, the same plus
``torch.compile`` of backbone and neck (inductor, weights frozen; compiled in the untimed parity call);
``onnxruntime``, the exported graph
(BatchNorm folded) in one CPU session with as many intra-op threads as torch and no spinning between runs
(two-stage models exported per batch size, the others with a dynamic batch). Every timed call includes the
normalisation and the post-processing (U-Net: the logits, which is what the export computes).

Cases (``name@size``: square input size, a multiple of 32, of 64 for the MobileNet Faster R-CNN; default in
brackets):
``faster_rcnn_resnet50_fpn`` (512; torchvision's own 800 with ``@800``) and
``faster_rcnn_mobilenet_v3_large_320_fpn`` (320), detector_inference.py's ``resnet50_fpn`` and
``mobilenet_v3_large_320_fpn``; ``ssdlite320_mobilenet_v3_large`` (320), torchvision's builder (identity
resize skipped) vs detkit parts with its taps (ssdlite.py); ``yolo_resnet18_pan`` (320),
configs/yolo/shapes.yaml; ``unet_lite0`` (320), configs/unet/camvid.yaml (real ImageNet weights if
../shared/weights has them).

Weights: random (seeded); every BatchNorm still at its initial statistics is then recalibrated (train-mode
BatchNorms with ``momentum=None``, a plain average, in an eval-mode forward of the reference) on 16 real images
(../shared/datasets/coco128, else tests/fixtures/raccoon_mini), and the reference's weights are loaded into
the detkit model. Inputs: 8 further images resized to the square size. The heads stay random: class scores
are near-uniform, so at the SSD/YOLO threshold of 0.001 many candidates reach NMS (more than with trained
weights; SSD: 27,000 per image; the exported graph runs ONNX NonMaxSuppression per image and class), while
Faster R-CNN's 0.05 leaves few.

Parity, before each batch's timing, with all score thresholds at 0 (100-300 detections per image): plain and
fast against the reference, onnxruntime against fast. Identical: per image the same number of detections,
each matched (as sets: near-tied scores may swap order) by one of the same label, score within ``--atol``
and box coordinates within ``--box-atol`` px (folding BatchNorm changes float32 rounding: ~1e-3 px at 320,
~5e-3 px at 512); detections tied at the per-image cut may differ; U-Net: logits within ``--atol``. The timed
runs use the models' own thresholds (Faster R-CNN 0.05 as torchvision, SSD/YOLO 0.001; the ONNX graphs bake
them in). Ratio columns: time / reference time (batch 1: < 1 is faster), images/s / reference images/s
(batch 8: > 1 is faster). Aim on the CPU: detkit fast <= 0.75x torchvision's batch-1 time, identical detections.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detector_inference as rcnn_bench  # noqa: E402
import ssdlite as ssd_bench  # noqa: E402
from common import cores, device_name, environment, write_json  # noqa: E402

from detkit import build_model, load_config  # noqa: E402
from detkit.heads.ssd import from_torchvision_ssdlite  # noqa: E402
from detkit.inference.export import ExportModel, to_onnx  # noqa: E402
from detkit.inference.optimize import fold_batch_norms, optimize_for_inference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (ROOT.parent / "shared", ROOT / "shared") if p.is_dir()), None)


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Built:
    head: str  # faster_rcnn | ssd | yolo | unet
    reference: nn.Module | None  # torchvision's model, or None (the reference is detkit plain)
    model: nn.Module  # the detkit model (weights loaded from the reference's after calibration)
    key_map: object  # torchvision state dict -> detkit's
    mean: tuple
    std: tuple
    note: str


def faster_rcnn(key: str):
    case = rcnn_bench.CASES[key]
    return lambda size: Built("faster_rcnn", case.torchvision(size), case.detkit(size), case.key_map,
                              rcnn_bench.MEAN, rcnn_bench.STD, case.what)


def ssdlite(size: int) -> Built:
    return Built("ssd", ssd_bench.torchvision_ssdlite(90, resize=False), ssd_bench.detkit_taps(size, 90),
                 from_torchvision_ssdlite, ssd_bench.TV_MEAN, ssd_bench.TV_STD, "detkit parts with torchvision's taps")


def from_config(head: str, path: str, overrides: list[str], note: str):
    def build(size: int) -> Built:
        cfg = load_config(ROOT / path, [f"data.image_size={size}", *overrides])
        weights = cfg.model.backbone.get("pretrained")
        if weights and not Path(weights).is_absolute():
            found = (ROOT / weights).resolve()
            cfg.model.backbone.pretrained = str(found) if found.is_file() else None
        model = build_model(cfg)
        what = f"{note}, backbone {'weights ' + Path(weights).name if cfg.model.backbone.pretrained else 'random'}"
        return Built(head, None, model, None, model.backbone.mean, model.backbone.std, what)
    return build


CASES = {
    "faster_rcnn_resnet50_fpn": (512, faster_rcnn("resnet50_fpn")),
    "faster_rcnn_mobilenet_v3_large_320_fpn": (320, faster_rcnn("mobilenet_v3_large_320_fpn")),
    "ssdlite320_mobilenet_v3_large": (320, ssdlite),
    "yolo_resnet18_pan": (320, from_config("yolo", "configs/yolo/shapes.yaml", ["data.generate=null"],
                                           "configs/yolo/shapes.yaml")),
    "unet_lite0": (320, from_config("unet", "configs/unet/camvid.yaml", [], "configs/unet/camvid.yaml")),
}


def score_thresh(head: str, model: nn.Module, torchvision_model: bool, value: float | None = None) -> float:
    """The box score threshold of a model (set to ``value`` first if given); None for U-Net."""
    if head == "unet":
        return None
    if head == "faster_rcnn":
        owner = model.roi_heads if torchvision_model else model.head.roi_heads
    else:  # ssd: torchvision's SSD or detkit's head; yolo: the head's params
        owner = model if torchvision_model else model.head.p if head == "yolo" else model.head
    if value is not None:
        owner.score_thresh = value
    return owner.score_thresh


# ----------------------------------------------------------------------------------------------- inputs
def load_images(size: int, n: int) -> tuple[torch.Tensor, str]:
    """``n`` real images (cycled if fewer), resized to ``size`` x ``size``: ``n x 3 x size x size`` in 0..1."""
    folder = SHARED / "datasets/coco128/images" if SHARED else None
    files = sorted(folder.rglob("*.jpg")) if folder and folder.is_dir() else []
    if not files:
        folder = ROOT / "tests/fixtures/raccoon_mini/images"
        files = sorted(folder.glob("*.jpg"))
    images = [pil_to_tensor(Image.open(files[i % len(files)]).convert("RGB").resize((size, size), Image.BILINEAR))
              for i in range(n)]
    return torch.stack(images).float() / 255, str(folder)


@torch.no_grad()
def calibrate(model: nn.Module, run, images: torch.Tensor, chunk: int = 4) -> int:
    """Recalibrate the BatchNorms still at their initial statistics (mean 0, var 1): running averages of batch
    statistics (``momentum=None``) over ``images`` in an eval-mode forward. Returns how many."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and not m.running_mean.any() and bool((m.running_var == 1).all())]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for i in range(0, len(images), chunk):
        run(images[i:i + chunk])
    model.eval()
    return len(norms)


# ------------------------------------------------------------------------------------------------- ONNX
def onnx_session(model: nn.Module, built: Built, example: torch.Tensor, dynamic: bool, path: Path, threads: int):
    """Export a folded copy of ``model`` (input 0..255) and open it in onnxruntime (CPU)."""
    import onnxruntime as ort

    folded = copy.deepcopy(model).cpu().eval()
    fold_batch_norms(folded)
    wrapper = ExportModel(folded).eval().requires_grad_(False)  # the model's own normalisation is in the graph
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python values baked into the graph
        to_onnx(wrapper, example.cpu() * 255, path, dynamic)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.set_denormal_as_zero", "1")  # as torch.set_flush_denormal
    # no busy-waiting workers after a run: they would take the cores from the variant timed next (2x its time)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def per_image(out, batch: int) -> list[dict] | np.ndarray:
    """Any variant's output as numpy: logits, or one {boxes, scores, labels} dict per image."""
    if isinstance(out, torch.Tensor):
        return out.float().cpu().numpy()
    if isinstance(out, list) and isinstance(out[0], np.ndarray):  # onnxruntime
        if len(out) == 1:
            return out[0]
        boxes, scores, labels, index = out[:4]
        return [{"boxes": boxes[index == i], "scores": scores[index == i], "labels": labels[index == i]}
                for i in range(batch)]
    return [{k: d[k].float().cpu().numpy() if k != "labels" else d[k].cpu().numpy()
             for k in ("boxes", "scores", "labels")} for d in out]


def compare(ref, got, atol: float, box_atol: float) -> tuple[bool, dict, str]:
    """(identical, largest differences, note): logits within ``atol`` (rtol 1e-4), or the set match of the
    module docstring. A detection left unmatched on both sides is a tie at the per-image cut
    (``detections_per_img``), not a difference, when its score is within ``atol`` of the lowest kept score."""
    if isinstance(ref, np.ndarray):
        return bool(np.allclose(got, ref, atol=atol, rtol=1e-4)), {"logits": float(np.abs(ref - got).max())}, ""
    worst, total, ties = {"box": 0.0, "score": 0.0}, 0, 0
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        if len(r["scores"]) != len(g["scores"]):
            return False, worst, f"image {i}: {len(g['scores'])} vs {len(r['scores'])} detections"
        if not len(r["scores"]):
            continue
        box = np.abs(r["boxes"][:, None] - g["boxes"][None]).max(-1)
        score = np.abs(r["scores"][:, None] - g["scores"][None])
        cost = np.maximum(box / box_atol, score / atol)  # <= 1: a match
        cost[r["labels"][:, None] != g["labels"][None]] = np.inf
        lost, extra = cost.min(1) > 1, cost.min(0) > 1
        total += len(r["scores"])
        if lost.any():
            if lost.sum() != extra.sum() or (r["scores"][lost] > r["scores"].min() + atol).any() \
                    or (g["scores"][extra] > g["scores"].min() + atol).any():
                return False, worst, f"image {i}: {int(lost.sum())} detections without a match"
            ties += int(lost.sum())
        rows = np.nonzero(~lost)[0]
        j = cost[rows].argmin(1)
        worst = {"box": max(worst["box"], float(box[rows, j].max(initial=0))),
                 "score": max(worst["score"], float(score[rows, j].max(initial=0)))}
    if not total:
        return False, worst, "no detections to compare"
    return True, worst, f"{total} detections" + (f", {ties} tied at the per-image cut" if ties else "")


def describe(worst: dict) -> str:
    return ", ".join(f"{k} {v:.2g}" for k, v in worst.items())


# ---------------------------------------------------------------------------------------------- running
def run_case(name: str, size: int, args, tmp: Path) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    built = CASES[name][1](size)
    images, source = load_images(size, 16 + max(args.batch))
    calib, inputs = images[:16].to(device), images[16:].to(device)
    mean = torch.tensor(built.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(built.std, device=device).view(1, 3, 1, 1)

    def detkit_call(model, channels_last: bool):
        def call(x):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = (x - mean) / std
            return model.logits(x) if built.head == "unet" else model(x)
        return call

    plain, tv = built.model.to(device).eval(), built.reference
    if tv is not None:
        tv = tv.to(device).eval()
        recalibrated = calibrate(tv, lambda x: tv(list(x)), calib)
        result = plain.load_state_dict(built.key_map(tv.state_dict()), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
    else:
        recalibrated = calibrate(plain, detkit_call(plain, False), calib)
    fast = copy.deepcopy(plain)
    report = optimize_for_inference(fast)
    calls = {"detkit plain": detkit_call(plain, False), "detkit fast": detkit_call(fast, True)}
    owners = {"detkit plain": (plain, False), "detkit fast": (fast, False)}  # model, is torchvision's
    if args.compile:  # compiled on the first call of each batch size: the parity check's, untimed
        compiled = copy.deepcopy(plain)
        optimize_for_inference(compiled, compile=True)
        calls["detkit fast+compile"] = detkit_call(compiled, True)
        owners["detkit fast+compile"] = (compiled, False)
    if tv is not None:
        calls, owners["torchvision"] = {"torchvision": lambda x: tv(list(x)), **calls}, (tv, True)
    reference = "torchvision" if tv is not None else "detkit plain"
    timed = {k: score_thresh(built.head, m, is_tv) for k, (m, is_tv) in owners.items()}
    if built.head == "faster_rcnn":  # built with threshold 0 (the parity check's); timed at torchvision's default
        timed = dict.fromkeys(owners, 0.05)
    if args.score_thresh is not None and built.head != "unet":
        timed = dict.fromkeys(owners, args.score_thresh)
    use_onnx, onnx_error, sessions = args.onnx and device.type == "cpu", None, {}
    two_stage = built.head == "faster_rcnn"

    def variants(batch: int, phase: str, thresholds: dict) -> dict:
        """The calls of every variant at these thresholds (an ONNX graph per threshold, as they are baked in,
        and for two-stage models per batch size)."""
        nonlocal use_onnx, onnx_error
        for key, (m, is_tv) in owners.items():
            score_thresh(built.head, m, is_tv, thresholds[key])
        fns = dict(calls)
        key = (phase, batch if two_stage else "any")
        if use_onnx and key not in sessions:
            t, path = time.perf_counter(), tmp / f"{name}-{phase}-{key[1]}.onnx"
            try:
                sessions[key] = onnx_session(plain, built, inputs[:batch], not two_stage, path, args.threads)
                print(f"  exported {path.name} ({path.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t:.0f} s)")
            except Exception as e:  # an op without an ONNX counterpart, say: time the others
                onnx_error, use_onnx = f"{type(e).__name__}: {(str(e) or ' ').splitlines()[0]}", False
                print(f"  ONNX export failed, no onnxruntime variant: {onnx_error}")
        if use_onnx:
            array = (inputs[:batch].cpu() * 255).numpy()
            fns["onnxruntime"] = lambda _, s=sessions[key]: s.run(None, {"images": array})
        return fns

    print(f"{name}@{size}: {built.note}; {recalibrated} BatchNorms recalibrated; fast: {report}")
    rows = {k: {"batches": {}} for k in [*calls, *(["onnxruntime"] if use_onnx else [])]}
    for batch in args.batch:
        x = inputs[:batch]
        fns = variants(batch, "check", dict.fromkeys(owners, 0.0))  # parity: every score threshold at 0
        with torch.inference_mode():
            tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # exact on CUDA
            outs = {k: per_image(fn(x), batch) for k, fn in fns.items()}
            torch.backends.cudnn.allow_tf32 = tf32
        for key in [k for k in outs if k != reference]:
            against = "detkit fast" if key == "onnxruntime" else reference
            same, worst, note = compare(outs[against], outs[key], args.atol, args.box_atol)
            rows[key]["batches"][batch] = {"identical": same, "max_diff": worst, "against": against, "note": note}
            print(f"  batch {batch}: {key} vs {against}: identical detections: {'yes' if same else 'no'} "
                  f"(max diff {describe(worst)}{'; ' + note if note else ''})")
        fns = variants(batch, "time", timed)
        times = ssd_bench.time_inference({k: (lambda fn=fn: fn(x)) for k, fn in fns.items()}, args.repeats,
                                         args.warmup, device)
        for key, ts in times.items():
            t = statistics.median(ts)
            rows[key]["batches"].setdefault(batch, {}).update(
                {"median_ms": t * 1e3, "images_per_s": batch / t, "time_ratio": t / statistics.median(times[reference]),
                 "times_ms": [v * 1e3 for v in ts]})
    if not use_onnx:
        rows.pop("onnxruntime", None)
    return {"case": name, "size": size, "reference": reference, "detkit_model": built.note, "head": built.head,
            "images": source, "batchnorms_recalibrated": recalibrated, "optimize_report": str(report),
            "score_thresh_timed": timed, "onnx_error": onnx_error, "variants": rows}


def table(result: dict, batches: list[int]) -> str:
    head = ["variant"]
    for b in batches:
        head += [f"batch {b} ms", "time / ref"] if b == 1 else [f"batch {b} img/s", "img/s / ref"]
    lines = [f"**{result['case']}** @ {result['size']} (reference: {result['reference']})", "",
             "| " + " | ".join([*head, "identical"]) + " |", "|---|" + "---:|" * (len(head) - 1) + "---|"]
    for key, row in result["variants"].items():
        cells = [key]
        for b in batches:
            r = row["batches"][b]
            cells += [f"{r['median_ms']:.1f}", f"{r['time_ratio']:.2f}"] if b == 1 else \
                [f"{r['images_per_s']:.2f}", f"{1 / r['time_ratio']:.2f}"]
        checks = [row["batches"][b] for b in batches if "identical" in row["batches"][b]]
        if not checks:
            same = "reference"
        else:
            worst = {k: max(c["max_diff"][k] for c in checks) for k in checks[0]["max_diff"]}
            same = f"{'yes' if all(c['identical'] for c in checks) else 'no'} ({describe(worst)})"
        lines.append("| " + " | ".join([*cells, same]) + " |")
    return "\n".join(lines)


def parse_case(spec: str) -> tuple[str, int]:
    name, _, size = spec.partition("@")
    if name not in CASES:
        raise SystemExit(f"inference.py: unknown case {name!r} (known: {', '.join(CASES)})")
    if size and (not size.isdigit() or int(size) < 64 or int(size) % 32):
        raise SystemExit(f"inference.py: bad size in {spec!r} (expected name@N, N a multiple of 32, >= 64)")
    return name, int(size) if size else CASES[name][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), metavar="NAME[@SIZE]",
                        help=f"default: all ({', '.join(CASES)})")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes (1: latency)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each variant first")
    parser.add_argument("--threads", type=int, default=cores(),
                        help="torch threads and onnxruntime intra-op threads (default: all cores available)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cuda: no onnxruntime variant)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the onnxruntime variant")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the detkit fast+compile variant (torch.compile, inductor with weight freezing)")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="box score threshold while timing (default: the models' own)")
    parser.add_argument("--atol", type=float, default=1e-3, help="parity tolerance on scores and logits")
    parser.add_argument("--box-atol", type=float, default=1e-2, help="parity tolerance on box coordinates (px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write everything (raw times included) to this file")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or min(args.batch) < 1:
        parser.error("--repeats, --threads and --batch must be >= 1, --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    cases = [parse_case(s) for s in args.cases]
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny activations of random heads must not time the CPU's slow denormal path
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version, args.onnx = None, False
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime {ort_version}, "
          f"{torch.get_num_threads()} threads, device {args.device} ({device_name(args.device)}); median of "
          f"{args.repeats} interleaved runs after {args.warmup} warmup")
    results = []
    with TemporaryDirectory() as tmp:
        for name, size in cases:
            results.append(run_case(name, size, args, Path(tmp)))
    print()
    for r in results:
        print(table(r, args.batch) + "\n")
        if r["reference"] == "torchvision" and 1 in args.batch:
            ratio = r["variants"]["detkit fast"]["batches"][1]["time_ratio"]
            print(f"detkit fast / torchvision, batch 1: {ratio:.2f} (aim <= 0.75)\n")
    if args.json:
        out = {**environment(args.device), "onnxruntime": ort_version,
               "onnxruntime_threads": args.threads if args.onnx else None, "batches": args.batch,
               "repeats": args.repeats, "warmup": args.warmup, "atol": args.atol, "box_atol": args.box_atol,
               "seed": args.seed, "results": results}
        write_json(out, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
