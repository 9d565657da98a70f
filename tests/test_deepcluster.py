"""DeepCluster as its paper has it: PCA-whitening to 256 only where that reduces, a label-free
smaller dimension for small networks, the Sobel filter on colour input, features before the ReLU."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from deepclust.configure import load_config
from deepclust.errors import ConfigError
from deepclust.nets import EmbeddingNet, Sobel
from deepclust.structure.preprocess import deepcluster_whiten, pca_whiten


def features(n, d, rank=None, seed=0):
    """Rows of a ``rank``-dimensional signal (variances 100, 99, ...) plus small isotropic noise."""
    rng = np.random.default_rng(seed)
    rank = rank or d
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    signal = rng.standard_normal((n, rank)) * np.sqrt(np.linspace(100, 50, rank))
    return (signal @ basis.T + 0.1 * rng.standard_normal((n, d))).astype(np.float32)


def test_whitening_reduces_only_when_the_features_have_more_than_the_target():
    assert deepcluster_whiten(features(600, 300), target=256).shape == (600, 256)  # D > 256: to 256
    assert pca_whiten(features(600, 160), 256)[0].shape == (600, 160)  # D <= 256: nothing to reduce
    # a small network (D = 160 <= 256): the leading components of 90% of the variance, the 20-d signal
    small = deepcluster_whiten(features(600, 160, rank=20), target=256, variance=0.9)
    assert 12 <= small.shape[1] <= 20
    assert np.allclose(np.linalg.norm(small, axis=1), 1, atol=1e-5)


def test_variance_share_picks_the_fewest_components():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 5)) * np.sqrt([10.0, 5, 3, 1, 1])  # shares .5 .75 .9 .95 1
    x = (x - x.mean(0)) / x.std(0) * np.sqrt([10.0, 5, 3, 1, 1])  # exact variances
    assert pca_whiten(x, 256, variance=0.89)[0].shape[1] == 3
    assert pca_whiten(x, 256, variance=0.91)[0].shape[1] == 4
    assert pca_whiten(x, 2, variance=0.91)[0].shape[1] == 2  # never more than dim
    with pytest.raises(ConfigError):
        pca_whiten(x, 4, variance=1.5)


def test_sobel_on_colour_equals_direct_convolution_of_the_grey_image():
    x = torch.rand(3, 3, 9, 11, dtype=torch.float64)
    out = Sobel(3).double()(x).numpy()
    gx = np.array([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
    for i in range(3):
        grey = x[i].numpy().mean(0)
        for c, kernel in enumerate((gx, gx.T)):  # F.conv2d is a correlation, zero padding 1
            direct = ndimage.correlate(grey, kernel, mode="constant", cval=0.0)
            np.testing.assert_allclose(out[i, c], direct, atol=1e-12)


def test_pre_relu_tap_is_the_backbone_output_before_its_last_relu():
    torch.manual_seed(0)
    net = EmbeddingNet("jule_cnn", 1, (16, 16), head=False).eval()
    taps = net.taps(torch.randn(8, 1, 16, 16), ("pre_relu", "backbone", "ip1"))
    assert (taps["pre_relu"] < 0).any()
    torch.testing.assert_close(torch.relu(taps["pre_relu"]), taps["backbone"])
    torch.testing.assert_close(taps["ip1"], taps["backbone"])
    res = EmbeddingNet("resnet18", 3, (8, 8), head=False).eval()  # no closing ReLU: the output itself
    t = res.taps(torch.randn(2, 3, 8, 8), ("pre_relu", "backbone"))
    torch.testing.assert_close(t["pre_relu"], t["backbone"])


def test_colour_presets_of_deepcluster_use_sobel():
    from deepclust.config import preset_path

    presets = [p.stem for p in preset_path("x").parent.glob("deepcluster-*.yaml")]
    colour = [name for name in presets if any(s in name for s in ("cifar", "stl", "svhn", "imagenet"))]
    assert colour
    for name in colour:
        cfg = load_config(name)
        assert cfg.net.sobel, name
        assert cfg.options.pca_dim == 256


@pytest.mark.parametrize("colour", [True, False])
def test_sobel_auto_is_on_for_colour_input_only(colour):
    from deepclust.configure import build_config
    from deepclust.data import ImageSet
    from deepclust.resolution import resolve

    rng = np.random.default_rng(0)
    shape = (40, 12, 12, 3) if colour else (40, 12, 12)
    images = ImageSet(rng.integers(0, 256, shape, dtype=np.uint8), spec="synthetic")
    layer = {"method": "deepcluster", "net": {"backbone": "mlp", "sobel": "auto"}, "train": {"epochs": 1},
             "cluster": {"n_clusters": 3}}
    cfg = resolve(build_config(layer), images)
    assert cfg.net.sobel is colour
    assert build_config({**layer, "net": {"backbone": "mlp"}}).net.sobel is False  # the default stays off
    assert load_config("deepcluster-cpu").net.sobel is None  # its CPU preset: auto


def test_discovery_clusters_the_pre_relu_features_whitened_to_their_variance():
    from sklearn.metrics import adjusted_rand_score

    from conftest import smoke_layer
    from deepclust.configure import build_config
    from deepclust.methods import DiscoveryContext, build_method
    from deepclust.methods.deepcluster import FEATURES

    n, d = 90, 24
    cfg = build_config(smoke_layer("deepcluster", "digits", "/nonexistent"), {"options": {"clusters": 3}})
    method = build_method(cfg, n, tap_dims={"backbone": d, "pre_relu": d, "embedding": d}, tap_shapes={},
                          shallow_layer="conv2")
    assert FEATURES.tap == "pre_relu" and method.discovery_features(0) == (FEATURES,)
    rng = np.random.default_rng(0)
    truth = np.arange(n) % 3
    x = 5.0 * np.eye(d)[truth] + 0.05 * rng.standard_normal((n, d))  # 3 blobs: 2 directions of variance
    ctx = DiscoveryContext(epoch=0, n_images=n, seed=0, device=torch.device("cpu"), bank=None,
                           passes={FEATURES: torch.tensor(x, dtype=torch.float32)}, images=None)
    s = method.discover(ctx)
    assert int(s["pca_dim"]) == 2  # 24 <= 256: the components of 90% of the variance, not all 24
    assert adjusted_rand_score(truth, s["labels"].numpy()) == 1.0
