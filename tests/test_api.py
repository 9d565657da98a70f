"""``deepclust.Clusterer``: the scikit-learn-style API on scikit-learn's digits, through the same
library path as the command line (configure.build_config -> runs.fit_run; the saved head)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone

import deepclust
from deepclust import Clusterer
from deepclust.api import as_image_set
from deepclust.data import load_images
from deepclust.errors import ConfigError, DataError
from deepclust.evaluate import cluster_acc

TINY = {"epochs": 10, "backbone": "mlp", "seed": 0, "progress": False}  # a few seconds on digits


@pytest.fixture(scope="module")
def digits():
    images = load_images("digits")
    order = np.random.default_rng(0).permutation(len(images))
    fit_rows, held_rows = np.sort(order[:1200]), np.sort(order[1200:])  # 597 held back
    return images.images[fit_rows], images.labels[fit_rows], images.images[held_rows], images.labels[held_rows]


@pytest.fixture(scope="module")
def fitted(digits, tmp_path_factory):
    x, _, _, _ = digits
    tmp = tmp_path_factory.mktemp("cwd")
    before = set(os.listdir(tmp))
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        est = Clusterer(method="instance", n_clusters=10, **TINY)
        assert est.fit(x) is est  # fit returns self
    finally:
        os.chdir(cwd)
    assert set(os.listdir(tmp)) == before  # nothing written where it ran (no runs/ directory)
    return est


def test_exported_and_params():
    assert deepclust.Clusterer is Clusterer
    est = Clusterer(method="pad", n_clusters=5, epochs=2, lr=0.1)
    given = {k: v for k, v in est.get_params().items() if v is not None}  # every parameter, None: not given
    assert given == {"method": "pad", "n_clusters": 5, "epochs": 2, "lr": 0.1}
    assert repr(est) == "Clusterer(epochs=2, lr=0.1, method='pad', n_clusters=5)"
    est.set_params(n_clusters=7, budget="30s")
    assert est.get_params()["n_clusters"] == 7 and est.get_params()["budget"] == "30s"
    twin = clone(est)
    assert twin.get_params() == est.get_params() and twin is not est
    assert not hasattr(est, "labels_")  # __init__ only stores


def test_options_go_through_the_one_validator():
    cfg = Clusterer(method="and", n_clusters="auto", epochs=2, backbone="mlp", rounds=2,
                    settings={"optim.weight_decay": 1e-4}).configuration("digits")
    assert (cfg.method, cfg.train.epochs, cfg.net.backbone, cfg.options.rounds) == ("and", 2, "mlp", 2)
    assert cfg.optim.weight_decay == 1e-4 and cfg.cluster.n_clusters is None and cfg.data.spec == "digits"
    preset = Clusterer(config="dccm-cifar10", epochs=1).configuration()
    assert (preset.method, preset.cluster.n_clusters, preset.train.epochs) == ("dccm", 10, 1)  # its K kept
    assert Clusterer(config="dccm-cifar10", n_clusters="auto").configuration().cluster.n_clusters is None
    with pytest.raises(ConfigError, match="epochs"):
        Clusterer(epochs=-1).configuration()
    with pytest.raises(TypeError, match="predict"):  # explicit parameters: a name is one of them or refused
        Clusterer(predict=1)
    with pytest.raises(ConfigError, match="unknown option options.no_such_option"):
        Clusterer(method="instance", settings={"options.no_such_option": 1})


def test_fitted_attributes(fitted, digits):
    x = digits[0]
    assert fitted.labels_.shape == (len(x),) and fitted.n_clusters_ == 10
    assert fitted.embedding_.shape == (len(x), fitted.config_.net.dim)
    assert np.allclose(np.linalg.norm(fitted.embedding_, axis=1), 1, atol=1e-4)
    assert fitted.metrics_["n_images"] == len(x) and fitted.metrics_["method"] == "instance"
    assert fitted.labels_.max() < 10


def test_predict_transform_score(fitted, digits):
    x, y, held_x, held_y = digits
    same = fitted.predict(x)
    assert (same == fitted.labels_).mean() >= 0.95
    emb = fitted.transform(x)
    assert np.allclose(emb, fitted.embedding_, atol=1e-4)
    fit_acc, held_acc = cluster_acc(y, fitted.labels_), fitted.score(held_x, held_y)
    assert fit_acc > 0.7  # it learnt something (k-means of the pixels: about 0.67 on digits)
    assert abs(held_acc - fit_acc) <= 0.03, (fit_acc, held_acc)
    s = fitted.scores(held_x, held_y)
    assert set(s) >= {"acc", "nmi", "ari"} and s["acc"] == held_acc


def test_fit_predict_equals_labels_and_y_only_scores(digits):
    x, y = digits[0][:300], digits[1][:300]
    est = Clusterer(method="instance", n_clusters=4, epochs=1, backbone="mlp", seed=1, progress=False)
    labels = est.fit_predict(x)
    assert np.array_equal(labels, est.labels_) and labels.max() < 4 and "acc" not in est.metrics_
    with_y = clone(est).fit(x, np.random.default_rng(0).permutation(y))  # labels never steer
    assert np.array_equal(with_y.labels_, labels) and np.allclose(with_y.embedding_, est.embedding_)
    assert "acc" in with_y.metrics_
    with pytest.raises(DataError, match="labels"):
        clone(est).fit(x, y[:10])


def test_save_load_round_trip(fitted, digits, tmp_path):
    held = digits[2]
    out = fitted.save(tmp_path / "run")
    for name in ("metrics.json", "model.safetensors", "head.npz", "config.yaml", "checkpoints/last.pt"):
        assert (out / name).exists(), name  # the whole run directory, as deepclust fit writes it
    back = Clusterer.load(out)
    assert np.array_equal(back.predict(held), fitted.predict(held))
    assert np.array_equal(back.labels_, fitted.labels_)
    with pytest.raises(DataError, match="not empty"):
        fitted.save(out)
    fitted.save(out, overwrite=True)  # replaced whole, only once complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no rebuild or backup left beside it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("x")
    with pytest.raises(DataError, match="thesis.txt"):  # overwrite replaces a run, never a user's folder
        fitted.save(mine, overwrite=True)
    assert (mine / "thesis.txt").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]
    # the command line reads the saved run
    from conftest import run_cli

    np.savez(tmp_path / "held.npz", images=held)
    r = run_cli("predict", "--run", str(out), "--data", f"npz:{tmp_path / 'held.npz'}", "--out",
                str(tmp_path / "p.npy"))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "p.npy"), fitted.predict(held))


def test_every_input_form_gives_the_same_clusters(fitted, digits, tmp_path):
    x = digits[2][:40]
    ref = fitted.predict(x)
    assert np.array_equal(fitted.predict(torch.from_numpy(x)), ref)
    assert np.array_equal(fitted.predict(x[:, None]), ref)  # (N, C, H, W)
    assert np.array_equal(fitted.predict(x[..., None]), ref)  # (N, H, W, C)
    assert np.array_equal(fitted.predict(x.astype(np.float32) / 255.0), ref)  # floats in [0, 1]
    from PIL import Image

    paths = []
    for i, im in enumerate(x):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im).save(paths[-1])
    assert np.array_equal(fitted.predict(paths), ref)
    np.savez(tmp_path / "x.npz", images=x)
    assert np.array_equal(fitted.predict(f"npz:{tmp_path / 'x.npz'}"), ref)


def test_recut_reads_other_levels_off_the_fitted_tree(fitted, tmp_path):
    """recut(k): the fitted clusters at k without training; the estimator itself is not changed."""
    labels, k = fitted.labels_.copy(), fitted.n_clusters_
    assert np.array_equal(fitted.recut(k), labels) and fitted.hierarchy_.n_clusters == len(np.unique(labels))
    coarse, fine = fitted.recut(3), fitted.recut(2 * k)
    assert len(np.unique(coarse)) == 3 and len(np.unique(fine)) == 2 * k
    for finer, coarser in ((labels, coarse), (fine, labels)):  # unions below K, parts above it
        assert all(len(np.unique(coarser[finer == c])) == 1 for c in np.unique(finer))
    assert np.array_equal(fitted.labels_, labels) and fitted.n_clusters_ == k
    back = Clusterer.load(fitted.save(tmp_path / "run"))  # the tree travels with the run
    assert np.array_equal(back.recut(3), coarse)
    with pytest.raises(ConfigError, match="1 to"):
        fitted.recut(0)
    with pytest.raises(ConfigError, match="whole number"):
        fitted.recut("3")
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        Clusterer().recut(3)


def test_bad_input_is_one_line(fitted):
    with pytest.raises(DataError, match="shape"):
        as_image_set(np.zeros((3, 8, 8, 5), np.uint8))
    with pytest.raises(DataError, match=r"\[0, 1\] or \[0, 255\]"):
        as_image_set(np.full((3, 8, 8), -2.0))
    with pytest.raises(DataError, match="cannot read image"):
        as_image_set(["/no/such/file.png"])
    with pytest.raises(DataError, match="8x8"):
        fitted.predict(np.zeros((2, 16, 16), np.uint8))
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        Clusterer().predict(np.zeros((2, 8, 8), np.uint8))


# scikit-learn's own checks that apply to an image estimator. Skipped: every check that fits on
# tabular data (2-D float X of a few features: check_clustering, check_fit2d_*, check_estimators_dtypes,
# check_fit_idempotent, check_methods_*_invariance, check_n_features_in, ...): images are (N,H,W[,C])
# arrays and a deep fit per check would take minutes; the image equivalents are the tests above.
# Also skipped: check_do_not_raise_errors_in_init_or_set_params. Clusterer(...) and set_params refuse
# a wrong option as fit would (the one validator), so an invalid estimator cannot be made or cloned;
# check_set_params accepts that (it warns, and checks that a refused set_params changed nothing).
SKLEARN_CHECKS = ("check_estimator_cloneable", "check_estimator_repr", "check_no_attributes_set_in_init",
                  "check_get_params_invariance", "check_set_params", "check_parameters_default_constructible",
                  "check_mixin_order", "check_estimator_tags_renamed", "check_valid_tag_types",
                  "check_estimators_unfitted", "check_transformers_unfitted")


@pytest.mark.filterwarnings("ignore:.*occurred during set_params:UserWarning")
@pytest.mark.parametrize("check", SKLEARN_CHECKS)
def test_sklearn_checks_that_apply_to_images(check):
    import sklearn.utils.estimator_checks as checks

    fn = getattr(checks, check)
    # options given (each an explicit parameter, settings a dict), so the checks see them stored as-is
    fn("Clusterer", Clusterer(method="instance", n_clusters=3, epochs=2, settings={"optim.weight_decay": 1e-4}))


def test_fit_on_a_data_spec_uses_its_labels_for_scores_only(digits, tmp_path):
    x, y = digits[0][:200], digits[1][:200]
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    est = Clusterer(method="instance", n_clusters=3, epochs=1, backbone="mlp", progress=False)
    est.fit(f"npz:{tmp_path / 'd.npz'}")
    assert est.labels_.shape == (200,) and est.n_clusters_ == 3 and "acc" in est.metrics_
    assert est.config_.data.spec == f"npz:{tmp_path / 'd.npz'}"
    with pytest.raises(DataError, match="own labels"):
        est.fit(f"npz:{tmp_path / 'd.npz'}", y)
