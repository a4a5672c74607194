"""The lineage of CNNs, from AlexNet to ConvNeXt, as backbones: for ``detkit transfer --backbones lineage``.

``LINEAGE`` lists each network once: its backbone name in detkit (a registry name, ``tv:<name>`` for torchvision's
own classification networks, ``timm:<name>``), the year it was published (its arXiv preprint), the paper, and the
design idea it introduced, in one line. A transfer report whose backbones are in it also gets their year and idea
(``lineage.md``), and the plots of the metric against the year (``metric_vs_year.png``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    name: str
    backbone: str
    year: int
    paper: str
    idea: str


LINEAGE: tuple[Network, ...] = (
    Network("AlexNet", "tv:alexnet", 2012, "Krizhevsky et al., ImageNet Classification with Deep CNNs",
            "a deep CNN trained on GPUs with ReLU and dropout wins ImageNet; large early kernels, stride 4"),
    Network("VGG-16-BN", "tv:vgg16_bn", 2014, "Simonyan & Zisserman, Very Deep Convolutional Networks",
            "depth from plain stacks of 3x3 convolutions (here with BatchNorm)"),
    Network("GoogLeNet", "tv:googlenet", 2014, "Szegedy et al., Going Deeper with Convolutions",
            "Inception modules: parallel 1x1/3x3/5x5/pool branches behind cheap 1x1 bottlenecks"),
    Network("ResNet-18", "resnet18", 2015, "He et al., Deep Residual Learning for Image Recognition",
            "identity shortcuts: layers learn residuals, so very deep networks train"),
    Network("DenseNet-121", "tv:densenet121", 2016, "Huang et al., Densely Connected Convolutional Networks",
            "dense connectivity: each layer takes the concatenated maps of all earlier layers"),
    Network("ResNeXt-50", "tv:resnext50_32x4d", 2016, "Xie et al., Aggregated Residual Transformations",
            "grouped convolutions: cardinality as a dimension besides depth and width"),
    Network("MobileNetV1", "timm:mobilenetv1_100", 2017, "Howard et al., MobileNets",
            "depthwise separable convolutions for mobile compute budgets"),
    Network("SE-ResNet-18", "timm:seresnet18", 2017, "Hu et al., Squeeze-and-Excitation Networks",
            "channel attention: each block reweights its channels from globally pooled features"),
    Network("MobileNetV2", "tv:mobilenet_v2", 2018, "Sandler et al., MobileNetV2",
            "inverted residuals: thin bottlenecks with linear projections, expanded depthwise blocks"),
    Network("ShuffleNetV2", "tv:shufflenet_v2_x1_0", 2018, "Ma et al., ShuffleNet V2",
            "channel split and shuffle, designed by measured speed rather than FLOPs"),
    Network("MnasNet", "tv:mnasnet1_0", 2018, "Tan et al., MnasNet",
            "architecture search with the measured phone latency in the reward"),
    Network("MobileNetV3", "mobilenet_v3_large", 2019, "Howard et al., Searching for MobileNetV3",
            "search plus squeeze-and-excitation and the hard-swish activation"),
    Network("EfficientNet-B0", "efficientnet_b0", 2019, "Tan & Le, EfficientNet",
            "compound scaling: depth, width and resolution grown together from a searched base"),
    Network("RegNetX-400MF", "regnet_x_400mf", 2020, "Radosavovic et al., Designing Network Design Spaces",
            "design spaces: stage widths from a quantized linear rule found by studying populations"),
    Network("ConvNeXt-T", "tv:convnext_tiny", 2022, "Liu et al., A ConvNet for the 2020s",
            "a ResNet modernised with transformer choices: 7x7 depthwise convs, LayerNorm, GELU, fewer norms"),
)

BY_BACKBONE = {n.backbone: n for n in LINEAGE}


def lineage_backbones() -> list[str]:
    """The backbone names of the whole lineage, oldest first (``--backbones lineage``)."""
    return [n.backbone for n in LINEAGE]


def expand(backbones: list[str]) -> list[str]:
    """``lineage`` in a ``--backbones`` list stands for every network of :data:`LINEAGE`."""
    out: list[str] = []
    for b in backbones:
        out += lineage_backbones() if b == "lineage" else [b]
    return list(dict.fromkeys(out))


def network_of(backbone: str) -> Network | None:
    return BY_BACKBONE.get(backbone)


def ideas_table(backbones: list[str]) -> str:
    """The design-idea table (markdown) of the lineage networks among ``backbones``, oldest first."""
    found = sorted({network_of(b) for b in backbones} - {None}, key=lambda n: (n.year, LINEAGE.index(n)))
    lines = ["| year | network | backbone | design idea | paper |", "|---|---|---|---|---|"]
    lines += [f"| {n.year} | {n.name} | `{n.backbone}` | {n.idea} | {n.paper} |" for n in found]
    return "\n".join(lines) + "\n"
