#!/usr/bin/env python
"""Training throughput (images/s) of detkit's Lightning engine against a bare PyTorch loop, same model and data.

Both sides train the model of one config (default: the shapes Faster R-CNN, ResNet-18 FPN at 128 px, batch 8)
from the same initial weights on the same batches of the same DataModule loader:

- **bare**: a plain Python loop in the style of torchvision's detection reference (``train_one_epoch``):
  normalise, ``model(images, targets, image_sizes)``, sum the losses, check the loss is finite, backward,
  (gradient clipping when the config has it), SGD step, per-step LR schedule; autocast (+ GradScaler for
  fp16) under mixed precision.
- **detkit**: ``detkit.train(cfg)``, i.e. the DataModule, the LightningModule and the Trainer with detkit's
  callbacks and loggers, stopped by ``trainer.max_steps``; validation off.

Only the steady state is timed: from the start of step ``--warmup`` to the end of the last step (a Lightning
callback on the engine side), so model building, Lightning's setup and the final checkpoint are left out. The
two sides alternate for ``--rounds`` rounds; ratio = detkit img/s / bare img/s (1.00 = same speed), overhead =
the extra time per step in %. Usage:

    .venv/bin/python benchmarks/train_throughput.py [--config configs/faster_rcnn/shapes.yaml] [--batch 8]
        [--steps 20] [--warmup 3] [--rounds 2] [--threads N] [--device cpu|cuda] [--precision 32|16-mixed|bf16-mixed]
        [--set KEY=VALUE ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import random
import shutil
import statistics
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from common import cores, device_name, environment, write_json

import detkit
from detkit import load_config
from detkit.engine.module import DetectionModule, epoch_seed
from detkit.engine.optim import lr_factor
from detkit.engine.run import build_datamodule

ROOT = Path(__file__).resolve().parents[1]


def to_device(obj, device: torch.device):
    """Tensors in nested dicts/lists moved to ``device`` (what Lightning does to a batch)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Window:
    """Counts training steps; the clock runs from the start of step ``warmup`` to the end of step
    ``warmup + steps - 1`` (0-based), counting the images in between."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.seen = self.images = 0
        self.t0 = self.t1 = None
        self.first_loss: float | None = None

    def start(self) -> None:
        if self.seen == self.warmup:
            synchronize(self.device)
            self.t0 = time.perf_counter()

    def end(self, batch_images: int, loss: torch.Tensor | None = None) -> bool:
        """After a step; True once the window is complete."""
        if self.seen == 0 and loss is not None:
            self.first_loss = float(loss)
        self.seen += 1
        if self.seen > self.warmup:
            self.images += batch_images
        if self.seen == self.warmup + self.steps:
            synchronize(self.device)
            self.t1 = time.perf_counter()
        return self.t1 is not None

    @property
    def rate(self) -> float:
        if self.t1 is None:
            raise RuntimeError(f"the run stopped after {self.seen} steps, before the timing window ended")
        return self.images / (self.t1 - self.t0)

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


class WindowCallback(L.Callback):
    def __init__(self, window: Window) -> None:
        self.window = window

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.window.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.window.end(int(batch["images"].shape[0]), loss)


# ------------------------------------------------------------------------------------------------- sides
def autocast(device: torch.device, precision: str):
    if precision == "32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "16-mixed" else torch.bfloat16)


def run_bare(cfg, args, device: torch.device) -> Window:
    """torchvision-reference-style loop over the same DataModule loader (same seed, same first epoch)."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # as detkit.train: the same initial weights
    dm = build_datamodule(cfg)
    dm.setup("fit")
    module = DetectionModule(cfg, classes=dm.classes)
    model = module.model.to(device).train()  # it normalises its uint8 input itself
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=float(t.lr), momentum=float(t.momentum), weight_decay=float(t.weight_decay))
    per_epoch = len(dm.train_dataloader())
    total = per_epoch * int(t.epochs)  # the engine's schedule length (it does not depend on trainer.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t, total, per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    window = Window(args.warmup, args.steps, device)
    epoch = 0
    while True:
        # as the engine at every epoch start: sampler order, augmentations and RPN/RoI sampling seeded by the epoch
        dm.set_epoch(epoch, epoch_seed(cfg.seed, epoch, 0))
        batches = iter(dm.train_dataloader())
        seed = epoch_seed(cfg.seed, epoch, 0)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        for batch in batches:
            window.start()
            batch = to_device(batch, device)
            with autocast(device, args.precision):
                losses = model(batch["images"], batch["targets"], batch["image_sizes"])
                loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                raise SystemExit(f"train_throughput.py: loss is not finite ({loss.item()}) in the bare loop")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, float(t.grad_clip))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if window.end(int(batch["images"].shape[0]), loss.detach()):
                return window
        epoch += 1


def run_detkit(cfg, args, device: torch.device) -> Window:
    """``detkit.train`` with a timing callback; the run directory is a temporary one."""
    window = Window(args.warmup, args.steps, device)
    out = Path(tempfile.mkdtemp(prefix="detkit-train-throughput-"))
    cfg = copy.deepcopy(cfg)
    cfg.output_dir = str(out)
    try:
        detkit.train(cfg, callbacks=[WindowCallback(window)])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return window


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/faster_rcnn/shapes.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating (median reported)")
    parser.add_argument("--threads", type=int, default=cores(),
                        help="torch.set_num_threads (default: all cores available)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--precision", default="32", choices=["32", "16-mixed", "bf16-mixed"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = parser.parse_args()
    if min(args.batch, args.steps, args.rounds, args.threads) < 1 or args.warmup < 0:
        parser.error("--batch, --steps, --rounds and --threads must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.precision == "16-mixed" and device.type != "cuda":
        parser.error("--precision 16-mixed needs --device cuda (on the CPU use bf16-mixed or 32)")
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    accelerator = "gpu" if device.type == "cuda" else "cpu"
    devices = f"[{device.index}]" if device.index is not None else "1"
    cfg = load_config(args.config, [
        f"data.batch_size={args.batch}", "data.val.format=null", "train.optimizer=sgd",
        f"trainer.accelerator={accelerator}", f"trainer.devices={devices}", f"trainer.precision={args.precision}",
        f"trainer.max_steps={args.warmup + args.steps}", "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        *args.set])
    steps_per_epoch = len(build_datamodule(cfg).train_dataloader())

    m = cfg.model
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads, device "
          f"{args.device} ({device_name(device)}), precision {args.precision}")
    print(f"model {m.head.name} {m.backbone.name}/{m.neck.name}, {cfg.data.image_size} px, batch {args.batch}, "
          f"SGD lr {cfg.train.lr}, grad clip {cfg.train.grad_clip}; {args.warmup} warmup + {args.steps} timed "
          f"steps, {args.rounds} rounds; {steps_per_epoch} steps per epoch")
    if args.warmup + args.steps > steps_per_epoch:
        print("note: the runs cross epoch boundaries: the engine's epoch-end work (last.ckpt) is in its window")
    runs: dict[str, list[dict]] = {"bare": [], "detkit": []}
    sides = [("bare", run_bare), ("detkit", run_detkit)]
    for r in range(args.rounds):
        for name, fn in sides if r % 2 == 0 else sides[::-1]:
            w = fn(cfg, args, device)
            runs[name].append({"images_per_s": w.rate, "seconds": w.seconds, "images": w.images,
                               "first_loss": w.first_loss})
            print(f"round {r + 1} {name:7s} {w.rate:8.2f} img/s ({w.images} images in {w.seconds:.2f} s; "
                  f"first-step loss {w.first_loss:.6f})")
    bare = statistics.median(x["images_per_s"] for x in runs["bare"])
    ours = statistics.median(x["images_per_s"] for x in runs["detkit"])
    ratio = ours / bare
    overhead = (bare / ours - 1) * 100
    print()
    print(f"{'loop':28s} {'img/s':>8s} {'ratio':>6s}")
    print(f"{'bare PyTorch loop':28s} {bare:8.2f} {1:6.2f}")
    print(f"{'detkit engine (Lightning)':28s} {ours:8.2f} {ratio:6.3f}")
    print(f"ratio = detkit / bare images/s (median of {args.rounds} rounds); engine overhead per step: "
          f"{overhead:+.1f} %")
    losses = [x["first_loss"] for v in runs.values() for x in v]
    same = max(losses) - min(losses) <= 1e-4 * max(1.0, abs(losses[0]))  # GPU kernels may differ in the last bits
    print(f"same training (equal first-step losses on both sides): {'yes' if same else 'no'}")
    if args.json:
        out = {**environment(args.device), "lightning": L.__version__, "precision": args.precision,
               "config": args.config, "overrides": list(args.set), "batch": args.batch, "image_size":
               int(cfg.data.image_size), "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
               "bare_images_per_s": bare, "detkit_images_per_s": ours,
               "ratio": ratio, "overhead_pct": overhead, "same_first_step_loss": same, "runs": runs}
        write_json(out, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
