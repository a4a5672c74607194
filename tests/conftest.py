"""Shared test helpers. Tests that need ../shared (real data, real weights) skip cleanly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DETKIT_SHARED", ROOT.parent / "shared"))

torch.set_num_threads(min(2, torch.get_num_threads()))


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


def shapes_cfg(root, split="train"):
    return {"format": "coco", "images": str(root / "images" / split),
            "annotations": str(root / "annotations" / f"instances_{split}.json")}


def tiny_detector_overrides(root, out, *extra: str) -> list[str]:
    """Overrides of configs/faster_rcnn/shapes.yaml for a tiny, fast run on a generated shapes set."""
    return [
        f"data.train.images={root}/images/train", f"data.train.annotations={root}/annotations/instances_train.json",
        f"data.val.images={root}/images/val", f"data.val.annotations={root}/annotations/instances_val.json",
        "data.generate=null", "data.image_size=64", "data.batch_size=4", "data.num_workers=0",
        "model.backbone.name=resnet18", "model.neck.out_channels=32", "model.head.params.box_head_dim=64",
        "model.head.params.anchor_sizes=[[8],[16],[32],[64]]", "train.warmup_iters=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
        "trainer.check_val_every_n_epoch=1",
        f"output_dir={out}", *extra,
    ]


TINY_CONFIG = ROOT / "configs" / "faster_rcnn" / "shapes.yaml"
