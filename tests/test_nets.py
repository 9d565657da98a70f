"""Backbones and the embedding network: every backbone at every supported input, paper architectures."""

import copy

import pytest
import torch
import torch.nn as nn
from torch import Tensor

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
    assert net.layer_names() == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2", "pre_relu", "backbone", "embedding"]
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


def test_jule_cnn_ip1_linear_is_the_papers_and_keeps_the_linear_keys():
    """JULE Table 9 (ip1 -> l2-norm; the authors' models: nn.Linear -> nn.Normalize(2)): ``ip1="linear"``
    is Linear alone, whose embedding may leave the non-negative orthant; ``bn_relu`` (the default of the
    backbone) is Linear -> BN -> ReLU, whose embedding never does. The Linear's keys are the same."""
    paper, _ = build_backbone("jule_cnn", 1, (16, 16), ip1="linear")
    ours, _ = build_backbone("jule_cnn", 1, (16, 16))
    assert [type(m) for m in paper.ip1] == [nn.Flatten, nn.Linear]
    assert [type(m) for m in ours.ip1] == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert set(paper.state_dict()) < set(ours.state_dict())  # ours adds ip1.2 (the BN) only
    assert {k for k in set(ours.state_dict()) - set(paper.state_dict())} == {
        k for k in ours.state_dict() if k.startswith("ip1.2.")}
    x = torch.randn(64, 1, 16, 16)
    for ip1, negative in (("linear", True), ("bn_relu", False)):
        net = EmbeddingNet("jule_cnn", 1, 16, head=False, backbone_options={"ip1": ip1})
        emb = net(x)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(64))  # the L2 of Table 9 in both
        assert bool((emb < 0).any()) == negative  # with BN -> ReLU every cosine is >= 0
        if not negative:
            assert bool(((emb @ emb.T) >= 0).all())
    with pytest.raises(ConfigError, match="ip1"):
        build_backbone("jule_cnn", 1, (16, 16), ip1="relu")
    assert build_backbone("mlp", 1, (8, 8), ip1="linear")[1] == 256  # no ip1: the keyword changes nothing


@pytest.mark.parametrize("ip1", ["linear", "bn_relu"])
def test_exported_jule_cnn_loads_as_the_note_says(ip1):
    """``deepclust export --weights`` of a JULE run: the metadata's call builds a backbone that loads
    the file's tensors, whichever ip1 the run had."""
    from deepclust import export, nets

    net = EmbeddingNet("jule_cnn", 1, 16, head=False, backbone_options={"ip1": ip1})
    tensors, meta = export.backbone_weights("jule_cnn", (1, 16, 16), False, net.state_dict())
    call = meta["note"].split("deepclust.nets.")[1].split("[0]")[0]
    backbone = eval(call, {"build_backbone": nets.build_backbone})[0]  # noqa: S307 (our own note)
    backbone.load_state_dict(tensors)  # strict: every key, no more


def test_dccm_cnn_table4():
    net, dim = build_backbone("dccm_cnn", 3, (32, 32))
    assert dim == 64 and net.shallow_layer == "pool1"  # the authors' S: conv2's map after its max-pool
    assert net.features_at(torch.randn(2, 3, 32, 32), "pool1", flatten=False).shape == (2, 64, 14, 14)
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


# -- BatchNorm over processes (DDP) ----------------------------------------------------------------

def _randomise_batchnorm(net: nn.Module, seed: int = 1) -> None:
    """Non-trivial affine parameters and running statistics, so copying and updating them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


BN_CASES = [(nn.BatchNorm2d, (6, 3, 5, 4)), (nn.BatchNorm1d, (6, 3)), (nn.BatchNorm1d, (6, 3, 7))]


@pytest.mark.parametrize("kind,shape", BN_CASES, ids=["2d", "1d", "1d-seq"])
@pytest.mark.parametrize("momentum,affine,track", [(0.1, True, True), (None, True, True), (0.3, False, True),
                                                   (0.1, True, False)])
def test_global_batchnorm_is_batchnorm_bit_for_bit_in_one_process(kind, shape, momentum, affine, track):
    from deepclust.nets import GlobalBatchNorm, sync_batchnorm

    ref = kind(3, eps=1e-4, momentum=momentum, affine=affine, track_running_stats=track)
    _randomise_batchnorm(ref)
    glob = sync_batchnorm(copy.deepcopy(ref))
    assert type(glob) is GlobalBatchNorm and (glob.eps, glob.momentum, glob.affine) == (1e-4, momentum, affine)
    for step in range(3):
        x = (3 * torch.randn(shape) + 2).requires_grad_()
        xg = x.detach().clone().requires_grad_()
        up = torch.randn(shape)
        y, yg = ref(x), glob(xg)
        assert torch.equal(y, yg)
        (y * up).sum().backward()
        (yg * up).sum().backward()
        assert torch.equal(x.grad, xg.grad)
        for (name, p), pg in zip(ref.named_parameters(), glob.parameters()):
            assert torch.equal(p.grad, pg.grad), name
        for (name, b), bg in zip(ref.named_buffers(), glob.buffers()):
            assert torch.equal(b, bg), (step, name)
    ref.eval(), glob.eval()
    x = torch.randn(shape)
    assert torch.equal(ref(x), glob(x))


def test_sync_batchnorm_converts_every_backbone_and_keeps_state():
    from deepclust.nets import GlobalBatchNorm, sync_batchnorm

    for name, shape in [("jule_cnn", (1, 28, 28)), ("dccm_cnn", (3, 32, 32)), ("alexnet", (3, 32, 32)),
                        ("resnet18", (3, 8, 8))]:
        net = EmbeddingNet(name, shape[0], shape[1:], dim=8)
        _randomise_batchnorm(net)
        n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        params, state = list(net.parameters()), copy.deepcopy(net.state_dict())
        net.eval()
        out = sync_batchnorm(net)
        assert out is net and not net.training  # converted in place, mode kept
        assert sum(type(m) is GlobalBatchNorm for m in net.modules()) == n_bn > 0
        assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in net.modules())
        assert all(a is b for a, b in zip(params, net.parameters())) and len(params) == len(list(net.parameters()))
        assert net.state_dict().keys() == state.keys()  # checkpoints load into either form
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    cuda = sync_batchnorm(EmbeddingNet("jule_cnn", 1, 16), device="cuda")  # conversion only, no GPU needed
    assert any(isinstance(m, nn.SyncBatchNorm) for m in cuda.modules())
    assert not any(type(m) is GlobalBatchNorm for m in cuda.modules())


def _small_bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
                         nn.BatchNorm1d(5, momentum=None))


DDP_NETS = {  # name -> (constructor, input shape, global batch, rank 0's share)
    "small": (_small_bn_net, (2, 6, 6), 10, 3),  # uneven split: 3 + 7
    "jule_cnn": (lambda: EmbeddingNet("jule_cnn", 1, 28, dim=16), (1, 28, 28), 8, 4),
    "resnet18": (lambda: EmbeddingNet("resnet18", 3, 8, dim=16), (3, 8, 8), 8, 4),
}


def _ddp_step(net: nn.Module, x: Tensor, up: Tensor, x2: Tensor, scale: float) -> dict:
    """One training forward/backward of sum(out * up) * scale, a second training forward (running
    statistics again), an eval forward; everything a run depends on."""
    x = x.clone().requires_grad_()
    out = net(x)
    (scale * (out * up).sum()).backward()
    with torch.no_grad():
        net(x2)
        net.eval()
        evaluated = net(x.detach())
        net.train()
    module = getattr(net, "module", net)
    return {"out": out.detach(), "x_grad": x.grad, "eval": evaluated,
            "grads": {k: p.grad for k, p in module.named_parameters()},
            "buffers": {k: b.clone() for k, b in module.named_buffers()}}


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from deepclust.nets import sync_batchnorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        cases, results = torch.load(f"{tmp}/cases.pt"), {}
        for dtype in (torch.float64, torch.float32):
            for name, (make, _, _, share) in DDP_NETS.items():
                c = {k: v.to(dtype) for k, v in cases[name].items() if k != "state"}
                net = make().to(dtype)
                net.load_state_dict(cases[name]["state"])
                ddp = DistributedDataParallel(sync_batchnorm(net))
                part = slice(0, share) if rank == 0 else slice(share, None)
                # DDP averages gradients over ranks: scale by the world size to get the sum over ranks
                results[name, str(dtype)] = _ddp_step(ddp, c["x"][part], c["up"][part], c["x2"][part], float(world))
        torch.save(results, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_global_batchnorm_equals_one_process(tmp_path):
    """Two gloo processes, each with part of the batch, through conv/linear + BatchNorm nets and the
    real jule_cnn and resnet18 backbones wrapped in DDP: outputs, input and parameter gradients,
    running statistics and eval outputs equal one process with nn.BatchNorm on the whole batch.

    The reference is computed in float64: in float64 the two runs agree to 1e-9 (the same function);
    in float32 they agree up to rounding amplified through the layers (float32 nn.BatchNorm in one
    process is itself up to 1e-2 off float64 in resnet18's input gradients here)."""
    import torch.multiprocessing as mp

    cases, expected = {}, {}
    for name, (make, shape, batch, _) in DDP_NETS.items():
        net = make().double()
        _randomise_batchnorm(net)
        with torch.no_grad():
            out_shape = net.eval()(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:]
        net.train()
        c = {"state": copy.deepcopy(net.state_dict()), "x": 2 * torch.randn(batch, *shape).double() + 1,
             "x2": torch.randn(batch, *shape).double(), "up": torch.randn(batch, *out_shape).double()}
        cases[name], expected[name] = c, _ddp_step(net, c["x"], c["up"], c["x2"], 1.0)
    torch.save(cases, tmp_path / "cases.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for dtype, close in [(torch.float64, dict(atol=1e-9, rtol=1e-7)), (torch.float32, dict(atol=1e-4, rtol=1e-3))]:
        for name in DDP_NETS:
            want, got = expected[name], [r[name, str(dtype)] for r in ranks]
            for key in ("out", "x_grad", "eval"):
                scale = 2.0 if key == "x_grad" else 1.0  # each rank's loss was scaled by the world size
                torch.testing.assert_close(torch.cat([g[key] for g in got]).double() / scale, want[key], **close,
                                           msg=lambda m: f"{dtype} {name} {key}: {m}")
            for g in got:
                for key in ("grads", "buffers"):
                    assert g[key].keys() == want[key].keys()
                    for k, v in want[key].items():
                        torch.testing.assert_close(g[key][k].to(v.dtype), v, **close,
                                                   msg=lambda m: f"{dtype} {name} {k}: {m}")
