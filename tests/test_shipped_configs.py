"""Every shipped config loads, and its backbone and neck build and run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import ROOT, sweep
from detkit.backbones import build_backbone
from detkit.config import load_config
from detkit.necks import build_neck

CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "_base_" not in p.parts)


# one config per head family in the fast tier, every shipped config in the full one
@pytest.mark.parametrize("path", sweep(CONFIGS, fast={str(p.relative_to(ROOT)) for p in CONFIGS if p.stem == "shapes"},
                                        ids=[str(p.relative_to(ROOT)) for p in CONFIGS]))
def test_shipped_config_builds(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths in configs are relative to the working directory
    cfg = load_config(path)
    pretrained = cfg.model.backbone.pretrained
    if pretrained and not Path(pretrained).exists():
        pytest.skip(f"{pretrained} not available")
    backbone = build_backbone(cfg.model.backbone).eval()
    neck = build_neck(cfg.model.neck, backbone.out_channels, backbone.strides)
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 96, 96))
        out = neck.eval()(feats) if neck is not None else feats
    assert list(out) == (list(cfg.model.neck.levels) if neck is not None else list(cfg.model.backbone.out_levels))
    if neck is not None:  # the whole model builds from the config, and detects
        from detkit import build_model

        model = build_model(cfg).eval()
        with torch.no_grad():
            (det,) = model(torch.randn(1, 3, 128, 128))
        assert det["boxes"].shape[1] == 4 and len(det["scores"]) == len(det["labels"])


def test_examples_exist():
    assert len(CONFIGS) >= 3


DATA_CONFIGS = sorted((ROOT / "configs/_base_/data").glob("*.yaml"))


@pytest.mark.parametrize("path", DATA_CONFIGS, ids=[p.stem for p in DATA_CONFIGS])
def test_data_configs_build_their_datasets(path, monkeypatch, shapes_dir):
    from detkit.data.build import build_dataset

    monkeypatch.chdir(ROOT)
    overrides = []
    if path.stem == "shapes":
        overrides = [f"data.{s}.{k}={shapes_dir}/{v}" for s in ("train", "val")
                     for k, v in (("images", f"images/{s}"), ("annotations", f"annotations/instances_{s}.json"))]
    cfg = load_config(path, overrides)
    if not Path(cfg.data.val.images).exists():
        pytest.skip(f"{cfg.data.val.images} not available")
    ds = build_dataset(cfg.data.val, key="data.val")
    assert len(ds) > 0 and ds.num_classes == cfg.model.num_classes
    assert ds.name.endswith("-val")
