"""Multi-process (DDP, gloo on CPU): training runs, and validation metrics equal the 1-process ones."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_CONFIG, detkit_cli, tiny_detector_overrides

pytestmark = pytest.mark.slow  # several training processes: the full tier


@pytest.fixture(scope="module")
def odd_shapes(tmp_path_factory):
    """7 validation images: a 2-process sampler pads one rank with a repeated image."""
    from detkit.data.shapes import make_shapes

    out = tmp_path_factory.mktemp("shapes_odd")
    counts = make_shapes(out, num_images=40, image_size=64, seed=5)
    assert counts["val"] % 2 == 1
    return out


@pytest.mark.timeout(900)
def test_two_process_ddp_training_and_validation_metrics_equal_one_process(odd_shapes, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_detector_overrides(odd_shapes, run, "train.epochs=1", "trainer.limit_train_batches=3",
                                        "data.batch_size=2", "model.head.params.box_score_thresh=0.0",
                                        "train.lr=0.0012")  # 3 steps that leave boxes near the objects
    ddp = ["trainer.devices=2", "trainer.strategy=ddp"]
    trained = detkit_cli("train", str(TINY_CONFIG), *overrides, *ddp)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run / "checkpoints/last.ckpt").is_file() and (run / "metrics.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # both processes wrote into one run directory

    one = detkit_cli("eval", str(run), "--checkpoint", str(run / "checkpoints/last.ckpt"), "--out",
                     str(tmp_path / "one.json"), "trainer.enable_progress_bar=false")
    assert one.returncode == 0, one.stderr[-3000:]
    two = detkit_cli("eval", str(run), "--checkpoint", str(run / "checkpoints/last.ckpt"), "--out",
                     str(tmp_path / "two.json"), "trainer.enable_progress_bar=false", *ddp)
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one.json").read_text())
    m2 = json.loads((tmp_path / "two.json").read_text())
    assert m1["bbox_AR100"] > 0  # the model detects something, so a missed or doubled image would show
    assert m1.keys() == m2.keys()
    assert_same_numbers(m2, m1)


def assert_same_numbers(got, want, where="metrics"):
    """Equal structure and equal numbers (to 1e-9) through nested dicts and lists (per-class rows, error analysis)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same_numbers(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_numbers(g, w, f"{where}[{i}]")
    elif want is None or isinstance(want, str):
        assert got == want, where
    else:
        assert got == pytest.approx(want, abs=1e-9), where


@pytest.mark.timeout(900)
def test_two_process_semantic_metrics_equal_one_process(odd_shapes, tmp_path):
    """U-Net: confusion matrices of 2 processes (one rank sees a padded, repeated image) sum to the 1-process one."""
    from test_unet import UNET_SHAPES, unet_overrides

    run = tmp_path / "run"
    trained = detkit_cli("train", str(UNET_SHAPES), *unet_overrides(odd_shapes, run, "train.epochs=1",
                                                                    "trainer.limit_train_batches=3"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = str(run / "checkpoints/last.ckpt")
    one = detkit_cli("eval", str(run), "--checkpoint", ckpt, "--out", str(tmp_path / "one.json"),
                     "trainer.enable_progress_bar=false")
    assert one.returncode == 0, one.stderr[-3000:]
    two = detkit_cli("eval", str(run), "--checkpoint", ckpt, "--out", str(tmp_path / "two.json"),
                     "trainer.enable_progress_bar=false", "trainer.devices=2", "trainer.strategy=ddp")
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one.json").read_text())
    m2 = json.loads((tmp_path / "two.json").read_text())
    assert m1["images"] == m2["images"] == 7  # the repeated image counted once
    assert m1["pixel_acc"] is not None and 0 < m1["pixel_acc"] < 1
    assert m1 == m2  # exact: the same integer confusion matrix
