"""The README's Python example runs as written."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT


def test_readme_python_example_runs(monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "no python example in the README"
    monkeypatch.chdir(ROOT)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'p3': (1, 256, 40, 40)" in out or "'p3': (1, 128, 40, 40)" in out


@pytest.mark.slow
def test_readme_fine_tune_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    """The "fine-tune a pretrained detector" commands, with torchvision's COCO Faster R-CNN saved locally (seeded
    weights: none can be downloaded here) and a few steps instead of the whole schedule."""
    import shlex

    import torch
    import torchvision

    from conftest import shared_path
    from detkit.cli import main

    images = shared_path("datasets", "pennfudan", "PennFudanPed", "PNGImages")
    text = (ROOT / "README.md").read_text()
    section = text.split("### Fine-tune a pretrained detector on your data", 1)[1].split("```", 2)[1]
    commands = [shlex.split(line.split("#")[0].replace(".venv/bin/detkit", ""))
                for line in section.replace("\\\n", " ").splitlines() if line.startswith(".venv/bin/detkit")]
    assert [c[0] for c in commands] == ["train", "eval", "predict"]
    monkeypatch.chdir(ROOT)
    weights = ROOT / "weights" / "fasterrcnn_resnet50_fpn_coco.pth"
    made = not weights.exists()
    if made:
        torch.manual_seed(0)
        weights.parent.mkdir(exist_ok=True)
        torch.save(torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
                   .state_dict(), weights)
    run = tmp_path / "run"
    fast = ["trainer.max_steps=1", "train.epochs=1", "data.image_size=128", "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false", f"output_dir={run}"]
    try:
        train, evaluate, predict = commands
        assert main([*train, *fast]) == 0
        report = (run / "weights_report.json").read_text()
        assert '"pedestrian": "person"' in report
        assert main([evaluate[0], str(run), *evaluate[2:], "data.image_size=128",
                     "trainer.limit_val_batches=2"]) == 0
        photos = tmp_path / "photos"
        photos.mkdir()
        for p in sorted(images.glob("*.png"))[:2]:
            (photos / p.name).write_bytes(p.read_bytes())
        out = tmp_path / "pedestrians"
        predict = [str(run) if a == "runs/pennfudan_coco" else str(photos) if a == "photos/" else
                   str(out) if a == "runs/pedestrians" else a for a in predict]
        assert main(predict) == 0 and (out / "predictions.json").is_file()
    finally:
        if made:
            weights.unlink()
