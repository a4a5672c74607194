"""``tv:<name>``: any torchvision classification CNN as a backbone (ShuffleNet, GoogLeNet, AlexNet, VGG, DenseNet,
MobileNetV2, ResNeXt, ConvNeXt, ...), under the backbone contract.

The network is torchvision's own (``torchvision.models.get_model(name)``, the library's module names, so its
weights load). Its stage outputs are found by stride, automatically: the model is traced (``torch.fx``, as
torchvision's ``create_feature_extractor`` does) and run once on a probe image; for every stride ``2**k`` the
*last* node whose output is a 4-D map at that stride becomes level ``c_k`` (strides are rounded to the nearest
power of two, so AlexNet's 55 / 27 / 13 / 6 cells of a 224 input are c2 / c3 / c4 / c5). The backbone is
``create_feature_extractor(network, those nodes)``; channels and strides are known after construction.

Nearest faithful mapping: a network whose first output is already coarser (AlexNet's stride-4 first conv has no
stride-2 output) simply has no ``c1``; a level a network lacks is a one-line error naming what it has. GoogLeNet
is built without its auxiliary classifiers and with ``transform_input=False`` (detkit normalises the input).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from detkit.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrozenStagesModule,
    _convert_norm,
    check_frozen_stages,
    check_levels,
)
from detkit.backbones.family import BackboneFamily
from detkit.errors import ConfigError

PREFIX = "tv:"
PROBE = 224
EXTRA = {"googlenet": {"aux_logits": False, "transform_input": False, "init_weights": True},
         "inception_v3": {"aux_logits": False, "transform_input": False, "init_weights": True}}
RESOLUTION = {"inception_v3": 299}  # ImageNet input size where it is not 224


def build_network(name: str, num_classes: int = 1000, kwargs: dict | None = None) -> nn.Module:
    """torchvision's classification network ``name`` (no weights: files load later, by name)."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"model.backbone.name = 'tv:{name}': not a torchvision classification model (e.g. "
                          f"tv:shufflenet_v2_x1_0, tv:googlenet, tv:densenet121, tv:vgg16_bn)")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                            **{**EXTRA.get(name, {}), **(kwargs or {})})
    except TypeError as e:
        raise ConfigError(f"model.backbone.kwargs for tv:{name}: {e}") from None


def find_levels(network: nn.Module, size: int = PROBE) -> tuple[dict[str, str], dict[str, int]]:
    """``({level: fx node}, {level: channels})``: the last 4-D node at each stride (see the module docstring)."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    _, nodes = get_graph_node_names(network)
    probe = create_feature_extractor(network, return_nodes=nodes).eval()
    with torch.no_grad():
        out = probe(torch.zeros(1, 3, size, size))
    levels: dict[str, str] = {}
    channels: dict[str, int] = {}
    for node in nodes:  # execution order: a later node at the same stride replaces an earlier one
        value = out[node]
        if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[-1] < 2:
            continue
        k = round(math.log2(size / value.shape[-1]))
        if k >= 1:
            level = f"c{k}"
            levels[level], channels[level] = node, int(value.shape[1])
    return dict(sorted(levels.items(), key=lambda kv: int(kv[0][1:]))), channels


class TorchvisionBackbone(FrozenStagesModule):
    """A torchvision classification network's stage outputs keyed by level."""

    def __init__(self, name: str, out_levels, *, frozen_stages: int = 0, norm: str = "bn",
                 kwargs: dict | None = None) -> None:
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        self.name = PREFIX + name
        network = build_network(name, kwargs=kwargs)
        nodes, channels = find_levels(network)
        self.nodes = nodes  # level -> the traced node of torchvision's network it is taken at
        self.levels = list(nodes)
        check_levels(self.name, list(out_levels), self.levels)
        check_frozen_stages(self.name, frozen_stages, self.levels)
        self.out_levels = sorted(out_levels, key=self.levels.index)
        top = max(self.levels.index(level) for level in self.out_levels)
        kept = {nodes[level]: level for level in self.levels[:top + 1]}  # nothing above the top level runs
        extractor = create_feature_extractor(network, return_nodes=kept)
        self.dropped = tuple(f"{n}." for n, _ in network.named_children() if not hasattr(extractor, n))
        self.network = _convert_norm(extractor, norm)
        self.out_channels = {level: channels[level] for level in self.out_levels}
        self.strides = {level: 2 ** int(level[1:]) for level in self.out_levels}
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.recommended_resolution = RESOLUTION.get(name, 224)
        self._frozen = self._freeze(frozen_stages)

    def _freeze(self, n: int) -> list[nn.Module]:
        """Freeze every module that runs up to the n-th level's output (``c1`` = 1), in the traced order."""
        if n == 0:
            return []
        output = next(node for node in self.network.graph.nodes if node.op == "output")
        last = output.args[0].get(self.levels[n - 1]) if n - 1 < len(output.args[0]) else None
        frozen = []
        for node in self.network.graph.nodes:
            if node.op == "call_module":
                module = self.network.get_submodule(node.target)
                module.requires_grad_(False)
                frozen.append(module)
            if node is last:
                break
        return frozen

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = self.network(x)
        return OrderedDict((level, out[level]) for level in self.out_levels)



def build_torchvision_backbone(cfg) -> TorchvisionBackbone:
    from detkit.backbones.pretrained import load_into, looks_like_path, read_state_dict

    name = cfg.name[len(PREFIX):]
    backbone = TorchvisionBackbone(name, cfg.out_levels, frozen_stages=cfg.frozen_stages, norm=cfg.norm,
                                   kwargs=dict(cfg.kwargs))
    if cfg.pretrained:
        state = read_state_dict(cfg.pretrained) if looks_like_path(cfg.pretrained) else _named(name, cfg.pretrained)
        load_into(backbone.network, state, source=str(cfg.pretrained), name=backbone.name,
                  ignored_prefixes=backbone.dropped)
    return backbone


def build_torchvision_classifier(cfg, num_classes: int = 1000) -> nn.Module:
    return build_network(cfg.name[len(PREFIX):], num_classes, dict(cfg.kwargs))


# Any torchvision classification CNN: kwargs are torchvision's builder arguments (stochastic depth among them, so
# drop_path is refused with a pointer there); no taps (levels are traced nodes, not runs of submodules).
FAMILY = BackboneFamily(
    name="tv",
    prefix=PREFIX,
    build=build_torchvision_backbone,
    classifier=build_torchvision_classifier,
    resolution=lambda cfg: RESOLUTION.get(cfg.name[len(PREFIX):], 224),
    accepts=("kwargs",),
    refusals={"drop_path": "model.backbone.drop_path = {value}: {name}: pass the model's own argument in "
                           "model.backbone.kwargs (e.g. stochastic_depth_prob for ConvNeXt)"},
)


def _named(name: str, tag: str) -> dict[str, torch.Tensor]:
    """torchvision's named weights of ``name`` (downloaded when online; offline: one line suggesting a file)."""
    from detkit.backbones.pretrained import torchvision_weights

    return torchvision_weights(name, tag, f"tv:{name}")[0]
