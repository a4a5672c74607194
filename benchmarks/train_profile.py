#!/usr/bin/env python
"""Where a training step's time goes: data, forward (backbone, neck, head), assignment and loss, backward,
optimizer, EMA, and the share of a budget that validation takes.

    .venv/bin/python benchmarks/train_profile.py configs/yolo_af/raccoon.yaml [--steps 20] [--warmup 3]
        [--json OUT] [key=value ...]

The config's own model, optimizer, batch size, image size, loader (workers, augmentation) and EMA, run by hand one
phase at a time so that each is timed alone (Lightning's loop adds its own small overhead: `train_throughput.py`).
Phases per step, in milliseconds (median over ``--steps`` after ``--warmup``):

- ``data``: waiting for the next batch of the loader (its workers prepare batches while the step runs);
- ``backbone``, ``neck``, ``head convs``: the forward of each part (hooks on the modules);
- ``decode + assign + loss``: the head's forward outside its convolutions (box decoding, target assignment, loss);
- ``backward``, ``optimizer`` (gradient clipping, step, zero_grad), ``ema`` (the weight average's update, when
  ``train.ema.enabled``).

Then, alone: the loader's images/s with no model (``--loader-batches`` batches; the ceiling data puts on training),
one validation pass over the val split (forward + evaluator), its share of a ``--budget`` run that validates every
``trainer.check_val_every_n_epoch`` epochs, and the model's multiply-adds at the image size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import environment, write_json  # noqa: E402

PHASES = ("data", "backbone", "neck", "head convs", "decode + assign + loss", "backward", "optimizer", "ema")


class PartTimer:
    """Forward time of modules, by name, with pre/post hooks (nested parts are not subtracted)."""

    def __init__(self, parts: dict[str, list[torch.nn.Module]]) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.handles = []
        for name, modules in parts.items():
            for m in modules:
                self.handles.append(m.register_forward_pre_hook(self._start(name, m)))
                self.handles.append(m.register_forward_hook(self._stop(name, m)))
        self.open: dict[int, float] = {}

    def _start(self, name: str, m: torch.nn.Module):
        def hook(*_):
            self.open[id(m)] = time.perf_counter()
        return hook

    def _stop(self, name: str, m: torch.nn.Module):
        def hook(*_):
            self.spent[name] += time.perf_counter() - self.open.pop(id(m))
        return hook

    def take(self) -> dict[str, float]:
        spent, self.spent = dict(self.spent), defaultdict(float)
        return spent


def profile(config: str, overrides: list[str], steps: int, warmup: int, loader_batches: int,
            budget: str, fused: bool = True) -> dict[str, Any]:
    import lightning as L

    from detkit.analysis.complexity import count_complexity
    from detkit.config import load_config
    from detkit.engine.budget import parse_budget
    from detkit.engine.module import DetectionModule
    from detkit.engine.optim import build_optimizer
    from detkit.engine.run import build_datamodule, quiet_lightning

    quiet_lightning()
    cfg = load_config(config, overrides)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    module = DetectionModule(cfg, classes=dm.classes)
    model = module.model
    model.train()
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train, fused=fused and "mixed" not in str(cfg.trainer.precision))
    ema = None
    if cfg.train.ema.enabled:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(cfg.train.ema.decay)), use_buffers=True)
    head_convs = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)]
    timer = PartTimer({"backbone": [model.backbone], "neck": [model.neck] if model.neck is not None else [],
                       "head": [model.head], "head convs": head_convs})
    clip = float(cfg.train.grad_clip or 0)
    loader = dm.train_dataloader()
    rows: dict[str, list[float]] = defaultdict(list)
    totals: list[float] = []
    it = iter(loader)
    done = 0
    while done < warmup + steps:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        t1 = time.perf_counter()
        losses = model.losses(module.layout(batch))
        loss = sum(losses.values())
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if ema is not None:
            ema.update_parameters(model)
        t5 = time.perf_counter()
        parts = timer.take()
        if done >= warmup:
            head_other = parts.get("head", 0.0) - parts.get("head convs", 0.0)
            forward_other = (t2 - t1) - parts.get("backbone", 0.0) - parts.get("neck", 0.0) - parts.get("head", 0.0)
            for name, seconds in (("data", t1 - t0), ("backbone", parts.get("backbone", 0.0)),
                                  ("neck", parts.get("neck", 0.0)), ("head convs", parts.get("head convs", 0.0)),
                                  ("decode + assign + loss", head_other + forward_other), ("backward", t3 - t2),
                                  ("optimizer", t4 - t3), ("ema", t5 - t4)):
                rows[name].append(seconds * 1e3)
            totals.append((t5 - t0) * 1e3)
        done += 1
    del it
    batch_size = int(cfg.data.batch_size)
    step_ms = statistics.median(totals)
    phases = {name: round(statistics.median(rows[name]), 1) for name in PHASES}

    # the loader alone: the most images/s the data side can feed
    t0 = time.perf_counter()
    seen = 0
    for i, batch in enumerate(dm.train_dataloader()):
        seen += len(batch["targets"])
        if i + 1 >= loader_batches:
            break
    loader_ips = seen / (time.perf_counter() - t0)

    # one validation pass: forward and evaluator over the val split
    val_s = None
    val_share = None
    if dm.dataset("val") is not None:
        from detkit.evaluation.build import build_evaluator

        model.eval()
        t0 = time.perf_counter()
        evaluator = build_evaluator(dm.dataset("val"), cfg.eval, model.traits, int(cfg.model.num_classes))
        with torch.inference_mode():
            for batch in dm.val_dataloader():
                evaluator.add_batch(model.predict(module.layout(batch)), batch["targets"])
            evaluator.compute()
        val_s = time.perf_counter() - t0
        model.train()
        every = int(cfg.trainer.check_val_every_n_epoch or 1)
        per_epoch = len(dm.train_dataloader())
        budget_s = parse_budget(budget)
        epoch_s = per_epoch * step_ms / 1e3
        epochs = budget_s / (epoch_s + val_s / every)
        val_share = epochs / every * val_s / budget_s
    size = int(cfg.data.image_size)
    comp = count_complexity(model, size)
    return {"config": config, "overrides": overrides, "fused_optimizer": "fused" in optimizer.defaults and
            bool(optimizer.defaults["fused"]), "batch_size": batch_size, "image_size": size,
            "num_workers": int(cfg.data.num_workers), "threads": torch.get_num_threads(),
            "step_ms": round(step_ms, 1), "images_per_s": round(batch_size / step_ms * 1e3, 2), "phases_ms": phases,
            "loader_images_per_s": round(loader_ips, 1), "val_s": round(val_s, 1) if val_s else None,
            "val_share_of_budget": round(val_share, 3) if val_share is not None else None, "budget": budget,
            "macs": comp.flops, "params": comp.params, "environment": environment()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--budget", default="10min", help="the budget whose validation share is reported")
    p.add_argument("--json", default=None, help="write the record here")
    p.add_argument("--unfused", action="store_true", help="the optimizer's per-op update instead of the fused one")
    args = p.parse_args()
    r = profile(args.config, args.overrides, args.steps, args.warmup, args.loader_batches, args.budget,
                fused=not args.unfused)
    print(f"{r['config']} {' '.join(r['overrides'])}: batch {r['batch_size']} at {r['image_size']} px, "
          f"{r['macs'] / 1e9:.2f} GMACs, {r['params'] / 1e6:.2f} M params, {r['threads']} threads, "
          f"{r['num_workers']} loader workers")
    print("| phase | ms per step | share |\n|---|---:|---:|")
    for name, ms in r["phases_ms"].items():
        print(f"| {name} | {ms:.1f} | {ms / r['step_ms']:.0%} |")
    print(f"| step (median) | {r['step_ms']:.1f} | {r['images_per_s']:.2f} img/s |")
    print(f"loader alone: {r['loader_images_per_s']:.1f} img/s; one validation pass: {r['val_s']} s, "
          f"{r['val_share_of_budget']:.1%} of a {r['budget']} budget" if r["val_s"] else "no val split")
    if args.json:
        write_json(r, Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
