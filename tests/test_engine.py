"""The training engine: run directory, resume, non-finite losses, atomic checkpoints, trainer passthrough."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import lightning as L
import pytest
import torch

import detkit
from conftest import TINY_CONFIG, tiny_detector_overrides
from detkit.config import load_config
from detkit.engine.optim import build_optimizer, lr_factor, param_groups
from detkit.errors import ConfigError, TrainingError

REQUIRED = ["bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl", "bbox_AR100", "voc07_mAP",
            "voc12_mAP", "per_class"]


def state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def trained_run(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    run = detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, out, "train.epochs=2",
                                                             "trainer.limit_train_batches=3"))
    return run


def test_train_writes_a_complete_run_directory(trained_run):
    run = trained_run
    for name in ("config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "metrics.json", "csv/metrics.csv"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    for key in REQUIRED:
        assert key in metrics
    for key, value in metrics.items():
        if key != "per_class" and value is not None:
            assert 0.0 <= value <= 1.0, key
    assert set(metrics["per_class"]) == {"circle", "square", "triangle", "star"}
    cfg = load_config(run / "config.yaml")  # the resolved config loads back as it is
    assert cfg.output_dir == str(run)
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 6
    assert ckpt["hyper_parameters"]["classes"] == ["circle", "square", "triangle", "star"]
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the training loader's position


def test_evaluate_a_run_directory_gives_its_metrics(trained_run):
    metrics, out = detkit.evaluate(trained_run, checkpoint=trained_run / "checkpoints/last.ckpt")
    assert out == trained_run
    saved = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["bbox_AP"] == pytest.approx(saved["bbox_AP"], abs=1e-12)
    assert list((trained_run / "pr_curves").glob("*.png"))


@pytest.mark.slow  # (the full tier's tests/test_faults.py resumes after every kind of stop)
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(shapes_dir, tmp_path):
    common = ("train.epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1")
    full = detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path / "full", *common))
    part = detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path / "part", *common,
                                                             "trainer.max_steps=3"))  # stops after epoch 1
    assert torch.load(part / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 3
    cfg = load_config(part / "config.yaml", ["trainer.max_steps=-1"])
    resumed = detkit.train(cfg, resume=part)
    assert resumed == part
    a, b = state(full / "checkpoints/last.ckpt"), state(part / "checkpoints/last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


class PoisonWeights(L.Callback):
    """Sets one weight to NaN before the 5th step (the 2nd epoch's 2nd batch)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 4:
            with torch.no_grad():
                next(pl_module.model.head.parameters()).fill_(float("nan"))


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_good_checkpoints(shapes_dir, tmp_path):
    overrides = tiny_detector_overrides(shapes_dir, tmp_path / "nan", "train.epochs=3",
                                        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1")
    with pytest.raises(TrainingError, match="loss is not finite at epoch 1, step 4"):
        detkit.train(TINY_CONFIG, overrides, callbacks=[PoisonWeights()])
    last = state(tmp_path / "nan/checkpoints/last.ckpt")
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())


def test_checkpoint_with_nan_weights_is_refused(shapes_dir, tmp_path):
    from detkit.engine.module import DetectionModule

    module = DetectionModule(load_config(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path)), ["a"])
    with torch.no_grad():
        next(module.model.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingError, match="NaN/inf"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from detkit.engine.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=False)["state_dict"]["w"], torch.ones(2))


def test_trainer_keys_are_lightning_arguments_and_typos_are_caught():
    accepted = inspect.signature(L.Trainer.__init__).parameters
    from detkit.engine.run import trainer_kwargs

    kwargs = trainer_kwargs(load_config(None))
    assert set(kwargs) <= set(accepted)
    with pytest.raises(ConfigError, match=r"did you mean 'trainer.max_steps'"):
        load_config(None, ["trainer.max_step=5"])
    with pytest.raises(ConfigError, match="16-mixed needs a GPU"):
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        trainer_kwargs(load_config(None, ["trainer.precision=16-mixed", "trainer.accelerator=cpu"]))


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 1e-4, 0.0)
    assert decay["params"] == [model[2].weight] and decay["weight_decay"] == 1e-4
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                   id(model[2].bias)}
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_optimizer_is_fused_and_updates_as_the_per_op_one(name):
    torch.manual_seed(0)
    # (no bias before the BatchNorm: its gradient is rounding noise, which Adam would scale up to a full step)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    t = load_config(None, [f"train.optimizer={name}", "train.lr=0.01"]).train
    fused, plain = build_optimizer(model, t), build_optimizer(twin, t, fused=False)
    assert fused.defaults.get("fused") is True and not plain.defaults.get("fused")
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_learning_rate_schedule():
    t = load_config(None, ["train.warmup_iters=10", "train.warmup_factor=0.1", "train.scheduler=cosine"]).train
    assert lr_factor(0, t, 100, 10) == pytest.approx(0.1)
    # the warmup ramps to the full rate whatever the run's length (a budget may re-plan the length during it)
    assert lr_factor(5, t, 100, 10) == pytest.approx(0.55) == lr_factor(5, t, 40, 10)
    assert lr_factor(10, t, 100, 10) == pytest.approx(1.0)  # then cosine from 1 at the warmup's end ...
    assert lr_factor(55, t, 100, 10) == pytest.approx(0.5)  # ... through 1/2 halfway through the rest ...
    assert lr_factor(100, t, 100, 10) == pytest.approx(0.0)  # ... to 0 at the last step
    # a run shorter than three warmups: the warmup is a third of it (the full rate is reached, then cosine)
    assert lr_factor(0, t, 12, 10) == pytest.approx(0.1)
    assert lr_factor(2, t, 12, 10) == pytest.approx(0.1 * 0.5 + 0.5)
    assert lr_factor(4, t, 12, 10) == pytest.approx(1.0)
    assert lr_factor(8, t, 12, 10) == pytest.approx(0.5)
    m = load_config(None, ["train.warmup_iters=0", "train.scheduler=multistep", "train.milestones=[2,3]"]).train
    assert [lr_factor(s, m, 40, 10) for s in (0, 19, 20, 30)] == pytest.approx([1, 1, 0.1, 0.01])


def test_bf16_mixed_precision_trains_on_cpu(shapes_dir, tmp_path):
    run = detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path / "bf16", "train.epochs=1",
                                                             "trainer.limit_train_batches=2",
                                                             "trainer.limit_val_batches=1",
                                                             "trainer.precision=bf16-mixed"))
    assert (run / "checkpoints/last.ckpt").is_file()


def test_ema_weights_are_checkpointed_and_restored(shapes_dir, tmp_path):
    run = detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path / "ema", "train.epochs=1",
                                                             "trainer.limit_train_batches=3",
                                                             "trainer.limit_val_batches=1", "train.ema.enabled=true",
                                                             "train.ema.decay=0.5"))
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert "current_model_state" in ckpt  # EMA weights in state_dict, the raw ones kept for resuming
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())
    from detkit.engine import load_checkpoint

    module = load_checkpoint(run / "checkpoints/last.ckpt")  # evaluation and prediction use the EMA weights
    torch.testing.assert_close(module.state_dict()["model.head.rpn.head.cls_logits.weight"],
                               ema["model.head.rpn.head.cls_logits.weight"])
    resumed_without_ema = {"current_model_state": raw, "state_dict": ema}
    module.cfg.train.ema.enabled = False
    module.on_load_checkpoint(resumed_without_ema)  # continues from the trained weights, not their average
    assert resumed_without_ema["state_dict"] is raw


def test_final_weights_are_validated_when_the_last_epoch_was_not(shapes_dir, tmp_path):
    run = detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path / "every4", "train.epochs=1",
                                                             "trainer.limit_train_batches=2",
                                                             "trainer.check_val_every_n_epoch=4"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox_AP"] <= 1.0
    assert (run / "checkpoints/best.ckpt").is_file() and (run / "checkpoints/last.ckpt").is_file()


def test_gradient_accumulation_and_early_stopping_come_from_config(shapes_dir, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    from detkit.engine.run import build_trainer

    cfg = load_config(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path / "acc", "train.epochs=1",
                                                           "trainer.limit_train_batches=4",
                                                           "trainer.limit_val_batches=1",
                                                           "trainer.accumulate_grad_batches=2"))
    run = detkit.train(cfg)
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 2  # 4 batches / 2
    cfg.train.early_stopping_patience = 3
    stoppers = [c for c in build_trainer(cfg, tmp_path / "es").callbacks if isinstance(c, EarlyStopping)]
    assert len(stoppers) == 1 and stoppers[0].monitor == "val/bbox_AP" and stoppers[0].patience == 3


def test_mask_rcnn_trains_and_reports_mask_ap(shapes_dir, tmp_path):
    overrides = tiny_detector_overrides(shapes_dir, tmp_path / "mask", "train.epochs=1",
                                        "trainer.limit_train_batches=2", "model.head.params.mask_head_layers=[16,16]")
    run = detkit.train(detkit.load_config(TINY_CONFIG.parent.parent / "mask_rcnn" / "shapes.yaml", overrides))
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("segm_AP", "segm_AP50", "bbox_AP"):
        assert metrics[key] is not None and 0.0 <= metrics[key] <= 1.0


def test_main_metric_typos_are_caught_before_training(shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'bbox_APl'"):
        detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path, "eval.main_metric=bbox_AP_l"))


def test_eval_with_a_checkpoint_that_does_not_fit_the_config_is_one_line(trained_run):
    with pytest.raises(ConfigError, match="does not fit the model"):
        detkit.evaluate(trained_run, overrides=["model.neck.out_channels=16"])


@pytest.mark.slow
@pytest.mark.parametrize("config", ["pennfudan", "coco128"])
def test_mask_rcnn_trains_on_real_instance_masks(config, tmp_path):
    """The shipped Mask R-CNN configs, shrunk: instance-id PNGs (pennfudan) and COCO RLE/polygons (coco128)."""
    from conftest import shared_path

    shared_path("datasets", config)
    run = detkit.train(detkit.load_config(TINY_CONFIG.parent.parent / "mask_rcnn" / f"{config}.yaml", [
        "model.backbone.name=resnet18", "model.neck.out_channels=32", "model.head.params.box_head_dim=64",
        "model.head.params.mask_head_layers=[16,16]", "data.image_size=128", "data.batch_size=2",
        "data.num_workers=0", "train.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
        "model.head.params.box_score_thresh=0.0", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", f"output_dir={tmp_path / 'run'}"]))
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("segm_AP", "segm_AP50", "bbox_AP"):
        assert metrics[key] is not None and 0.0 <= metrics[key] <= 1.0, key
    from detkit.inference import Predictor

    predictor = Predictor.from_checkpoint(run, score_threshold=0.0)
    val = detkit.load_config(run / "config.yaml").data.val
    image = sorted(p for p in Path(val.images).iterdir() if p.suffix.lower() in (".png", ".jpg"))[0]
    out = predictor(str(image))
    from PIL import Image

    w, h = Image.open(image).size
    assert out["masks"].shape[1:] == (h, w) and len(out["masks"]) == len(out["boxes"])


def test_a_short_train_says_what_detkit_knows_not_lightnings_hints(shapes_dir, tmp_path, capsys, caplog, recwarn):
    """Stopped by max_steps before its first validation: no Lightning hint about logging the monitored key, no
    log-interval warning, no FLOPs column of zeros; detkit says that best.ckpt holds the final weights."""
    import logging
    import warnings

    from detkit.cli import main

    warnings.simplefilter("always")  # (a warning Lightning gave in an earlier test must show here too)
    caplog.set_level(logging.INFO)
    overrides = [o for o in tiny_detector_overrides(shapes_dir, tmp_path / "run", "trainer.max_steps=2",
                                                    "trainer.enable_model_summary=true")
                 if "enable_model_summary=false" not in o]
    assert main(["train", str(TINY_CONFIG), *overrides]) == 0
    said = capsys.readouterr()
    text = "\n".join([said.out, said.err, caplog.text, *(str(w.message) for w in recwarn)])
    for noise in ("HINT", "could not find the monitored key", "log_every_n_steps", "logging interval", "FLOPs",
                  "litlogger"):
        assert noise not in text, noise
    assert "no validation ran before training stopped (step 2): best.ckpt holds the final weights" in text
    assert "model: backbone resnet18" in text and "head faster_rcnn" in text
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["global_step"] == 2
