"""Backbones and the embedding network: every backbone at every supported input, paper architectures."""

import pytest
import torch
import torch.nn as nn

from deepclust.errors import ConfigError
from deepclust.nets import BACKBONES, EmbeddingNet, build_backbone, default_backbone, jule_plan

SHAPES = [(1, 8, 8), (1, 16, 16), (1, 28, 28), (3, 32, 32)]
CASES = [(b, s) for b in BACKBONES for s in SHAPES if b != "resnet50" or s == (3, 32, 32)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("backbone,shape", CASES, ids=[f"{b}-{'x'.join(map(str, s))}" for b, s in CASES])
def test_forward_backward_norms_and_shapes(backbone, shape):
    c, h, w = shape
    net = EmbeddingNet(backbone, c, (h, w), dim=32)
    x = torch.randn(3, c, h, w)
    feats, emb = net.forward_features(x)
    assert feats.shape == (3, net.feature_dim) and emb.shape == (3, 32) and net.dim == 32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(net(x), emb)  # one pass == forward (train-mode BN: same batch)
    emb.pow(3).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    net.eval()
    with torch.no_grad():
        f1, e1 = net.forward_features(x[:1])  # a single image works in eval mode
        assert torch.allclose(net.features_at(x[:1], "backbone"), f1)
        assert torch.allclose(net.features_at(x[:1], "embedding"), e1)
        last = net.backbone.layer_names()[-1]
        assert torch.allclose(net.features_at(x[:1], last), f1)
        for layer in net.layer_names():
            assert net.features_at(x[:1], layer).ndim == 2


def test_construction_leaves_batchnorm_statistics_untouched():
    for name in ("jule_cnn", "dccm_cnn", "alexnet", "resnet18"):
        net = EmbeddingNet(name, 1, (28, 28))
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert int(m.num_batches_tracked) == 0
                assert torch.all(m.running_mean == 0)


def test_mlp_has_no_batchnorm_or_dropout_and_splits_exactly():
    net = EmbeddingNet("mlp", 1, (8, 8), dim=16)
    kinds = {type(m) for m in net.modules()}
    assert not any(issubclass(k, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) for k in kinds)
    x = torch.randn(6, 1, 8, 8)
    # BN-free: a sample's embedding does not depend on the rest of the batch
    torch.testing.assert_close(torch.cat([net(x[:2]), net(x[2:])]), net(x))


def test_alexnet_conv5_and_layers():
    net = EmbeddingNet("alexnet", 3, (32, 32))
    assert net.layer_names() == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2", "backbone", "embedding"]
    x = torch.randn(2, 3, 32, 32)
    assert net.features_at(x, "conv5").shape == (2, 256 * 4 * 4)  # pooled conv5 map, the LC probe
    assert net.features_at(x, "conv5", flatten=False).shape == (2, 256, 4, 4)
    assert net.feature_dim == 1024
    convs = [m for m in net.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 192, 384, 256, 256]
    assert all(m.kernel_size == (3, 3) and m.stride == (1, 1) for m in convs)
    with pytest.raises(ConfigError):
        net.features_at(x, "conv6")
    big = build_backbone("alexnet", 3, (96, 96))[0]
    assert big.conv1[0].kernel_size == (11, 11) and big.conv1[0].stride == (4, 4)


# JULE appendix Table 9: (input size, number of conv layers, number of pool layers)
JULE_TABLE9 = [((16, 16), 1, 1),  # USPS
               ((28, 28), 2, 1),  # MNIST-test / MNIST-full
               ((32, 32), 2, 2),  # FRGC, CMU-PIE
               ((55, 55), 2, 2),  # YTF
               ((112, 92), 3, 3),  # UMist
               ((128, 128), 4, 4)]  # COIL20, COIL100


@pytest.mark.parametrize("size,convs,pools", JULE_TABLE9)
def test_jule_plan_reproduces_table9(size, convs, pools):
    plan = jule_plan(size)
    assert len(plan) == convs and sum(pool for _, pool in plan) == pools
    assert all(pad == 0 for pad, _ in plan)


def test_jule_cnn_layers():
    net, dim = build_backbone("jule_cnn", 1, (28, 28))
    assert dim == 160
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    assert all(m.out_channels == 50 and m.kernel_size == (5, 5) and m.padding == (0, 0) for m in convs)
    assert net.layer_names() == ["conv1", "conv2", "ip1"]
    x = torch.randn(2, 1, 28, 28)
    assert net.features_at(x, "conv2", flatten=False).shape == (2, 50, 8, 8)  # 28-24-12-8 (no pool2)
    digits, _ = build_backbone("jule_cnn", 1, (8, 8))  # sklearn digits: one conv, no pool
    assert jule_plan((8, 8)) == [(0, False)]
    assert digits.features_at(torch.randn(2, 1, 8, 8), "conv1", flatten=False).shape == (2, 50, 4, 4)
    assert not any(isinstance(m, nn.MaxPool2d) for m in digits.modules())


def test_dccm_cnn_table4():
    net, dim = build_backbone("dccm_cnn", 3, (32, 32))
    assert dim == 64 and net.shallow_layer == "conv2"
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size[0], m.padding[0]) for m in convs] == \
        [(64, 3, 0), (64, 3, 0), (128, 3, 0), (256, 3, 0)]
    x = torch.randn(2, 3, 32, 32)
    assert net.features_at(x, "conv4", flatten=False).shape == (2, 256, 4, 4)  # then the average pool
    assert net.features_at(x, "pool3").shape == (2, 256)
    net96, dim96 = build_backbone("dccm_cnn", 3, (96, 96))
    assert dim96 == 64 and net96.shallow_layer == "conv3"
    assert [(m.out_channels, m.kernel_size[0]) for m in net96.modules() if isinstance(m, nn.Conv2d)] == \
        [(64, 5), (64, 5), (128, 3), (128, 3), (256, 1)]
    assert net96.features_at(torch.randn(2, 3, 96, 96), "conv5", flatten=False).shape == (2, 256, 4, 4)
    assert build_backbone("dccm_cnn", 3, (64, 64))[1] == 256  # Tiny-ImageNet: Linear(256, 256)


def test_resnet_stems():
    small, dim = build_backbone("resnet18", 1, (28, 28))
    conv1 = small.stem[0]
    assert dim == 512 and conv1.in_channels == 1 and conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(small.stem[3], nn.Identity)  # no max-pool
    big, _ = build_backbone("resnet18", 1, (96, 96))
    assert big.stem[0].kernel_size == (7, 7) and big.stem[0].in_channels == 1
    assert isinstance(big.stem[3], nn.MaxPool2d)
    assert build_backbone("resnet18", 3, (128, 128))[0].stem[0].in_channels == 3
    with torch.no_grad():
        assert big.eval()(torch.randn(1, 1, 96, 96)).shape == (1, 512)


def test_head_hidden_and_errors():
    net = EmbeddingNet("jule_cnn", 1, (16, 16), dim=8, head_hidden=64)
    assert [m.out_features for m in net.head.modules() if isinstance(m, nn.Linear)] == [64, 8]
    torch.testing.assert_close(net(torch.randn(4, 1, 16, 16)).norm(dim=1), torch.ones(4))
    with pytest.raises(ConfigError):
        EmbeddingNet("vgg", 1, (16, 16))
    with pytest.raises(ConfigError):
        EmbeddingNet("mlp", 1, (16, 16), dim=0)


@pytest.mark.parametrize("channels,size,expected", [
    (1, (8, 8), "jule_cnn"), (1, (16, 16), "jule_cnn"), (1, (28, 28), "jule_cnn"), (1, (32, 32), "jule_cnn"),
    (1, (128, 128), "jule_cnn"), (1, (224, 224), "resnet18"),
    (3, (16, 16), "jule_cnn"), (3, (32, 32), "resnet18"), (3, (96, 96), "resnet18"),
])
def test_default_backbone(channels, size, expected):
    assert default_backbone(channels, size) == expected
    assert expected in BACKBONES
