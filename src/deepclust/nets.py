"""Backbones and the embedding network.

Every backbone is a :class:`Backbone`: an ordered list of named stages (``conv1``, ``conv2``, ...,
``fc``) whose composition maps images ``(B, C, H, W)`` to flat features ``(B, feature_dim)``. Any
stage's output can be read with :meth:`Backbone.features_at` (the AND / PCP / PAD papers probe
AlexNet's ``conv5``; JULE's transfer tables use the layers below ``ip1``; DCCM's mutual-information
loss pairs a shallow conv map with the first fc layer). All backbones accept 1- or 3-channel inputs
of any reasonable size; flat sizes are found with a dummy forward at construction.

Names (:data:`BACKBONES`, declared in ``config``, whose validator reads them):

``mlp``
    Two ReLU layers over the flattened pixels (256 units each), no BatchNorm, no dropout. For tests
    and for exact multi-process equality checks (a BN-free network gives identical gradients however
    the batch is split).
``jule_cnn``
    JULE (Yang et al., CVPR 2016, Sec. 4.1.2 and Table 9 of the appendix): blocks of [conv 50 @ 5x5,
    stride 1, padding 0 -> BN -> ReLU -> (max-pool 2x2 / 2)], stacked "so that the size of the output
    feature map is about 10x10", then ``ip1``, an inner product to 160 (``feature_dim`` 160): by
    default Linear -> BN -> ReLU, as every other backbone's last layer here; ``ip1="linear"`` is the
    paper's (Table 9: ip1 -> l2-norm; the authors' Torch ``models_def/*.lua``: ``nn.Linear`` then
    ``nn.Normalize(2)``; their Caffe prototxt: InnerProduct then Normalize), which JULE asks for
    (``methods.jule``, ``options.ip1``). The number of blocks and pools follows a rule fitted to
    Table 9, which it reproduces for all nine data sets (see :func:`jule_plan`). Pooling uses
    Caffe's ceil rounding (JULE used Caffe).
``dccm_cnn``
    DCCM (Wu et al., ICCV 2019, supplementary Table 4: "a shallow version of AlexNet") per input size,
    BN + ReLU after every conv and fc, then ``fc`` = the (D) layer: Linear(256, 64) -> BN -> ReLU
    (Linear(256, 256) for the 64 px Tiny-ImageNet net). The final class layer of Table 4 belongs to the
    method, not to the backbone.
``alexnet``
    The 5-conv AlexNet with BatchNorm used by the instance-discrimination family (AND, PAD, PCP) on
    small images: 3x3 convs 64-192-384-256-256, max-pool after conv1, conv2 and conv5, then fc1 / fc2
    of 1024 units with BN + ReLU (``feature_dim`` 1024); inputs > 64 px get the ImageNet AlexNet of
    Wu et al. 2018 (11x11/4 stem, 3x3/2 pools, fc 4096).
``resnet18`` / ``resnet50``
    torchvision's ``resnet18`` / ``resnet50`` (``weights=None``, never pretrained). For images <= 64 px
    the stem is a 3x3 stride-1 conv and the max-pool is removed, as in Wu et al. 2018's lemniscate
    CIFAR ResNet that AND uses; larger images keep the ImageNet stem (7x7/2 conv + max-pool). The stem
    conv takes ``in_channels`` (1 or 3); ``fc`` is dropped (``feature_dim`` 512 / 2048).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import BACKBONES  # the names, declared once where the validator reads them
from .errors import ConfigError

__all__ = ["BACKBONES", "IP1", "Backbone", "EmbeddingNet", "Sobel", "build_backbone", "default_backbone", "jule_plan"]

ImageSize = tuple[int, int]


class Backbone(nn.Sequential):
    """Named stages applied in order; the output of the last one, flattened, is the feature vector.

    ``out_dim`` is the feature dimension. ``shallow_layer`` names the stage a shallow-vs-deep loss
    reads (DCCM's S, paired with the fc output in its mutual-information loss): DCCM's nets mark it
    as the paper does; the others take their second convolutional stage (the first where there is
    only one; ``fc1`` of the MLP, ``layer1`` of a ResNet: ``SHALLOW``).
    """

    out_dim: int
    shallow_layer: str | None = None

    def __init__(self, stages: Iterable[tuple[str, nn.Module]], in_shape: tuple[int, int, int]):
        super().__init__(OrderedDict(stages))
        self.in_shape = tuple(in_shape)
        self.out_dim = _flat_dim(self, in_shape)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self:
            x = stage(x)
        return x.flatten(1)

    def layer_names(self) -> list[str]:
        return list(self._modules)

    def features_at(self, x: Tensor, layer: str, *, flatten: bool = True) -> Tensor:
        """Output of stage ``layer`` (flattened to (B, -1) unless ``flatten=False``)."""
        if layer not in self._modules:
            raise ConfigError(f"unknown layer '{layer}'; this backbone has {self.layer_names()}")
        for name, stage in self.named_children():
            x = stage(x)
            if name == layer:
                return x.flatten(1) if flatten else x
        raise AssertionError("unreachable")


@torch.no_grad()
def _flat_dim(module: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Feature size of ``module`` for one input of ``in_shape``, without touching BN statistics."""
    was_training = module.training
    module.eval()
    try:
        out = module(torch.zeros(1, *in_shape))
    finally:
        module.train(was_training)
    return int(out.flatten(1).shape[1])


def _size(image_size: ImageSize | int) -> ImageSize:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = (int(v) for v in image_size)
    return h, w


def _conv_bn_relu(cin: int, cout: int, k: int, pad: int = 0, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=pad), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _fc_bn_relu(fin: int, fout: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(fin, fout), nn.BatchNorm1d(fout), nn.ReLU(inplace=True))


# -------------------------------------------------------------------------------------------------
# mlp


def _mlp(c: int, hw: ImageSize, hidden: int = 256) -> Backbone:
    d = c * hw[0] * hw[1]
    return Backbone([
        ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(inplace=True))),
        ("fc2", nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True))),
    ], (c, *hw))


# -------------------------------------------------------------------------------------------------
# JULE


def jule_plan(image_size: ImageSize | int) -> list[tuple[int, bool]]:
    """JULE's conv blocks for an input size: a list of (conv padding, followed by a max-pool).

    JULE (appendix A.4, Table 9) stacks conv(5x5, pad 0) [+ pool 2/2] blocks "so that the size of
    the most top layer response map is about 10x10", per data set. This rule, on the smaller side s
    and with Caffe's ceil rounding of pools, reproduces every column of Table 9:

    * conv: s -> s - 4;
    * pool after it when s >= 9 (the pooled map keeps >= 5 px), else stop with this conv;
    * after a pool, add another block when s >= 12, else stop.

    USPS 16: 12 p6 -> [c+p]; MNIST 28: 24 p12 | 8 -> [c+p, c]; FRGC / CMU-PIE 32: 28 p14 | 10 p5 ->
    [c+p, c+p]; YTF 55: 51 p26 | 22 p11 -> [c+p] x 2; UMist 112x92: 88 p44 | 40 p20 | 16 p8 ->
    [c+p] x 3; COIL 128: 124 p62 | 58 p29 | 25 p13 | 9 p5 -> [c+p] x 4. Inputs smaller than the paper's
    (sklearn's 8x8 digits: 8 -> 4, no pool) follow the same rule; a side below 5 px gets padding 2 so
    the 5x5 conv still fits.
    """
    h, w = _size(image_size)
    plan: list[tuple[int, bool]] = []
    while True:
        pad = 2 if min(h, w) < 5 else 0
        h, w = h + 2 * pad - 4, w + 2 * pad - 4
        if min(h, w) >= 9:
            plan.append((pad, True))
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            if min(h, w) >= 12:
                continue
        else:
            plan.append((pad, False))
        return plan


IP1 = ("bn_relu", "linear")  # jule_cnn's ip1: Linear -> BN -> ReLU (the default), or Linear alone (JULE Table 9)


def _jule_cnn(c: int, hw: ImageSize, ip1: str = "bn_relu") -> Backbone:
    stages: list[tuple[str, nn.Module]] = []
    cin = c
    for i, (pad, pool) in enumerate(jule_plan(hw), 1):
        layers = _conv_bn_relu(cin, 50, 5, pad)  # JULE Sec. 4.1.2: 50 channels, 5x5, stride 1, pad 0
        if pool:
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))  # kernel 2, stride 2 (Caffe: ceil)
        stages.append((f"conv{i}", nn.Sequential(*layers)))
        cin = 50
    flat = _flat_dim(nn.Sequential(*(m for _, m in stages)), (c, *hw))
    # JULE Sec 4.1.2: an inner product layer of dimension 160; Table 9: ip1 -> l2-norm (the L2 is the
    # embedding's, EmbeddingNet). Linear at index 1 in both forms, so the Linear's keys are the same.
    head = _fc_bn_relu(flat, 160) if ip1 == "bn_relu" else nn.Sequential(nn.Flatten(), nn.Linear(flat, 160))
    stages.append(("ip1", head))
    return Backbone(stages, (c, *hw))


# -------------------------------------------------------------------------------------------------
# DCCM


def _dccm_cnn(c: int, hw: ImageSize) -> Backbone:
    """DCCM supplementary Table 4 (and the authors' models/cifar_C4_L2.py for the 32 px net).

    * <= 48 px (CIFAR-10/100, 32x32): conv3x3 64 (pad 0) -> conv3x3 64 (S) -> max-pool 2/2 ->
      conv3x3 128 -> max-pool 2/2 -> conv3x3 256 -> average pool -> (D) Linear(256, 64).
      Table 4 says "4x4 AvgPooling with stride 2", the authors' code uses stride 4 (a typo in the
      table); at 32 px the map is 4x4, so both are a global average, which is what we use - it also
      adapts the net to 28 px (MNIST: the map is 3x3). Inputs below 20 px use padding 1 so the map
      does not vanish (16 px: 16-16-8-8-4-4).
    * 49..80 px (Tiny-ImageNet, 64x64): conv5x5 64 -> conv5x5 64 -> max-pool 4/4 -> conv3x3 128 (S)
      -> conv3x3 128 -> max-pool 4/4 -> conv1x1 256 -> avg-pool (2x2, global) -> (D) Linear(256, 256).
    * > 80 px (STL-10 / ImageNet-10 / ImageNet-dogs, 96x96): as the 64 px net with a 4x4 average
      pool (global at 96 px) and (D) Linear(256, 64).

    S is the map the paper pairs with D in the mutual-information loss (``shallow_layer``): for CIFAR
    the second conv's map after its max-pool (``pool1``; the authors' cfgs/cifar10.yaml ``layers: [7,
    19]``, counted by utils/functions.py's ``forward``: module 7 is that pool, 14x14 at 32 px), "the
    third conv layer" for the larger nets (Sec. 6.4; the authors ship no configuration for them).
    The authors' code runs BN with ``track_running_stats=False`` (batch statistics in eval too);
    here BN is standard (running statistics in eval). Pools round down (PyTorch, as the authors').
    """
    s = min(hw)
    if s <= 48:
        pad = 0 if s >= 20 else 1
        stages = [
            ("conv1", nn.Sequential(*_conv_bn_relu(c, 64, 3, pad))),
            ("conv2", nn.Sequential(*_conv_bn_relu(64, 64, 3, pad))),
            ("pool1", nn.MaxPool2d(2, 2)),
            ("conv3", nn.Sequential(*_conv_bn_relu(64, 128, 3, pad))),
            ("pool2", nn.MaxPool2d(2, 2)),
            ("conv4", nn.Sequential(*_conv_bn_relu(128, 256, 3, pad))),
            ("pool3", nn.AdaptiveAvgPool2d(1)),
            ("fc", _fc_bn_relu(256, 64)),
        ]
        shallow = "pool1"  # the authors' layers[0] = 7: conv2's map after its max-pool (14x14 at 32 px)
    else:
        d = 256 if s <= 80 else 64
        stages = [
            ("conv1", nn.Sequential(*_conv_bn_relu(c, 64, 5))),
            ("conv2", nn.Sequential(*_conv_bn_relu(64, 64, 5))),
            ("pool1", nn.MaxPool2d(4, 4)),
            ("conv3", nn.Sequential(*_conv_bn_relu(64, 128, 3))),
            ("conv4", nn.Sequential(*_conv_bn_relu(128, 128, 3))),
            ("pool2", nn.MaxPool2d(4, 4)),
            ("conv5", nn.Sequential(*_conv_bn_relu(128, 256, 1))),
            ("pool3", nn.AdaptiveAvgPool2d(1)),
            ("fc", _fc_bn_relu(256, d)),
        ]
        shallow = "conv3"
    net = Backbone(stages, (c, *hw))
    net.shallow_layer = shallow
    return net


# -------------------------------------------------------------------------------------------------
# AlexNet


def _alexnet(c: int, hw: ImageSize) -> Backbone:
    """AlexNet with BN as in the instance-discrimination code base (Wu et al. 2018 / AND / PAD).

    Small images (<= 64 px): every conv 3x3 stride 1 pad 1, max-pool 2x2/2 after conv1, conv2, conv5
    (ceil rounding, so odd sizes such as 28 px keep their border: 28-14-7-4), fc1 / fc2 of 1024 units
    (32 px: conv5 output 256x4x4 = 4096 -> 1024 -> 1024). Larger images: the ImageNet AlexNet of
    Wu et al. 2018 (11x11/4 pad 2 stem, 5x5 conv2, 3x3/2 max-pools, fc 4096). Each ``convN`` stage
    includes its BN, ReLU and pool, so ``features_at(x, "conv5")`` is the pooled conv5 map that a
    linear probe reads.
    """
    small = max(hw) <= 64
    if small:
        widths, kernels, pads, strides = (64, 192, 384, 256, 256), (3, 3, 3, 3, 3), (1, 1, 1, 1, 1), (1,) * 5
        pool = lambda: nn.MaxPool2d(2, 2, ceil_mode=True)  # noqa: E731
        fc = 1024
    else:
        widths, kernels, pads, strides = (64, 192, 384, 256, 256), (11, 5, 3, 3, 3), (2, 2, 1, 1, 1), (4, 1, 1, 1, 1)
        pool = lambda: nn.MaxPool2d(3, 2)  # noqa: E731
        fc = 4096
    stages: list[tuple[str, nn.Module]] = []
    cin = c
    for i in range(5):
        layers = _conv_bn_relu(cin, widths[i], kernels[i], pads[i], strides[i])
        if i in (0, 1, 4):
            layers.append(pool())
        stages.append((f"conv{i + 1}", nn.Sequential(*layers)))
        cin = widths[i]
    flat = _flat_dim(nn.Sequential(*(m for _, m in stages)), (c, *hw))
    stages += [("fc1", _fc_bn_relu(flat, fc)), ("fc2", _fc_bn_relu(fc, fc))]
    return Backbone(stages, (c, *hw))


# -------------------------------------------------------------------------------------------------
# ResNet


def _resnet(name: str, c: int, hw: ImageSize) -> Backbone:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if max(hw) <= 64:
        # Wu et al. 2018 / AND CIFAR ResNet: 3x3 stride-1 stem, no max-pool.
        net.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif c != 3:
        net.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    net.fc = nn.Identity()
    return Backbone([
        ("stem", nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)),
        ("layer1", net.layer1), ("layer2", net.layer2), ("layer3", net.layer3), ("layer4", net.layer4),
        ("pool", nn.Sequential(net.avgpool, nn.Flatten())),
    ], (c, *hw))


# -------------------------------------------------------------------------------------------------
# public API


def build_backbone(name: str, in_channels: int, image_size: ImageSize | int, *,
                   ip1: str = "bn_relu") -> tuple[Backbone, int]:
    """The backbone ``name`` for ``in_channels`` x ``image_size`` images, and its feature dim.
    ``ip1`` (one of :data:`IP1`) is ``jule_cnn``'s last layer; the other backbones have no ip1."""
    hw = _size(image_size)
    if ip1 not in IP1:
        raise ConfigError(f"ip1 must be one of {', '.join(IP1)}, got '{ip1}'")
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    if min(hw) < 1:
        raise ConfigError(f"image size must be positive, got {hw}")
    if name == "mlp":
        net = _mlp(in_channels, hw)
    elif name == "jule_cnn":
        net = _jule_cnn(in_channels, hw, ip1)
    elif name == "dccm_cnn":
        net = _dccm_cnn(in_channels, hw)
    elif name == "alexnet":
        net = _alexnet(in_channels, hw)
    elif name in ("resnet18", "resnet50"):
        net = _resnet(name, in_channels, hw)
    else:
        raise ConfigError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    if net.shallow_layer is None:
        names = [n for n, _ in net.named_children()]
        convs = [n for n in names if n.startswith("conv")]
        net.shallow_layer = SHALLOW.get(name) or (convs[1] if len(convs) > 1 else convs[0] if convs else names[0])
    return net, net.out_dim


SHALLOW = {"mlp": "fc1", "resnet18": "layer1", "resnet50": "layer1"}  # the rest: build_backbone's rule


def default_backbone(channels: int, image_size: ImageSize | int) -> str:
    """The backbone the papers would use for such images.

    * grey images up to 128 px -> ``jule_cnn`` (JULE's per-data-set CNN covers MNIST 28, USPS 16,
      FRGC / CMU-PIE 32, YTF 55, UMist 112x92, COIL 128; also sklearn's 8x8 digits);
    * colour images smaller than 32 px -> ``jule_cnn`` (too small for a ResNet to pay off);
    * colour images of 32 px and more, and grey images above 128 px -> ``resnet18`` (AND / PCP's
      CIFAR backbone, 3x3 stem up to 64 px, ImageNet stem above).
    """
    h, w = _size(image_size)
    side = max(h, w)
    if channels == 1:
        return "jule_cnn" if side <= 128 else "resnet18"
    return "jule_cnn" if side < 32 else "resnet18"


class Sobel(nn.Module):
    """DeepCluster (Caron et al. 2018, Sec 4 / its code): a fixed filter in front of the network:
    colour to grey, then horizontal and vertical Sobel gradients (2 output channels), so the
    clustering cannot latch onto colour. No parameters; the same on every device."""

    def __init__(self, in_channels: int):
        super().__init__()
        grey = torch.full((1, in_channels, 1, 1), 1.0 / in_channels)
        sobel = torch.tensor([[[1.0, 0, -1], [2, 0, -2], [1, 0, -1]], [[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]]])
        self.register_buffer("grey", grey, persistent=False)
        self.register_buffer("sobel", sobel[:, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(x, self.grey), self.sobel, padding=1)


class EmbeddingNet(nn.Module):
    """[Sobel] -> backbone -> head -> L2 normalisation: the papers' normalised (default 128-d) embedding.

    ``head`` is Linear(feature_dim, dim), or Linear(feature_dim, head_hidden) -> ReLU ->
    Linear(head_hidden, dim) when ``head_hidden`` is given; its output is normalised in ``forward``.
    ``sobel`` puts DeepCluster's fixed Sobel filter in front (see :class:`Sobel`). ``head=False``
    (methods that train no projection, e.g. DeepCluster): the embedding is the L2-normalised backbone
    output itself (``dim`` = the backbone's feature dimension). ``backbone_options``: keywords of
    :func:`build_backbone` beyond the name and shape (a method's ``Method.backbone_options``: JULE's ip1).
    """

    def __init__(self, backbone: str, in_channels: int, image_size: ImageSize | int, dim: int = 128,
                 head_hidden: int | None = None, sobel: bool = False, head: bool = True,
                 backbone_options: dict | None = None):
        super().__init__()
        if dim < 1:
            raise ConfigError(f"embedding dim must be >= 1, got {dim}")
        self.backbone_name = backbone
        self.input_shape = (in_channels, *_size(image_size))
        self.sobel = Sobel(in_channels) if sobel else None
        self.backbone, self.feature_dim = build_backbone(backbone, 2 if sobel else in_channels, image_size,
                                                         **(backbone_options or {}))
        self.dim = dim if head else self.feature_dim
        if not head:
            self.head: nn.Module = nn.Identity()
        elif head_hidden:
            self.head: nn.Module = nn.Sequential(nn.Linear(self.feature_dim, head_hidden), nn.ReLU(inplace=True),
                                                 nn.Linear(head_hidden, dim))
        else:
            self.head = nn.Linear(self.feature_dim, dim)
        self.to(memory_format=torch.channels_last)  # the conv weights NHWC, and the inputs (see _input)

    def _input(self, x: Tensor) -> Tensor:
        # NHWC ("channels_last"): oneDNN's convolutions and pools run a little faster in it on a CPU.
        # Forward+backward of JULE's CNN, NHWC and NCHW interleaved on this 2-core machine (12 pairs,
        # batches of 128 and 256, 28 px grey and 32 px colour): NHWC faster in every pair, median +10%
        # (3-54%: the host drifted during the run).
        # Whole PAD epochs (MNIST-test, CIFAR-10-test) moved within this host's run-to-run noise.
        # The same function: outputs agree with NCHW to float rounding (1e-5). Values, shapes and
        # state dicts are unchanged (a stored layout only; a 1-channel batch is already NHWC).
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        return self.sobel(x) if self.sobel is not None else x

    @property
    def shallow_layer(self) -> str:
        """The backbone stage a shallow-vs-deep loss reads (DCCM's S; see :class:`Backbone`)."""
        return self.backbone.shallow_layer

    def forward(self, x: Tensor) -> Tensor:
        """(B, dim) L2-normalised embedding."""
        return F.normalize(self.head(self.backbone(self._input(x))), dim=1)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(backbone features (B, feature_dim), L2-normalised embedding (B, dim)) in one pass."""
        f = self.backbone(self._input(x))
        return f, F.normalize(self.head(f), dim=1)

    def layer_names(self) -> list[str]:
        """The backbone's stages, then ``"pre_relu"`` (its output before the last ReLU),
        ``"backbone"`` (= its output) and ``"embedding"``."""
        return self.backbone.layer_names() + ["pre_relu", "backbone", "embedding"]

    def tap_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every tap (one image of zeros through the network in eval mode), for
        methods that size their own modules from it."""
        with torch.no_grad():
            was = self.training
            self.eval()
            taps = self.taps(torch.zeros(1, *self.input_shape), tuple(self.layer_names()))
            self.train(was)
        return {k: tuple(v.shape[1:]) for k, v in taps.items()}

    def taps(self, x: Tensor, names: tuple[str, ...] | list[str]) -> dict[str, Tensor]:
        """Several named outputs in one pass: backbone stages (their own shape, e.g. (B, C, H, W)),
        ``pre_relu`` (the flat backbone output before the last stage's closing ReLU: DeepCluster's
        features, its ``main.py`` drops the classifier's last ReLU before clustering; a last stage
        that does not end in a ReLU, a ResNet's pooling, gives its output), ``backbone`` (flat
        features) and ``embedding`` (L2-normalised)."""
        unknown = [n for n in names if n not in self.layer_names()]
        if unknown:
            raise ConfigError(f"unknown feature tap '{unknown[0]}'; this network has: {', '.join(self.layer_names())}")
        out: dict[str, Tensor] = {}
        h = self._input(x)
        stages = list(self.backbone.named_children())
        for i, (stage_name, stage) in enumerate(stages):
            last_relu = isinstance(stage, nn.Sequential) and isinstance(stage[-1], nn.ReLU)
            if i == len(stages) - 1 and "pre_relu" in names and last_relu:
                pre = stage[:-1](h)
                out["pre_relu"], h = pre.flatten(1), F.relu(pre)
            else:
                h = stage(h)
            if stage_name in names:
                out[stage_name] = h
        f = h.flatten(1)
        if "pre_relu" in names:
            out.setdefault("pre_relu", f)
        if "backbone" in names:
            out["backbone"] = f
        if "embedding" in names:
            out["embedding"] = F.normalize(self.head(f), dim=1)
        return out

    def features_at(self, x: Tensor, layer: str, *, flatten: bool = True) -> Tensor:
        """Output of a named layer (see :meth:`layer_names`), flattened to (B, -1) by default."""
        t = self.taps(x, (layer,))[layer]
        return t.flatten(1) if flatten else t


# -------------------------------------------------------------------------------------------------
# BatchNorm over all processes (DDP)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of ``group``, differentiable: the gradient of each process's input is
    the sum of the gradients that reach the output on every process (each process backpropagates its
    own loss; the objective is the sum of those losses, which DDP's gradient average divides by the
    world size)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _AllReduceSum.apply(grad, ctx.group), None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are those of the global batch: the concatenation of the local
    batches of every process of ``process_group`` (the default group when None). Works on any device
    and backend, gloo on CPU included (torch's ``nn.SyncBatchNorm`` is CUDA-only).

    Guarantee, in training mode with an initialised process group of more than one process: each
    channel is normalised with the mean and biased variance of all its values on all processes; the
    outputs, the gradients (of the sum of the processes' losses, with the statistics differentiated
    through the all-reduce) and ``running_mean`` / ``running_var`` (unbiased variance, ``momentum``
    or the cumulative average when it is None) / ``num_batches_tracked`` equal those of one
    ``nn.BatchNorm`` given the whole global batch, up to float rounding. Local batches may differ in
    size, even be empty. Statistics are combined in float64 from each process's (mean, biased
    variance, count), so a large mean does not cancel the variance away.

    Otherwise -- eval mode with running statistics, no process group, or a group of one process --
    ``forward`` is ``nn.BatchNorm``'s own code: bit-identical outputs and running statistics. Inputs
    are (N, C) or (N, C, *) of any number of dimensions.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}")

    def _world_size(self) -> int:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats or self._world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()
        dims = [0, *range(2, x.dim())]
        count = x.numel() // max(x.shape[1], 1)
        if count:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
        else:
            var = mean = x.new_zeros(x.shape[1]) + 0 * x.sum()  # keeps the graph for the backward all-reduce
        mean64, var64 = mean.double(), var.double()
        local = torch.cat([count * mean64, count * (var64 + mean64 * mean64), mean64.new_full((1,), count)])
        total = _AllReduceSum.apply(local, self.process_group)
        c = self.num_features
        n = int(total[-1].item())
        if n <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {n} over all processes")
        g_mean = total[:c] / n
        g_var = (total[c:2 * c] / n - g_mean * g_mean).clamp_min(0)
        self._update_running_stats(g_mean.detach(), g_var.detach(), n)
        shape = [1, c] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(g_var + self.eps).to(x.dtype)
        if self.weight is not None:
            scale = scale * self.weight.to(x.dtype)
        y = (x - g_mean.to(x.dtype).view(shape)) * scale.view(shape)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype).view(shape)
        return y.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: int) -> None:
        """As ``nn.BatchNorm`` in training: counter + 1, then an exponential (or, with ``momentum``
        None, cumulative) average of the batch mean and of the unbiased batch variance."""
        if not (self.training and self.track_running_stats):
            return
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
        if self.running_mean is not None:
            self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
            self.running_var.mul_(1 - factor).add_((var * (n / (n - 1))).to(self.running_var.dtype), alpha=factor)


def sync_batchnorm(module: nn.Module, device: torch.device | str | None = None, process_group=None) -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d/2d/3d`` replaced by a BatchNorm over all processes, so
    that a DDP run equals one process on the global batch (see :class:`GlobalBatchNorm`).

    CUDA (``device``, else the device of the module's first parameter or buffer) gets torch's
    ``nn.SyncBatchNorm.convert_sync_batchnorm``; any other device gets :class:`GlobalBatchNorm`. The
    replacements keep the same parameter objects (an optimizer built before stays valid), buffers,
    ``eps``, ``momentum``, ``affine``, ``track_running_stats`` and training mode. Returns the
    converted module (``module`` itself converted in place, unless it is a BatchNorm itself).
    """
    if device is None:
        first = next(iter([*module.parameters(), *module.buffers()]), None)
        device = first.device if first is not None else "cpu"
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _to_global_batchnorm(module, process_group)


def _to_global_batchnorm(module: nn.Module, process_group) -> nn.Module:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, process_group)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    for name, child in module.named_children():
        module.add_module(name, _to_global_batchnorm(child, process_group))
    return module
