"""A kill at any moment costs nothing but time: faults injected into real training runs, and survived.

Every interrupted run below is resumed and must end with the uninterrupted run's weights, EMA, optimizer state
and step count (within 1e-6), having seen the same batches in the same order.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import detkit
from conftest import ROOT, TINY_CONFIG, tiny_detector_overrides
from detkit.config import load_config

# kills, signals and timeouts of real training processes: the full tier, alone
pytestmark = [pytest.mark.slow, pytest.mark.serial]

# 2 epochs of 8 steps (the session's shapes set, batch 4), EMA on: every part of the state has to survive
COMMON = ("train.epochs=2", "trainer.limit_val_batches=1", "train.checkpoint_every_minutes=null",
          "train.ema.enabled=true", "train.ema.decay=0.9")
# (the same thread count as this process, which conftest sets: float sums depend on it)
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}


class RecordBatches(L.Callback):
    """Appends ``[global step, image ids]`` of every training batch to a file (flushed: a kill loses nothing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.global_step, [int(t["image_id"]) for t in batch["targets"]]]) + "\n")


def batches(path: Path) -> dict[int, list[int]]:
    """Step -> image ids; a step seen twice (trained, lost to a kill, trained again) keeps its last record."""
    return {step: ids for step, ids in (json.loads(line) for line in path.read_text().splitlines())}


def overrides(shapes: Path, out: Path, *extra: str) -> list[str]:
    return tiny_detector_overrides(shapes, out, *COMMON, *extra)


def assert_same_state(expected: Path, got: Path) -> None:
    a, b = (torch.load(p / "checkpoints" / "last.ckpt", weights_only=True) for p in (expected, got))
    assert (b["global_step"], b["epoch"]) == (a["global_step"], a["epoch"])
    for key in ("state_dict", "current_model_state"):  # the EMA average, and the trained weights
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            torch.testing.assert_close(b[key][k], a[key][k], rtol=0, atol=1e-6, msg=f"{key}: {k}")
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6, msg=f"optimizer: {k}")
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.fixture(scope="module")
def uninterrupted(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    out.mkdir()
    detkit.train(TINY_CONFIG, overrides(shapes_dir, out), callbacks=[RecordBatches(out / "batches.jsonl")])
    assert torch.load(out / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 16
    return out


def resume(run: Path) -> Path:
    cfg = load_config(run / "config.yaml", ["trainer.max_steps=-1", "trainer.max_time=null"])
    return detkit.train(cfg, resume=run, callbacks=[RecordBatches(run / "batches.jsonl")])


def assert_resumed_like(uninterrupted: Path, run: Path) -> None:
    assert_same_state(uninterrupted, run)
    assert batches(run / "batches.jsonl") == batches(uninterrupted / "batches.jsonl")


def test_stopped_by_max_steps_mid_epoch(shapes_dir, tmp_path, uninterrupted):
    run = tmp_path / "run"
    run.mkdir()
    detkit.train(TINY_CONFIG, overrides(shapes_dir, run, "trainer.max_steps=5", "data.num_workers=1"),
                 callbacks=[RecordBatches(run / "batches.jsonl")])
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 5  # in epoch 0 of 8 steps
    resume(run)
    assert_resumed_like(uninterrupted, run)


class Slow(L.Callback):
    def on_train_batch_end(self, *args):
        time.sleep(0.7)


def test_stopped_by_max_time(shapes_dir, tmp_path, uninterrupted):
    run = tmp_path / "run"
    run.mkdir()
    detkit.train(TINY_CONFIG, overrides(shapes_dir, run, "trainer.max_time=00:00:00:03"),
                 callbacks=[Slow(), RecordBatches(run / "batches.jsonl")])
    stopped = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert 0 < stopped < 16
    resume(run)
    assert_resumed_like(uninterrupted, run)


KILL_SCRIPT = """
import os, signal, sys
import lightning as L
import detkit
from pathlib import Path
from test_faults import RecordBatches, overrides
from conftest import TINY_CONFIG  # (sets the thread count as in the test process)

class Kill(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == {step}:
            os.kill(os.getpid(), signal.{sig})

run = Path(sys.argv[2])
detkit.train(TINY_CONFIG, overrides(Path(sys.argv[1]), run, {extra}), callbacks=[RecordBatches(run / "batches.jsonl"),
             Kill()])
"""


def run_killed(shapes: Path, run: Path, sig: str, step: int, *extra: str) -> subprocess.CompletedProcess:
    run.mkdir(parents=True)
    script = KILL_SCRIPT.format(step=step, sig=sig, extra=", ".join(repr(e) for e in extra))
    return subprocess.run([sys.executable, "-c", script, str(shapes), str(run)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_killed_by_sigkill_costs_only_the_steps_since_the_last_save(shapes_dir, tmp_path, uninterrupted):
    run = tmp_path / "run"
    done = run_killed(shapes_dir, run, "SIGKILL", 10, "train.checkpoint_every_n_steps=3")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 9  # mid-epoch 1
    assert not list((run / "checkpoints").glob("*.tmp"))
    resume(run)
    assert_resumed_like(uninterrupted, run)


def test_ctrl_c_saves_after_the_step_and_resumes_exactly(shapes_dir, tmp_path, uninterrupted):
    run = tmp_path / "run"
    done = run_killed(shapes_dir, run, "SIGINT", 4)
    assert done.returncode != 0, done.stderr[-2000:]
    assert "Interrupted: SIGINT: training stopped at step 5" in done.stderr, done.stderr[-2000:]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 5
    resume(run)
    assert_resumed_like(uninterrupted, run)


def test_cli_ctrl_c_is_one_line_and_the_run_resumes(shapes_dir, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "detkit", "train", str(TINY_CONFIG),
            *tiny_detector_overrides(shapes_dir, run, "train.epochs=50", "trainer.limit_val_batches=1",
                                     "trainer.check_val_every_n_epoch=100")]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("detkit:")]
    assert len(lines) == 1 and "detkit: interrupted: SIGINT: training stopped at step" in lines[0]
    assert "Traceback" not in err
    step = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    resumed = subprocess.run([sys.executable, "-m", "detkit", "train", "--resume", str(run), "train.epochs=2"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if step < 16:
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 16
    changes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert changes[-1]["changed"]["train.epochs"] == [50, 2] and changes[-1]["step"] == step
    assert load_config(run / "config.yaml").train.epochs == 2


# ------------------------------------------------------------------------------------- checkpoint writes
def test_a_failed_save_keeps_the_previous_checkpoint_and_is_one_line(shapes_dir, tmp_path, monkeypatch, capsys):
    import detkit.engine.callbacks as callbacks

    real, calls = torch.save, []

    def disk_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(callbacks.torch, "save", disk_full)
    run = tmp_path / "run"
    from detkit.cli import main

    code = main(["train", str(TINY_CONFIG), *overrides(shapes_dir, run, "train.checkpoint_every_n_steps=2")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"detkit: error: cannot write checkpoint {run / 'checkpoints' / 'last.ckpt'}: No space left on device; " \
           "training stopped, the previous last.ckpt is intact" in err
    monkeypatch.undo()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


# ------------------------------------------------------------------------------------------------- DDP
WORKER = """
import sys, time, os
import torch
import lightning as L
import detkit
from pathlib import Path
from conftest import TINY_CONFIG, tiny_detector_overrides

class Fault(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == {rank} and trainer.global_step == 3:
            if "{kind}" == "raise":
                raise RuntimeError("injected fault")
            with torch.no_grad():
                next(pl_module.model.head.parameters()).fill_(float("nan"))

start = time.time()
try:
    detkit.train(TINY_CONFIG, tiny_detector_overrides(Path(sys.argv[1]), Path(sys.argv[2]), "train.epochs=2",
                 "trainer.limit_val_batches=1", "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp",
                 "train.checkpoint_every_minutes=null"), callbacks=[Fault()])
    print("RESULT ok")
except BaseException as e:
    print("RESULT", type(e).__name__, str(e).splitlines()[0], "|", round(time.time() - start, 1))
    sys.exit(3)
"""


def launch_two(script: str, args: list[str], port: int, node_rank_env: bool = False) -> list[subprocess.Popen]:
    """Two processes of one DDP run on this machine, started the way torchrun (or 2 nodes) would start them."""
    procs = []
    for rank in (0, 1):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank)}
        if not node_rank_env:  # torchrun's variables
            env.update(RANK=str(rank), GROUP_RANK=str(rank), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", WORLD_SIZE="2",
                       TORCHELASTIC_RUN_ID="detkit-test")
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args] if script else args, cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.parametrize("kind,rank", [("raise", 0), ("raise", 1), ("nan", 0), ("nan", 1)])
def test_a_fault_on_one_ddp_process_stops_every_process_within_seconds(shapes_dir, tmp_path, kind, rank):
    port = 29400 + 10 * rank + (5 if kind == "nan" else 0)
    procs = launch_two(WORKER.format(rank=rank, kind=kind), [str(shapes_dir), str(tmp_path / "run")], port)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    results = [next(line for line in out.splitlines() if line.startswith("RESULT")) for out in outs]
    assert all(p.returncode == 3 for p in procs), results
    for r, line in enumerate(results):
        seconds = float(line.rsplit("|", 1)[1])
        assert seconds < 60, line  # nobody waits on a collective for the 30-minute default timeout
        if kind == "nan":  # every process stops with the same one line, naming where it happened
            assert f"TrainingError loss is not finite on process {rank} at epoch 0, step 3" in line
        elif r == rank:
            assert "RuntimeError injected fault" in line
        else:
            assert f"TrainingError process {r}: another process of this run stopped" in line


@pytest.mark.timeout(900)
def test_two_nodes_of_one_process_train_and_validate_like_one_process(shapes_dir, tmp_path):
    """2 "nodes" x 1 process on localhost (NODE_RANK, MASTER_ADDR, MASTER_PORT, trainer.num_nodes=2), launched as on
    two machines; the metrics their validation writes equal a 1-process evaluation of the same weights."""
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "detkit", "train", str(TINY_CONFIG),
           *tiny_detector_overrides(shapes_dir, run, "train.epochs=1", "trainer.num_nodes=2", "trainer.devices=1",
                                    "trainer.strategy=ddp", "model.head.params.box_score_thresh=0.0")]
    procs = launch_two("", cli, 29480, node_rank_env=True)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    two_nodes = json.loads((run / "metrics.json").read_text())
    one, _ = detkit.evaluate(run, checkpoint=run / "checkpoints" / "last.ckpt", overrides=["trainer.num_nodes=1"])
    for key in ("bbox_AP", "bbox_AP50", "voc07_mAP"):
        assert one[key] == pytest.approx(two_nodes[key], abs=1e-9), key
