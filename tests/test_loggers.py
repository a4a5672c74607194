"""Loggers users already use: several at once, MLflow to a local store, W&B offline; bad settings in one line."""

from __future__ import annotations

import importlib.util
import json

import pytest

import detkit
from conftest import TINY_CONFIG, tiny_detector_overrides
from detkit.config import load_config
from detkit.errors import ConfigError

needs = lambda package: pytest.mark.skipif(importlib.util.find_spec(package) is None,  # noqa: E731
                                           reason=f"{package} not installed (pip install 'detkit[{package}]')")
ONE_STEP = ("train.epochs=1", "trainer.max_steps=2", "trainer.limit_val_batches=1", "logging.run_name=tiny",
            "logging.tags=[cpu,test]")


@needs("mlflow")
def test_mlflow_to_a_local_store_gets_the_run_config_and_final_metrics(shapes_dir, tmp_path):
    import mlflow

    store = tmp_path / "mlruns"
    run = detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path / "run", *ONE_STEP,
                                                            "logging.loggers=[csv,mlflow]",
                                                            f"logging.mlflow.tracking_uri=file:{store}"))
    client = mlflow.tracking.MlflowClient(tracking_uri=f"file:{store}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "shapes"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "tiny" and {"cpu", "test"} <= set(found.data.tags)
    assert found.data.params["train/epochs"] == "1" or found.data.params.get("config/train/epochs") == "1"
    final = json.loads((run / "metrics.json").read_text())
    assert found.data.metrics["final/bbox_AP"] == pytest.approx(final["bbox_AP"])
    assert (run / "csv" / "metrics.csv").is_file()


@needs("wandb")
def test_wandb_offline_writes_a_local_run(shapes_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = detkit.train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path / "run", *ONE_STEP,
                                                            "logging.loggers=[wandb]"))
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_logger_settings_are_checked_in_one_line(shapes_dir, tmp_path):
    from detkit.engine.loggers import build_loggers

    cfg = load_config(TINY_CONFIG, ["logging.loggers=[tensorboard,comet]"])
    with pytest.raises(ConfigError, match="logging.loggers: unknown 'comet'"):
        build_loggers(cfg, tmp_path)
    cfg = load_config(TINY_CONFIG, ["logging.tensorboard.flush_every=3"])
    with pytest.raises(ConfigError, match="'logging.tensorboard.flush_every' is not an argument of Lightning's "
                                          "TensorBoardLogger"):
        build_loggers(cfg, tmp_path)
    loggers = build_loggers(load_config(TINY_CONFIG, ["logging.loggers=[csv,tensorboard,csv]"]), tmp_path)
    assert [type(x).__name__ for x in loggers] == ["CSVLogger", "TensorBoardLogger"]
