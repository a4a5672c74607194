"""Shared test helpers. Tests that need ../shared (real data, real weights) skip cleanly without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DETKIT_SHARED", ROOT.parent / "shared"))

# one thread per pytest-xdist worker (make test runs one worker per core), else at most two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when it is absent (a user's machine)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture
def write_yaml(tmp_path):
    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write


FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """The generated shapes dataset (small), made once per test session."""
    from detkit.data.shapes import make_shapes

    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, num_images=36, image_size=96, seed=3)
    return out


def sweep(values, fast, ids=None) -> list:
    """Parameters of a sweep over many networks or configs: those in ``fast`` run in the fast tier (``make test``),
    the rest only in the full one (marked ``slow``)."""
    ids = list(ids) if ids is not None else [str(v) for v in values]
    return [pytest.param(v, id=i, marks=() if v in fast or i in fast else pytest.mark.slow)
            for v, i in zip(values, ids)]


def shapes_cfg(root, split="train"):
    return {"format": "coco", "images": str(root / "images" / split),
            "annotations": str(root / "annotations" / f"instances_{split}.json")}


QUIET_TRAINER = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu"]


def shapes_data_overrides(root, *, semantic: bool = False, image_size: int = 64, batch_size: int = 4) -> list[str]:
    """``data.*`` overrides reading a generated shapes set (its COCO boxes, or with ``semantic`` its label PNGs) at a
    tiny size, in the test process (no loader workers)."""
    def annotations(split: str) -> str:
        return f"{root}/semantic/{split}" if semantic else f"{root}/annotations/instances_{split}.json"

    return [f"data.train.images={root}/images/train", f"data.train.annotations={annotations('train')}",
            f"data.val.images={root}/images/val", f"data.val.annotations={annotations('val')}",
            "data.generate=null", f"data.image_size={image_size}", f"data.batch_size={batch_size}",
            "data.num_workers=0"]


def tiny_detector_overrides(root, out, *extra: str) -> list[str]:
    """Overrides of configs/faster_rcnn/shapes.yaml for a tiny, fast run on a generated shapes set."""
    return [
        *shapes_data_overrides(root),
        "model.backbone.name=resnet18", "model.neck.out_channels=32", "model.head.params.box_head_dim=64",
        "model.head.params.anchor_sizes=[[8],[16],[32],[64]]", "train.warmup_iters=2", *QUIET_TRAINER,
        "trainer.check_val_every_n_epoch=1",
        f"output_dir={out}", *extra,
    ]


def detkit_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m detkit ARGS`` in a new process (one thread per process: DDP tests start several)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "detkit", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_gloo(body, tmp_path: Path, world: int = 2) -> list[Any]:
    """``body(rank, world)`` in ``world`` processes joined by a gloo process group (DDP on CPU); each rank's result
    (JSON-able), in rank order. ``body`` must be a module-level function (the processes import it)."""
    torch.multiprocessing.spawn(_gloo_worker, args=(body, world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]


def _gloo_worker(rank: int, body, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = body(rank, world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


TINY_CONFIG = ROOT / "configs" / "faster_rcnn" / "shapes.yaml"
