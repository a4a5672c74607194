"""U-Net: the decoder on every backbone family and odd input sizes, its losses, the Segmenter's mapping to the
original image, training through the engine, evaluation and prediction outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import QUIET_TRAINER, ROOT, TINY_CONFIG, detkit_cli, shapes_data_overrides, tiny_detector_overrides
from detkit.config import load_config
from detkit.errors import ConfigError, DataError
from detkit.heads import dice_loss, segmentation_loss
from detkit.models import Segmenter, build_model

UNET_SHAPES = ROOT / "configs" / "unet" / "shapes.yaml"


def unet_cfg(*overrides: str):
    return load_config(UNET_SHAPES, ["model.head.params.decoder_channels=[32,16,16,8,8]", *overrides])


# ------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize("backbone,levels", [
    ("resnet18", "[c1,c2,c3,c4,c5]"),
    ("regnet_x_400mf", "[c1,c2,c3,c4,c5]"),
    ("efficientnet_b0", "[c1,c2,c3,c4,c5]"),
    ("mobilenet_v3_small", "[c1,c2,c3,c4,c5]"),
    ("timm:resnet18", "[c1,c2,c3,c4,c5]"),
    ("resnet18", "[c2,c3,c4,c5]"),  # fewer levels: the final block upsamples x4
])
@pytest.mark.parametrize("size", [(97, 75), (64, 64)])
def test_logits_at_input_resolution_for_every_family_and_odd_sizes(backbone, levels, size):
    n_blocks = 5 if levels.startswith("[c1") else 4
    cfg = unet_cfg(f"model.backbone.name={backbone}", f"model.backbone.out_levels={levels}",
                   f"model.head.params.decoder_channels={[16] * n_blocks}")
    model = build_model(cfg).eval()
    assert isinstance(model, Segmenter)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model.logits(x)
    assert logits.shape == (2, 5, *size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "transpose"])
@pytest.mark.parametrize("final_block", [True, False])
def test_upsample_modes_and_final_block(upsample, final_block):
    channels = "[32,16,16,8,8]" if final_block else "[32,16,16,8]"
    cfg = unet_cfg(f"model.head.params.upsample={upsample}", f"model.head.params.final_block={final_block}",
                   f"model.head.params.decoder_channels={channels}")
    model = build_model(cfg).eval()
    head = model.head
    assert (head.final is not None) == final_block
    assert all((b.up is not None) == (upsample == "transpose") for b in head.blocks)
    with torch.no_grad():
        assert model.logits(torch.randn(1, 3, 70, 45)).shape == (1, 5, 70, 45)


def test_decoder_widths_from_config_and_skips_are_used():
    cfg = unet_cfg("model.head.params.decoder_channels=[40,24,16,12,8]")
    head = build_model(cfg).head
    widths = [b.convs[-1][0].out_channels for b in head.blocks] + [head.final.convs[-1][0].out_channels]
    assert widths == [40, 24, 16, 12, 8]
    # block i joins the level of stride 2**(4-i): its first conv takes upsampled + skip channels
    skip_channels = {"c4": 256, "c3": 128, "c2": 64, "c1": 64}  # resnet18
    ins = [b.convs[0][0].in_channels for b in head.blocks]
    assert ins == [512 + skip_channels["c4"], 40 + skip_channels["c3"], 24 + skip_channels["c2"],
                   16 + skip_channels["c1"]]
    assert head.classifier.out_channels == 5


@pytest.mark.parametrize("override,message", [
    ("model.head.params.decoder_channels=[16,16]", "2 widths for 5 decoder blocks"),
    ("model.head.params.upsample=cubic", "upsample = 'cubic'"),
    ("model.head.params.class_weights=[1.0,2.0]", "class_weights has 2 values"),
    ("model.head.params.levels=[c5,c4]", "fine to coarse"),
    ("model.head.params.levels=[c2,c9]", "c9"),
    ("model.head.params.ce_weight=0.0", "at least one positive"),
    ("model.head.params.norm=ln", "norm = 'ln'"),
    ("model.head.params.decoder_chanels=[8]", "did you mean 'model.head.params.decoder_channels'"),
    ("model.num_classes=1", "at least 2 classes"),
])
def test_bad_head_params_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
        build_model(unet_cfg(override))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ losses
def test_cross_entropy_ignores_unlabeled_pixels_and_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 5)
    target = torch.randint(0, 4, (2, 6, 5))
    target[0, :2] = 255
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5])
    losses = segmentation_loss(logits, target, class_weights=weights)
    assert set(losses) == {"loss_ce"}
    # reference: weighted mean over the labelled pixels only
    valid = target != 255
    logp = logits.log_softmax(1).permute(0, 2, 3, 1)[valid]
    t = target[valid]
    w = weights[t]
    expected = -(w * logp[torch.arange(len(t)), t]).sum() / w.sum()
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    # what the network says at ignored pixels changes nothing
    changed = logits.clone()
    changed[0, :, :2] = 100 * torch.randn(4, 2, 5)
    assert segmentation_loss(changed, target, class_weights=weights)["loss_ce"].item() == pytest.approx(
        losses["loss_ce"].item(), rel=1e-6)


def test_dice_loss_values():
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    perfect = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    # uniform probabilities over 3 classes: dice_c = (2 * n_c / 3 + 1) / (5 / 3 + n_c + 1) for n_c pixels of c
    # (5 labelled pixels, each contributing 1/3 to every class's probability mass)
    uniform = torch.zeros(1, 3, 2, 3)
    expected = 1 - np.mean([(2 * n / 3 + 1) / (5 / 3 + n + 1) for n in (2, 2, 1)])
    assert dice_loss(uniform, target).item() == pytest.approx(expected, rel=1e-5)
    losses = segmentation_loss(uniform, target, dice_weight=0.5)
    assert losses["loss_dice"].item() == pytest.approx(0.5 * expected, rel=1e-5)


def test_all_ignored_batch_gives_zero_losses_with_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    losses = segmentation_loss(logits, torch.full((1, 4, 4), 255), dice_weight=1.0)
    total = sum(losses.values())
    assert total.item() == 0.0
    total.backward()
    assert logits.grad is not None


def test_bad_targets_are_one_line_errors():
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(DataError, match="value 7 is not a class index 0..2"):
        segmentation_loss(logits, torch.full((1, 4, 4), 7))
    with pytest.raises(DataError, match="semantic targets are"):
        segmentation_loss(logits, torch.zeros(1, 5, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------- Segmenter outputs
class FixedHead(torch.nn.Module):
    """Logits that say class 1 in the left half of the input and class 0 elsewhere."""

    task = "semantic"

    def forward(self, features, images, image_sizes, targets):
        b, _, h, w = images.shape
        logits = torch.zeros(b, 2, h, w)
        logits[:, 1, :, : w // 2] = 5.0
        return logits, {}


def test_segmenter_crops_the_padding_and_maps_to_the_original_size():
    model = Segmenter(torch.nn.Identity(), None, FixedHead()).eval()
    images = torch.zeros(2, 3, 32, 64)
    out = model(images, image_sizes=[(32, 64), (16, 32)], orig_sizes=[(64, 128), (8, 16)])
    assert out[0]["semantic"].shape == (64, 128) and out[1]["semantic"].shape == (8, 16)
    # image 0: left half of the full input is class 1 (bilinear x2: output column 64 maps to input 31.75, still
    # mostly class 1)
    assert (out[0]["semantic"][:, :65] == 1).all() and (out[0]["semantic"][:, 65:] == 0).all()
    # image 1 occupies the top-left 16 x 32 of the padded input: all of it lies in the left half -> class 1
    assert (out[1]["semantic"] == 1).all()
    assert torch.allclose(out[1]["scores"], torch.full((8, 16), torch.tensor([0.0, 5.0]).softmax(0)[1].item()))


def test_a_few_steps_lower_the_loss(shapes_dir):
    from detkit.data.masks import SemanticMaskDataset

    ds = SemanticMaskDataset(shapes_dir / "images" / "train", shapes_dir / "semantic" / "train",
                             classes=["background", "circle", "square", "triangle", "star"])
    samples = [ds[i] for i in range(4)]
    images = torch.stack([torch.from_numpy(s["image"].copy()).permute(2, 0, 1).float() / 255 for s in samples])
    target = torch.stack([torch.as_tensor(s["semantic"]) for s in samples])
    torch.manual_seed(0)
    model = build_model(unet_cfg("model.head.params.dice_weight=0.5")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(12):
        losses = model(images, target)
        loss = sum(losses.values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(losses) == {"loss_ce", "loss_dice"}
    assert loss.item() < 0.75 * first


# ---------------------------------------------------------------------------------------- engine and CLI
def unet_overrides(root, out, *extra: str) -> list[str]:
    return [*shapes_data_overrides(root, semantic=True), "model.head.params.decoder_channels=[32,16,16,8,8]",
            "train.warmup_iters=2", *QUIET_TRAINER, f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def unet_run(shapes_dir, tmp_path_factory):
    from detkit.engine import train

    out = tmp_path_factory.mktemp("unet_run") / "run"
    run = train(UNET_SHAPES, unet_overrides(shapes_dir, out, "train.epochs=2", "trainer.limit_train_batches=3",
                                            "trainer.check_val_every_n_epoch=1"))
    return run


def test_training_writes_semantic_metrics(unet_run):
    metrics = json.loads((unet_run / "metrics.json").read_text())
    for key in ("mIoU", "pixel_acc", "mean_class_acc", "dice"):
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0, key
    assert metrics["pixel_acc"] is not None and metrics["pixel_acc"] > 0
    assert set(metrics["per_class"]) == {"background", "circle", "square", "triangle", "star"}
    assert (unet_run / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.slow
def test_eval_prints_the_per_class_table_and_matches_training(unet_run, tmp_path):
    result = detkit_cli("eval", str(unet_run), "--checkpoint", str(unet_run / "checkpoints" / "last.ckpt"),
                        "--out", str(tmp_path / "m.json"), "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mIoU" in result.stdout and "background" in result.stdout and "IoU" in result.stdout
    assert (tmp_path / "m_confusion_matrix.png").is_file()  # beside --out: the run's own files untouched
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) >= {"mIoU", "pixel_acc", "mean_class_acc", "dice", "per_class"}


def test_predict_draws_label_maps_with_a_legend(unet_run, shapes_dir, tmp_path):
    from PIL import Image

    from detkit.inference import Predictor
    from detkit.inference.run import predict_files

    predictor = Predictor.from_checkpoint(unet_run / "checkpoints" / "last.ckpt")
    files = sorted((shapes_dir / "images" / "val").glob("*.jpg"))[:3]
    one = predictor(str(files[0]))
    w, h = Image.open(files[0]).size
    assert one["semantic"].shape == (h, w) and one["semantic"].dtype == torch.int64
    assert set(one["names"]) <= set(predictor.classes)
    summary = predict_files(predictor, files, tmp_path / "pred")
    assert summary["task"] == "semantic" and summary["images"] == 3
    labels = np.asarray(Image.open(tmp_path / "pred" / f"{files[0].stem}_labels.png"))
    assert labels.shape == (h, w) and np.array_equal(labels, one["semantic"].numpy())
    drawn = np.asarray(Image.open(tmp_path / "pred" / f"{files[0].stem}.jpg"))
    assert drawn.shape == (h, w, 3)
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert sorted({r["segmentation_file"] for r in results}) == sorted(f"{f.stem}_labels.png" for f in files)


def test_threshold_leaves_unsure_pixels_unlabeled(unet_run, shapes_dir):
    from detkit.inference import Predictor

    file = str(sorted((shapes_dir / "images" / "val").glob("*.jpg"))[0])
    loose = Predictor.from_checkpoint(unet_run / "checkpoints" / "last.ckpt")(file)
    strict = Predictor.from_checkpoint(unet_run / "checkpoints" / "last.ckpt", score_threshold=0.9)(file)
    unsure = loose["scores"] < 0.9
    assert (strict["semantic"][unsure] == 255).all()
    assert torch.equal(strict["semantic"][~unsure], loose["semantic"][~unsure])


def test_task_and_metric_mismatches_are_one_line_errors(shapes_dir, tmp_path):
    from detkit.engine import train

    with pytest.raises(ConfigError, match=r"set eval.metrics=\[semantic\]"):
        train(UNET_SHAPES, unet_overrides(shapes_dir, tmp_path / "a", "eval.metrics=[coco]"))
    with pytest.raises(ConfigError, match="not a metric detkit computes for unet"):
        train(UNET_SHAPES, unet_overrides(shapes_dir, tmp_path / "b", "eval.main_metric=bbox_AP"))
    # a detection head on a semantic dataset, and U-Net on a detection dataset
    semantic_data = [f"data.{s}.{k}={v}" for s in ("train", "val") for k, v in (
        ("format", "masks"), ("annotations", f"{shapes_dir}/semantic/{s}"), ("images", f"{shapes_dir}/images/{s}"),
        ("classes", "[background,circle,square,triangle,star]"))]
    with pytest.raises(DataError, match="needs boxes"):
        train(TINY_CONFIG, tiny_detector_overrides(shapes_dir, tmp_path / "c", *semantic_data, "model.num_classes=5"))
    with pytest.raises(DataError, match="needs semantic label maps"):
        train(UNET_SHAPES, unet_overrides(shapes_dir, tmp_path / "d", "data.train.format=coco",
                                          "data.train.classes=null", "model.num_classes=4",
                                          f"data.train.annotations={shapes_dir}/annotations/instances_train.json"))
    with pytest.raises(ConfigError, match="model.num_classes = 7, and data.train .* has 5 classes"):
        train(UNET_SHAPES, unet_overrides(shapes_dir, tmp_path / "e", "model.num_classes=7"))


@pytest.mark.parametrize("name", ["shapes", "camvid", "coco128"])
def test_shipped_unet_configs_build(name):
    cfg = load_config(ROOT / "configs" / "unet" / f"{name}.yaml")
    cfg.model.backbone.pretrained = None
    model = build_model(cfg)
    assert isinstance(model, Segmenter)
    assert model.head.classifier.out_channels == cfg.model.num_classes
    assert OmegaConf.select(cfg, "eval.main_metric") == "mIoU"


# ------------------------------------------------------------------------------------- real data (../shared)
@pytest.mark.parametrize("config,backbone", [("camvid", "resnet18"), ("coco128", "mobilenet_v3_small")])
def test_shipped_unet_configs_train_on_real_data(config, backbone, tmp_path):
    from conftest import shared_path
    from detkit.engine import train

    shared_path("datasets", "camvid" if config == "camvid" else "coco128")
    run = train(ROOT / "configs" / "unet" / f"{config}.yaml", [
        f"model.backbone.name={backbone}", "model.backbone.pretrained=null", "data.image_size=96",
        "model.head.params.decoder_channels=[32,16,16,8,8]", "data.num_workers=0", "data.batch_size=2",
        "data.transforms.train=train", "train.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=3",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"output_dir={tmp_path / 'run'}"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == 6
    assert metrics["pixel_acc"] is not None and 0 <= metrics["pixel_acc"] <= 1
    classes = 11 if config == "camvid" else 129
    assert len(metrics["per_class"]) == classes
    # classes absent from these 6 images' ground truth and never predicted are null, not 0
    assert any(v is None for v in metrics["per_class"].values()) or config == "camvid"
