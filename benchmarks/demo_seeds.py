"""The `make demo` recipe over several seeds: how far its README number depends on the run's random path.

Each seed trains ``configs/faster_rcnn/shapes.yaml`` as ``make demo`` does (``detkit train CONFIG output_dir=...
seed=S``, the shapes set made under data/shapes on first use), then ``detkit eval RUN`` scores its best.ckpt
(picked by bbox_AP among the validations) -- the number the demo reports. Per seed: AP50, AP, VOC07 of best.ckpt,
the last validation's AP50 (``metrics_last.json``, what training wrote), each validation's AP and AP50, the
training's wall and CPU seconds (on a shared machine the CPU seconds are the steadier cost); then mean +- std
(sample std), min and max.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 1,2,3,4,5 --out /tmp/demo_seeds/base [key=value ...]
    .venv/bin/python benchmarks/demo_seeds.py --check 0.70     # CI: one demo run (the config's seed), floor on AP50

Resumable: a seed whose run directory holds ``seed.json`` is reported, not trained again (an unfinished one is
trained again from the start). Writes ``OUT/summary.json`` (rows, statistics, environment). ``--check FLOOR``
trains once with the config's own seed into ``--out`` (default: a temporary folder) and exits 1 with one line when
best.ckpt's AP50 is below FLOOR.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import environment, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/faster_rcnn/shapes.yaml"
DETKIT = [sys.executable, "-m", "detkit"]
KEYS = ("bbox_AP50", "bbox_AP", "voc07_mAP")


def run_seed(out: Path, seed: int | None, config: str, overrides: list[str]) -> dict:
    """Train (unless ``out/seed.json`` says it is done) and score best.ckpt; the seed's row."""
    record = out / "seed.json"
    if record.is_file():
        return json.loads(record.read_text())
    shutil.rmtree(out, ignore_errors=True)
    extra = [f"seed={seed}"] if seed is not None else []
    cmd = [*DETKIT, "train", config, f"output_dir={out}", *extra, *overrides, "trainer.enable_progress_bar=false"]
    start, cpu = time.perf_counter(), cpu_seconds()
    subprocess.run(cmd, cwd=ROOT, check=True)
    train_s, cpu_s = time.perf_counter() - start, cpu_seconds() - cpu
    last = json.loads((out / "metrics.json").read_text())
    write_json(last, out / "metrics_last.json")
    subprocess.run([*DETKIT, "eval", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # best.ckpt
    best = json.loads((out / "metrics.json").read_text())
    row = {"seed": seed, "train_s": round(train_s, 1), "cpu_s": round(cpu_s, 1), **{k: best.get(k) for k in KEYS},
           "last_AP50": last.get("bbox_AP50"), "validations": validations(out)}
    write_json(row, record)
    return row


def cpu_seconds() -> float:
    """CPU seconds of the finished child processes (a run's cost that a shared machine's load barely changes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def validations(out: Path) -> list[dict]:
    """(epoch, step, AP, AP50) of each validation, from the run's CSV log."""
    rows = []
    for path in sorted(out.glob("csv/**/metrics.csv")):
        with path.open() as f:
            for r in csv.DictReader(f):
                if r.get("val/bbox_AP50"):
                    rows.append({"epoch": int(r["epoch"]), "step": int(r["step"]),
                                 "AP": round(float(r["val/bbox_AP"]), 4), "AP50": round(float(r["val/bbox_AP50"]), 4)})
    return rows


def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--out", default=None, help="runs go to OUT/seed<S> (default: /tmp/demo_seeds/runs)")
    p.add_argument("--check", type=float, default=None, metavar="FLOOR",
                   help="CI: train once with the config's seed; exit 1 when best.ckpt's AP50 < FLOOR")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = p.parse_args()

    if args.check is not None:
        with tempfile.TemporaryDirectory(prefix="demo_check_") as tmp:
            out = Path(args.out) if args.out else Path(tmp)
            row = run_seed(out / "demo", None, args.config, args.overrides)
        ap50 = row["bbox_AP50"] or 0.0
        verdict = "ok" if ap50 >= args.check else "FAILED"
        print(f"demo check {verdict}: AP50 {ap50:.3f} (floor {args.check:.3f}; AP {row['bbox_AP']:.3f}, "
              f"VOC07 {row['voc07_mAP']:.3f}; {row['train_s'] / 60:.1f} min training)")
        return 0 if ap50 >= args.check else 1

    out = Path(args.out or "/tmp/demo_seeds/runs")
    rows = []
    print("| seed | AP50 | AP | VOC07 | last val AP50 | best at epoch | train s | CPU s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        row = run_seed(out / f"seed{seed}", seed, args.config, args.overrides)
        rows.append(row)
        best_epoch = max(row["validations"], key=lambda v: v["AP"])["epoch"] + 1 if row["validations"] else None
        cpu = row.get("cpu_s") or float("nan")
        print(f"| {seed} | {row['bbox_AP50']:.3f} | {row['bbox_AP']:.3f} | {row['voc07_mAP']:.3f} | "
              f"{row['last_AP50']:.3f} | {best_epoch} | {row['train_s']:.0f} | {cpu:.0f} |", flush=True)
    summary = {key: stats([r[key] for r in rows]) for key in (*KEYS, "last_AP50", "train_s")}
    for key, s in summary.items():
        print(f"{key}: {s['mean']:.3f} +- {s['std']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}, n={len(rows)})")
    out.mkdir(parents=True, exist_ok=True)
    write_json({"config": args.config, "overrides": args.overrides, "rows": rows, "summary": summary,
                "environment": environment()}, out / "summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
