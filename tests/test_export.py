"""deepclust export: the per-image table (csv / parquet) and the backbone's weights."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli
from deepclust import export
from deepclust.nets import EmbeddingNet, build_backbone

FAST = ["--no-progress", "--batch-size", "64", "--seed", "1"]


def fit(out, data, *extra):
    proc = run_cli("fit", "--method", "instance", "--data", data, "--epochs", "1", "--out", str(out), *FAST, *extra)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, small_npz):
    return fit(tmp_path_factory.mktemp("export") / "run", f"npz:{small_npz}", "--backbone", "mlp")


def test_csv_holds_index_cluster_confidence_and_embedding(mlp_run, tmp_path):
    out = tmp_path / "c.csv"
    proc = run_cli("export", "--run", str(mlp_run), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"table": str(out)}
    rows = list(csv.reader(out.open(newline="")))
    emb, clusters = np.load(mlp_run / "embeddings.npy"), np.load(mlp_run / "labels.npy")
    assert rows[0][:3] == ["index", "cluster", "confidence"] and len(rows[0]) == 3 + emb.shape[1]
    body = rows[1:]
    assert [r[0] for r in body] == [str(i) for i in range(len(clusters))]
    assert [int(r[1]) for r in body] == clusters.tolist()
    assert np.allclose(np.array([r[3:] for r in body], float), emb, atol=1e-6)
    conf = np.array([float(r[2]) for r in body])
    assert np.allclose(conf, export.knn_confidence(emb, clusters), atol=1e-4) and conf.min() >= 0 and conf.max() <= 1


def test_parquet_holds_the_embedding_as_one_list_column(mlp_run, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "c.parquet"
    assert run_cli("export", "--run", str(mlp_run), "--format", "parquet", "--out", str(out)).returncode == 0
    table = pq.read_table(out)
    assert table.column_names == ["index", "cluster", "confidence", "embedding"]
    assert np.array_equal(np.stack(table["embedding"].to_numpy(zero_copy_only=False)), np.load(mlp_run / "embeddings.npy"))
    assert table["cluster"].to_numpy().tolist() == np.load(mlp_run / "labels.npy").tolist()


def test_knn_confidence_is_the_neighbourhood_vote_share():
    rng = np.random.default_rng(0)
    a = rng.normal([5, 0], 0.1, (20, 2))
    b = rng.normal([0, 5], 0.1, (20, 2))
    emb = np.vstack([a, b]).astype(np.float32)
    clusters = np.r_[np.zeros(20, int), np.ones(20, int)]
    clusters[0] = 1  # an image put in the wrong cluster: none of its 10 neighbours agree
    conf = export.knn_confidence(emb, clusters, k=10)
    assert conf[0] == 0 and np.all(conf[20:] == 1)
    assert np.all(conf[1:20] >= 0.9)  # at most one neighbour (image 0) disagrees


def test_folder_rows_are_named_by_file(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8)).save(folder / f"img_{i:02d}.png")
    run = fit(tmp_path / "run", f"folder:{folder}", "--backbone", "mlp", "--n-clusters", "2")
    out = tmp_path / "c.csv"
    assert run_cli("export", "--run", str(run), "--out", str(out)).returncode == 0
    names = [r[0] for r in list(csv.reader(out.open(newline="")))[1:]]
    assert sorted(names) == [f"img_{i:02d}.png" for i in range(24)]


def test_bad_input_is_one_line(tmp_path, mlp_run):
    assert_one_line_error(run_cli("export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "c.csv")),
                          "no such run")
    assert_one_line_error(run_cli("export", "--run", str(mlp_run), "--format", "xlsx"), "--format")
    assert_one_line_error(run_cli("export", "--run", str(mlp_run), "--out", str(tmp_path / "no" / "c.csv")),
                          "no such directory")


def eval_features(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_resnet_weights_load_into_torchvision(tmp_path, small_npz):
    """A resnet18 run's --weights load into torchvision.models.resnet18 (the CIFAR stem the metadata
    names for 8 px images); only torchvision's ImageNet classifier fc.* is missing, and the loaded
    model computes the run's backbone features."""
    torchvision = pytest.importorskip("torchvision")
    run = fit(tmp_path / "run", f"npz:{small_npz}", "--backbone", "resnet18")
    weights = tmp_path / "backbone.safetensors"
    proc = run_cli("export", "--run", str(run), "--out", str(tmp_path / "c.csv"), "--weights", str(weights))
    assert proc.returncode == 0, proc.stderr
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "torchvision" and "nn.Identity()" in meta["note"]
    model = torchvision.models.resnet18(weights=None)
    model.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)  # as meta["note"] says for 8 px grey images
    model.maxpool = torch.nn.Identity()
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    model.fc = torch.nn.Identity()
    net = EmbeddingNet("resnet18", 1, 8)
    net.load_state_dict(load_file(str(run / "model.safetensors")))
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(eval_features(model, x), eval_features(net.backbone, x), atol=1e-5)


def test_resnet_keys_on_the_imagenet_stem_load_strictly_but_for_fc():
    torchvision = pytest.importorskip("torchvision")
    net = EmbeddingNet("resnet18", 3, 72)
    state, meta = export.backbone_weights("resnet18", (3, 72, 72), False, net.state_dict())
    assert meta["format"] == "torchvision" and "then" not in meta["note"]  # no stem to change
    model = torchvision.models.resnet18(weights=None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_alexnet_weights_load_into_torchvision_with_batchnorm_folded():
    """The ImageNet-size AlexNet: torchvision's names and shapes; with BatchNorm statistics that are
    not the identity, the loaded torchvision model computes the same features in eval mode."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = EmbeddingNet("alexnet", 3, 224)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    state, meta = export.backbone_weights("alexnet", (3, 224, 224), False, net.state_dict())
    assert meta["format"] == "torchvision"
    model = torchvision.models.alexnet(weights=None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == ["classifier.6.bias", "classifier.6.weight"] and unexpected == []
    model.classifier[6] = torch.nn.Identity()
    x = torch.rand(2, 3, 224, 224)
    ours, theirs = eval_features(net.backbone, x), eval_features(model, x)
    assert torch.allclose(ours, theirs, atol=1e-4 * ours.abs().max().item())
    small = EmbeddingNet("alexnet", 3, 32)  # 3x3 convs: no torchvision layout
    assert export.backbone_weights("alexnet", (3, 32, 32), False, small.state_dict())[1]["format"] == "deepclust"


def test_other_backbones_keep_the_projects_own_state_dict(mlp_run, tmp_path):
    weights = tmp_path / "mlp.safetensors"
    proc = run_cli("export", "--run", str(mlp_run), "--out", str(tmp_path / "c.csv"), "--weights", str(weights))
    assert proc.returncode == 0 and "no torchvision model" in proc.stderr
    with safe_open(str(weights), "pt") as f:
        assert f.metadata()["format"] == "deepclust"
    backbone, _ = build_backbone("mlp", 1, 8)
    backbone.load_state_dict(load_file(str(weights)))  # strict: every key
