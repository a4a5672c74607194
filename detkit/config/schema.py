"""The typed schema of a detkit config.

Every key a config may set is declared here, with its type and default. The dataclasses map onto
constructor arguments of the parts they configure (``model.backbone`` -> :func:`detkit.backbones.build_backbone`,
``model.neck`` -> :func:`detkit.necks.build_neck`, ...). Keys whose value must be one of a few words carry
``choices`` metadata, numbers that have bounds ``range`` metadata (:func:`ranged`), checked after loading (see
:mod:`detkit.config.loader`); no float anywhere may be NaN or infinite. (A part's own parameters -- the RegNet /
AnyNet / EfficientNet ones, ``model.head.params`` -- are checked by the part's builder, with its own messages.)
The names of parts (``model.backbone.name``, ``model.neck.name``, ``model.head.name``, ``data.<split>.format``) are not
listed here: each is checked against its registry (``detkit.models.check_model_config``,
``detkit.data.formats.check_dataset_config``), the one place that knows them. A dataclass with ``open_keys`` (a
dataset block) also takes keys it does not declare: its part's own options, checked by that part.

Sections that pass arguments through to a library (``model.backbone.kwargs`` for timm, ``trainer.extra``
for Lightning) are free-form dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


def choice(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of ``choices`` (checked by the loader)."""
    return field(default=default, metadata={"choices": tuple(choices)})


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, factory: Any = None) -> Any:
    """A number (or list of numbers) within bounds: ``ge``/``gt`` below, ``le``/``lt`` above (checked by the
    loader, with every float of the config also checked to be finite)."""
    meta = {"range": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RegNetParams:
    """A point of the RegNet design space (used when ``model.backbone.name: regnet``).

    Per-block widths u_j = w0 + wa*j are quantized to w0*wm^round(log(u_j/w0)/log(wm)) (then to a
    multiple of 8); blocks of equal width form a stage.
    """

    depth: int = 22
    w0: int = 24
    wa: float = 24.48
    wm: float = 2.54
    group_width: int = 16
    bottleneck_ratio: float = 1.0
    se_ratio: float = 0.0


@dataclass
class AnyNetParams:
    """Any 4-stage (or n-stage) X-block network, stage by stage (used when ``model.backbone.name: anynet``): the
    form every sample of a design space takes (``detkit design-space``). Defaults: RegNetX-400MF's stages."""

    depths: list[int] = field(default_factory=lambda: [1, 2, 7, 12])
    widths: list[int] = field(default_factory=lambda: [32, 64, 160, 400])
    group_widths: list[int] = field(default_factory=lambda: [16, 16, 16, 16])
    bottleneck_ratios: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])  # inner / width
    se_ratio: float = 0.0


@dataclass
class EfficientNetParams:
    """Compound scaling (used when ``model.backbone.name: efficientnet``): depth alpha^phi, width beta^phi,
    resolution gamma^phi times 224."""

    phi: float = 0.0
    alpha: float = 1.2
    beta: float = 1.1
    gamma: float = 1.15


@dataclass
class BackboneConfig:
    name: str = "resnet18"
    pretrained: str | None = None
    out_levels: list[str] = field(default_factory=lambda: ["c2", "c3", "c4", "c5"])
    frozen_stages: int = ranged(0, ge=0)
    norm: str = choice("bn", "bn", "frozen_bn", "sync_bn")
    # every BatchNorm's momentum (null: the family's own; MobileNetV3 and TF-ported nets use 0.01, which lags far
    # behind the weights in a short from-scratch run)
    bn_momentum: float | None = ranged(None, gt=0, le=1)
    drop_path: float | None = ranged(None, ge=0, lt=1)  # stochastic depth (EfficientNet, timm); null: the default
    regnet: RegNetParams = field(default_factory=RegNetParams)
    anynet: AnyNetParams = field(default_factory=AnyNetParams)
    efficientnet: EfficientNetParams = field(default_factory=EfficientNetParams)
    kwargs: dict[str, Any] = field(default_factory=dict)
    # {level: submodule}: end a level at that submodule instead of the last one at its stride (e.g. torchvision's
    # SSDlite: {c4: features.13.block.0}); registry backbones (detkit/backbones/base.py: apply_taps)
    taps: dict[str, str] = field(default_factory=dict)
    # the input normalisation the weights expect, RGB in [0, 1] units (null: the backbone's own, ImageNet's for
    # most; torchvision's SSDlite uses 0.5 / 0.5, its SSD300 ImageNet's mean and std 1/255)
    mean: list[float] | None = None
    std: list[float] | None = ranged(None, gt=0)


@dataclass
class NeckConfig:
    name: str = "fpn"  # a name in detkit.necks.NECKS, or none
    out_channels: int = ranged(256, ge=1)
    levels: list[str] = field(default_factory=lambda: ["p3", "p4", "p5", "p6", "p7"])
    extra_from: str = choice("fpn", "fpn", "backbone")
    extra_op: str = choice("conv", "conv", "maxpool")
    norm: str = choice("none", "none", "bn")  # BatchNorm after the FPN's convs (torchvision's v2 detectors)


@dataclass
class HeadConfig:
    name: str = "faster_rcnn"  # a name in detkit.heads.HEADS
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    num_classes: int = ranged(1, ge=1)
    # a trained detector to start from: a detkit run or checkpoint, torchvision detection weights (a file, or their
    # name when online); class layers keep the rows of the classes the source knows (detkit/models/weights.py)
    weights: str | None = None
    weights_classes: dict[str, Any] = field(default_factory=dict)  # this model's class -> the source's (name or id)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class DatasetConfig:
    """One dataset: the keys every format has. ``classes``: a list of names, a mapping {id: name}, or a YAML/text file
    of names. The block also takes its format's own options (``label_suffix: _mask``): the format's reader declares
    them, with their defaults, and checks them (``detkit.data.formats``: ``FORMATS``, ``check_dataset_config``)."""

    open_keys: ClassVar[str] = "the format's own options"  # keys beyond these fields are allowed (the loader)

    format: str | None = None  # a name in detkit.data.FORMATS (null: no such split)
    images: str | None = None
    annotations: str | None = None
    split: str | None = None
    classes: Any = None
    name: str | None = None


@dataclass
class TransformsConfig:
    """A preset name (``train``, ``val``, ``none``) or a list of albumentations transforms
    (``{name: HorizontalFlip, p: 0.5}``)."""

    train: Any = "train"
    val: Any = "val"


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig = field(default_factory=DatasetConfig)
    test: DatasetConfig = field(default_factory=DatasetConfig)
    image_size: int = ranged(512, ge=1)
    batch_size: int = ranged(4, ge=1)
    num_workers: int = ranged(2, ge=0)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    resize: str = choice("letterbox", "letterbox", "stretch")  # eval: keep aspect (longest side) or stretch
    min_visibility: float = ranged(0.3, ge=0, le=1)  # train: boxes keeping less of their area after a crop are dropped
    aspect_ratio_grouping: bool = False
    size_divisor: int = ranged(32, ge=1)  # batches are padded to a multiple of this
    with_masks: bool | None = None  # decode instance masks (default: when the head's traits ask for them)
    generate: str | None = choice(None, None, "shapes")  # make the dataset at ../.. of train.annotations if absent
    # an image whose header claims more pixels is skipped (counted, named) before it is decoded; null: Pillow's limit
    max_image_pixels: int | None = ranged(None, ge=1)


@dataclass
class EMAConfig:
    """An exponential moving average of the weights (Lightning's ``EMAWeightAveraging``), used for validation,
    checkpoints and the final model."""

    enabled: bool = False
    decay: float = ranged(0.999, gt=0, lt=1)
    start_step: int = ranged(0, ge=0)  # updates begin at this optimizer step


@dataclass
class TrainConfig:
    epochs: int = ranged(12, ge=1)
    # a time budget ("10min", "2h", "1h30min"): the schedule is laid over the steps that fit (engine/budget.py)
    budget: str | None = None
    total_steps: int | None = ranged(None, ge=1)  # the run's length in optimizer steps (set by a budget's plan)
    close_mosaic: float = ranged(0.0, ge=0, lt=1)  # the last fraction of the epochs trained without Mosaic
    channels_last: bool = False  # weights and batches in channels-last memory (CPU: 10-35 % faster steps)
    lr: float = ranged(0.01, gt=0)
    optimizer: str = choice("sgd", "sgd", "adamw")
    momentum: float = ranged(0.9, ge=0, lt=1)  # sgd momentum; adamw beta1
    weight_decay: float = ranged(1e-4, ge=0)
    depthwise_weight_decay: float | None = ranged(None, ge=0)  # depthwise conv weights (null: weight_decay)
    norm_weight_decay: float = ranged(0.0, ge=0)  # weight decay of normalisation weights and of all biases
    warmup_iters: int = ranged(100, ge=0)  # linear warmup from warmup_factor * lr, in optimizer steps
    warmup_factor: float = ranged(0.001, gt=0, le=1)
    scheduler: str = choice("cosine", "cosine", "multistep", "constant")
    milestones: list[int] = ranged(None, ge=0, factory=list)  # multistep: epochs at which lr is multiplied by gamma
    gamma: float = ranged(0.1, gt=0)
    grad_clip: float | None = ranged(None, gt=0)  # max gradient norm
    ema: EMAConfig = field(default_factory=EMAConfig)
    early_stopping_patience: int | None = ranged(None, ge=0)  # validations without improvement of the main metric
    # last.ckpt is written at every epoch end, when training stops early, and (a kill costs at most this much)
    checkpoint_every_n_steps: int | None = ranged(None, ge=1)  # every n optimizer steps
    checkpoint_every_minutes: float | None = ranged(10.0, gt=0)  # every so many minutes of training


@dataclass
class EvalConfig:
    """Validation metrics. ``main_metric`` picks the best checkpoint and drives early stopping."""

    metrics: list[str] = field(default_factory=lambda: ["coco", "voc07", "voc12"])
    # the same numbers; faster_coco_eval is 3-4x faster, pycocotools the reference
    backend: str = choice("faster_coco_eval", "faster_coco_eval", "pycocotools")
    main_metric: str = "bbox_AP"
    # unreadable validation images: an error (false), or scored without them and counted in metrics.json (true)
    skip_unreadable: bool = False
    # detkit eval of a detector also writes the error analysis (detkit/evaluation/analysis.py): a confusion matrix
    # with background at this IoU and score, F1 against the score threshold, the AP lost to each kind of error
    analysis: bool = True
    confusion_iou: float = ranged(0.5, gt=0, le=1)
    confusion_score: float = ranged(0.25, ge=0, le=1)
    # test-time augmentation (detkit eval --tta, predict --tta): detkit.inference.tta.TTA's arguments, e.g.
    # {scales: [1.0, 0.83, 1.17], hflip: true, merge: auto, iou: 0.55} (default scales: [1.0]); unset keys take
    # TTA's defaults
    tta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` arguments, passed through as they are (see Lightning's documentation).

    ``max_epochs`` comes from ``train.epochs``, ``gradient_clip_val`` from ``train.grad_clip``; callbacks,
    loggers and checkpointing are set up by detkit. ``devices`` takes an int, a list of ids or "auto".
    """

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = ranged(1, ge=1)
    strategy: str = "auto"
    precision: str = "32"  # 32 | bf16-mixed (CPU or GPU) | 16-mixed (GPU)
    max_steps: int = ranged(-1, ge=-1)
    max_time: str | None = None  # "DD:HH:MM:SS"
    limit_train_batches: Any = None  # int (batches) or float (fraction)
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = ranged(1, ge=1)
    num_sanity_val_steps: int = ranged(0, ge=-1)
    log_every_n_steps: int = ranged(10, ge=1)
    accumulate_grad_batches: int = ranged(1, ge=1)
    deterministic: Any = None  # true | false | "warn"
    benchmark: bool | None = None
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    detect_anomaly: bool = False
    sync_batchnorm: bool = False
    overfit_batches: Any = 0.0
    fast_dev_run: Any = False
    profiler: str | None = None
    reload_dataloaders_every_n_epochs: int = ranged(0, ge=0)


@dataclass
class LoggingConfig:
    """``loggers``: any of tensorboard, csv, mlflow, wandb (Lightning's); ``logging.<name>``: that logger's own
    arguments (``logging.mlflow.tracking_uri``, ``logging.wandb.offline``, ...); see detkit/engine/loggers.py."""

    loggers: list[str] = field(default_factory=lambda: ["tensorboard", "csv"])
    run_name: str | None = None  # default: the config's name
    tags: Any = field(default_factory=list)  # a list of tags, or a mapping of tag -> value
    tensorboard: dict[str, Any] = field(default_factory=dict)
    csv: dict[str, Any] = field(default_factory=dict)
    mlflow: dict[str, Any] = field(default_factory=dict)
    wandb: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    name: str = "detkit"
    seed: int = ranged(42, ge=0, le=2**32 - 1)
    output_dir: str = "runs/${name}/${now:%Y%m%d-%H%M%S}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
