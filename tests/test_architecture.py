"""The architecture keeps its shape: floors import only lower floors, registries are the only lists of names, every
registered part keeps its contract, and a new head is one registration away from training through the CLI."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import batched_nms

from conftest import ROOT
from detkit.cli import main
from detkit.heads.params import parse_params
from detkit.heads.registry import HEADS, HeadTraits
from detkit.utils.registry import contract_attributes

# The floors, lowest first (docs/architecture.md): a module may import its own package and lower floors only.
# Packages on one floor (backbones, necks) do not import each other.
FLOORS = [("errors",), ("utils",), ("config",), ("data",), ("backbones", "necks"), ("heads",), ("models",),
          ("evaluation",), ("inference",), ("engine",), ("analysis",), ("cli",)]
FLOOR = {package: i for i, packages in enumerate(FLOORS) for package in packages}
PACKAGE = ROOT / "detkit"


def _imports(path: Path) -> set[str]:
    """Every detkit module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "detkit" and [a.name for a in node.names] == ["__version__"]:
                continue  # the version number is not an arrow
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "detkit" or m.startswith("detkit.")}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) == 1 and rel.name in ("__init__.py", "__main__.py"):
            continue  # the package facade (detkit.train, detkit.load_model, ...) sits above every floor
        source = rel.parts[0].removesuffix(".py")
        assert source in FLOOR, f"detkit/{rel}: package {source!r} has no floor in FLOORS (docs/architecture.md)"
        for module in _imports(path):
            target = _package(module)
            if target is None or target == source:
                if target is None and module == "detkit":
                    bad.append(f"detkit/{rel} imports the facade 'detkit'")
                continue
            if FLOOR[target] >= FLOOR[source]:
                bad.append(f"detkit/{rel} ({source}) imports {module} ({target})")
    return bad


def test_no_floor_imports_a_higher_one():
    assert upward_imports() == []


def test_the_layering_check_catches_an_upward_import(tmp_path, monkeypatch):
    bad = PACKAGE / "data" / "_layering_probe.py"
    bad.write_text("from detkit.evaluation import coco_metrics\n")
    try:
        assert upward_imports() == ["detkit/data/_layering_probe.py (data) imports detkit.evaluation (evaluation)"]
    finally:
        bad.unlink()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_cycles() -> list[list[str]]:
    """Groups of detkit modules that import each other, directly or round a longer loop, counting imports inside
    functions too (a lazy import hides a circle, it does not open it). An import of ``a.b`` where ``b`` is a module
    is an arrow to that module; of a name from a package, to the package (its ``__init__``)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name == "detkit":
            continue  # the facade
        arrows = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                arrows |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names}
            elif isinstance(node, ast.Import):
                arrows |= {a.name for a in node.names}
        graph[name] = {m for m in arrows if m in modules and m not in (name, "detkit")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_module_imports_a_module_that_imports_it_back():
    assert import_cycles() == []


def test_the_circle_check_catches_a_lazy_circle():
    a, b = PACKAGE / "utils" / "_circle_a.py", PACKAGE / "utils" / "_circle_b.py"
    a.write_text("def f():\n    from detkit.utils import _circle_b\n")
    b.write_text("from detkit.utils._circle_a import f\n")
    try:
        assert import_cycles() == [["detkit.utils._circle_a", "detkit.utils._circle_b"]]
    finally:
        a.unlink()
        b.unlink()


def test_registered_targets_live_with_their_registry():
    """Lazy targets (``"module:attribute"``) point into their own package, never up the floors."""
    from detkit.backbones import BACKBONES
    from detkit.data.formats import FORMATS
    from detkit.necks import NECKS

    for registry, package in ((HEADS, "detkit.heads."), (NECKS, "detkit.necks."), (BACKBONES, "detkit.backbones."),
                              (FORMATS, "detkit.data.")):
        entries = [registry.entry(n) for n in registry.names()] + list(registry._prefixes.values())
        for entry in entries:
            if isinstance(entry.target, str):
                assert entry.target.startswith(package), (registry.kind, entry.name, entry.target)


def test_no_module_is_over_about_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 420} == {}


def test_every_registered_head_builds_and_keeps_the_contract():
    from detkit.config import load_config
    from detkit.models import build_model

    overrides = {"unet": ["model.num_classes=3", "model.neck.name=none", "eval.metrics=[semantic]",
                          "eval.main_metric=mIoU"],
                 "ssd": ["model.neck.name=none", "model.backbone.out_levels=[c4,c5]"],
                 "fcos": ["model.head.params.head_norm=none"]}  # GroupNorm(32) needs 64+ channels
    for name in HEADS.names():
        cfg = load_config(None, ["model.backbone.name=resnet18", "data.image_size=64", "model.neck.out_channels=16",
                                 f"model.head.name={name}", *overrides.get(name, [])])
        model = build_model(cfg)
        traits = HEADS.traits(name)
        assert model.traits is traits and model.task == traits.task
        for attribute in contract_attributes(HEADS.contract):
            assert hasattr(model.head, attribute)
        assert hasattr(model.head, "flat_detections") == (traits.export == "flat")


def test_both_evaluators_keep_the_evaluator_contract():
    from detkit.evaluation import DetectionEvaluator, Evaluator, SemanticEvaluator

    for cls in (DetectionEvaluator, SemanticEvaluator):
        missing = [a for a in contract_attributes(Evaluator) if not callable(getattr(cls, a, None))]
        assert missing == [], (cls.__name__, missing)


def test_a_part_that_breaks_its_contract_is_named():
    from detkit.necks import NECKS

    with pytest.raises(TypeError, match=r"neck 'fpn' \(Linear\) does not keep the neck contract \(Neck\): it has no "
                                        r"out_channels, strides, levels"):
        NECKS.check("fpn", nn.Linear(1, 1))


# ------------------------------------------------------------------------------- a new head, from a test file
@dataclass
class ToyParams:
    score_thresh: float = 0.05
    detections: int = 20


class ToyHead(nn.Module):
    """A minimal one-stage head on the finest level it gets: per cell, class logits and box distances (left, top,
    right, bottom, in strides); the cell holding an object's centre learns it."""

    def __init__(self, level: str, channels: int, stride: int, num_classes: int, p: ToyParams) -> None:
        super().__init__()
        self.level, self.stride, self.num_classes, self.p = level, stride, num_classes, p
        self.pred = nn.Conv2d(channels, num_classes + 4, 3, padding=1)

    def forward(self, features, images, image_sizes, targets=None):
        out = self.pred(features[self.level])  # B x (K + 4) x h x w
        logits, dist = out[:, :self.num_classes], out[:, self.num_classes:].exp() * self.stride
        b, _, h, w = logits.shape
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centres = (torch.stack([xs, ys], -1).to(out) + 0.5) * self.stride  # h x w x 2
        if targets is not None:
            heat, box_loss, n = torch.zeros_like(logits), out.new_zeros(()), 0
            for i, t in enumerate(targets):
                for box, label in zip(t["boxes"], t["labels"]):
                    cx, cy = int((box[0] + box[2]) / 2 // self.stride), int((box[1] + box[3]) / 2 // self.stride)
                    cx, cy = min(cx, w - 1), min(cy, h - 1)
                    heat[i, label - 1, cy, cx] = 1.0
                    c = centres[cy, cx]
                    goal = torch.stack([c[0] - box[0], c[1] - box[1], box[2] - c[0], box[3] - c[1]])
                    box_loss = box_loss + (dist[i, :, cy, cx] - goal).abs().mean() / self.stride
                    n += 1
            cls_loss = nn.functional.binary_cross_entropy_with_logits(logits, heat, reduction="sum") / max(n, 1)
            return None, {"loss_cls": cls_loss, "loss_box": box_loss / max(n, 1)}
        detections = []
        for i in range(b):
            scores, labels = logits[i].sigmoid().flatten(1).max(0)
            d = dist[i].flatten(1).T
            c = centres.reshape(-1, 2)
            boxes = torch.cat([c - d[:, :2], c + d[:, 2:]], 1)
            keep = scores > self.p.score_thresh
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep] + 1
            keep = batched_nms(boxes, scores, labels, 0.5)[:self.p.detections]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections, {}


def build_toy_head(params, channels, strides, num_classes, image_size) -> ToyHead:
    p = parse_params(ToyParams, params)
    level = next(iter(strides))
    return ToyHead(level, channels[level], strides[level], num_classes, p)


def test_a_head_registered_from_a_test_file_trains_through_the_cli(shapes_dir, tmp_path, capsys):
    import detkit
    from detkit.inference import Predictor

    config = tmp_path / "toy.yaml"
    config.write_text(f"""
_base_: [{ROOT / 'configs/_base_/runtime.yaml'}, {ROOT / 'configs/_base_/data/shapes.yaml'}]
data:
  train: {{images: {shapes_dir}/images/train, annotations: {shapes_dir}/annotations/instances_train.json}}
  val: {{images: {shapes_dir}/images/val, annotations: {shapes_dir}/annotations/instances_val.json}}
  image_size: 64
  batch_size: 4
model:
  backbone: {{name: resnet18, out_levels: [c3, c4, c5]}}
  neck: {{name: fpn, out_channels: 16, levels: [p3, p4, p5]}}
  head: {{name: toy, params: {{score_thresh: 0.0}}}}
train: {{epochs: 1, lr: 0.001, warmup_iters: 1}}
trainer: {{max_steps: 2, limit_val_batches: 2, enable_progress_bar: false, enable_model_summary: false,
          accelerator: cpu}}
output_dir: {tmp_path / 'run'}
""")
    HEADS.register("toy", build_toy_head, HeadTraits(task="detection", export="per_image"))
    try:
        assert main(["train", str(config)]) == 0
        run = tmp_path / "run"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["bbox_AP"] is not None and "voc07_mAP" in metrics
        model = detkit.load_model(run)
        assert isinstance(model.head, ToyHead) and model.traits.export == "per_image"
        result = Predictor(model)(str(shapes_dir / "images" / "val" / "000000.jpg"))
        assert result["boxes"].shape[1] == 4 and len(result["boxes"]) <= 20
    finally:
        HEADS.unregister("toy")
    assert "toy" not in HEADS
