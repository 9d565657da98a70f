"""DCCM (Wu et al., ICCV 2019): the pseudo-graph and pseudo-label thresholds (Eq 2, 7-8), the pairs of
the triplet mutual information (Table 6), each loss term against an independent computation (Eq 3,
9, 14), the MI estimate learning to tell true (deep, shallow) pairs from shuffled ones, and the
head's argmax as the method's clusters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import smoke_layer

from deepclust.configure import build_config
from deepclust.losses.dccm import LocalDiscriminator, graph_loss, label_loss, mi_loss
from deepclust.runs import fit_run
from deepclust.structure.pseudo_graph import (
    bcubed,
    mi_pairs,
    prediction_similarity,
    pseudo_graph,
    pseudo_labels,
)


def _cos(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_pseudo_graph_thresholds_cosine_of_predictions_at_thres1():
    p = torch.tensor([[0.90, 0.05, 0.05], [0.85, 0.10, 0.05], [0.10, 0.80, 0.10], [0.34, 0.33, 0.33]])
    s = prediction_similarity(p)
    expected = np.array([[_cos(a, b) for b in p.numpy()] for a in p.numpy()])
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-6)
    w = pseudo_graph(s, 0.95)
    assert w.dtype == torch.bool and bool(w.diagonal().all())
    assert w.numpy().tolist() == (expected >= 0.95).tolist()
    assert bool(w[0, 1]) and not bool(w[0, 2]) and not bool(w[0, 3])


def test_thresholds_are_float32_under_bf16_autocast():
    """A cosine of 0.9498 (< 0.95) and top probabilities 0.9002 / 0.8998 either side of 0.9: in bf16
    the first would round to 0.9492 or 0.9531 and the two probabilities to the same number."""
    a = torch.tensor([[1.0, 0.0]])
    angle = math.acos(0.9498)
    b = torch.tensor([[math.cos(angle), math.sin(angle)]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = prediction_similarity(torch.cat([a, b]))
        w = pseudo_graph(s, 0.95)
        y, v = pseudo_labels(torch.tensor([[0.9002, 0.0998], [0.8998, 0.1002]]), 0.9)
    assert s.dtype == torch.float32 and abs(float(s[0, 1]) - 0.9498) < 1e-6
    assert not bool(w[0, 1])
    assert y.tolist() == [0, 0] and v.tolist() == [True, False]


def test_pseudo_labels_keep_only_confident_argmax():
    p = torch.tensor([[0.95, 0.05], [0.40, 0.60], [0.05, 0.95], [0.90, 0.10]])
    y, v = pseudo_labels(p, 0.9)
    assert y.tolist() == [0, 1, 1, 0]
    assert v.tolist() == [True, False, True, True]  # 0.90 >= thres_2 counts (Eq 8)


def test_graph_loss_is_the_pairwise_binary_cross_entropy():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 5, generator=g) * 0.98 + 0.01
    w = torch.rand(3, 5, generator=g) > 0.5
    got = graph_loss(s, w)
    expected = [np.mean([-math.log(s[i, j]) if w[i, j] else -math.log(1 - s[i, j]) for j in range(5)])
                for i in range(3)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    torch.testing.assert_close(got.mean(), F.binary_cross_entropy(s, w.float()))  # the authors' nn.BCELoss


def test_label_loss_is_cross_entropy_of_confident_rows_only():
    p = torch.softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]]), dim=1)
    y = torch.tensor([0, 1, 2])
    v = torch.tensor([True, False, True])
    got = label_loss(p, y, v)
    assert got[1] == 0
    np.testing.assert_allclose(got[[0, 2]].numpy(), [-math.log(p[0, 0]), -math.log(p[2, 2])], rtol=1e-6)


def test_mi_loss_is_the_jensen_shannon_estimate_per_row():
    torch.manual_seed(0)
    disc = LocalDiscriminator(3, 4, width=8)
    deep, shallow = torch.randn(2, 4), torch.randn(5, 3, 2, 2)
    positives = torch.tensor([[0, 3], [1, -1]])
    negatives = torch.tensor([[2, 4], [-1, -1]])
    got = mi_loss(disc, deep, shallow, positives, negatives)

    def t(i, j):  # T(d_i, s_j): the discriminator on the concatenation, one score per position
        x = torch.cat([shallow[j], deep[i][:, None, None].expand(-1, 2, 2)])[None]
        return disc.net(x).flatten()

    sp = F.softplus
    row0 = (sp(-t(0, 0)).mean() + sp(-t(0, 3)).mean()) / 2 + (sp(t(0, 2)).mean() + sp(t(0, 4)).mean()) / 2
    row1 = sp(-t(1, 1)).mean()  # no partner, no negative: its own pair only
    torch.testing.assert_close(got, torch.stack([row0, row1]).detach(), rtol=1e-5, atol=1e-6)


def test_factorised_discriminator_equals_the_plain_one_with_its_gradients():
    """mi_loss projects each shallow map and each deep row once (the first 1x1 convolution split over
    [s, d]); the loss and every gradient equal scoring each pair's concatenation with ``forward``."""
    torch.manual_seed(1)
    disc = LocalDiscriminator(5, 7, width=16)
    deep = torch.randn(4, 7, requires_grad=True)
    shallow = torch.randn(6, 5, 3, 3, requires_grad=True)
    positives = torch.tensor([[0, 2], [1, -1], [2, 5], [3, 0]])
    negatives = torch.tensor([[4, 5], [-1, -1], [0, -1], [1, 2]])

    def plain():
        terms = []
        for i in range(4):
            term = deep.new_zeros(())
            for partners, sign in ((positives[i], -1.0), (negatives[i], 1.0)):
                js = [int(j) for j in partners if j >= 0]
                if js:
                    scores = disc(deep[i].expand(len(js), -1), shallow[js])
                    term = term + F.softplus(sign * scores).flatten(1).mean(1).mean()
            terms.append(term)
        return torch.stack(terms)

    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])  # every row's term reaches the gradient distinctly
    got_loss = mi_loss(disc, deep, shallow, positives, negatives)
    got = torch.autograd.grad((got_loss * weights).sum(), [deep, shallow, *disc.parameters()])
    want_loss = plain()
    want = torch.autograd.grad((want_loss * weights).sum(), [deep, shallow, *disc.parameters()])
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def _pair_scores_case(seed: int = 2, width: int = 16):
    torch.manual_seed(seed)
    disc = LocalDiscriminator(5, 7, width=width)
    deep = torch.randn(4, 7, requires_grad=True)
    shallow = torch.randn(6, 5, 3, 3, requires_grad=True)
    positives = torch.tensor([[0, 2], [1, 3], [2, 5], [3, 0]])
    negatives = torch.tensor([[4, 5], [0, 2], [0, 1], [1, 2]])
    return disc, deep, shallow, positives, negatives


def test_the_pair_scores_backward_can_run_twice_and_a_clobbered_one_fails_loudly():
    """PairScores keeps its intermediates in buffers reused from step to step: a retained graph gives
    the same gradients twice (the backward writes nothing it saved), and a second forward before the
    first's backward makes that backward fail autograd's version check instead of giving a gradient
    of the second batch's intermediates."""
    disc, deep, shallow, positives, negatives = _pair_scores_case()
    params = [deep, shallow, *disc.parameters()]
    loss = mi_loss(disc, deep, shallow, positives, negatives).sum()
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    stale = mi_loss(disc, deep, shallow, positives, negatives).sum()
    mi_loss(disc, deep, shallow.detach() * 2, positives, negatives).sum()  # the same buffers, written again
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(stale, params)


def test_the_pair_scores_reuse_their_buffers_from_step_to_step():
    """The buffers are made once for the most pairs a batch can have: a later batch with fewer valid
    pairs (-1 entries) writes into the same memory (a fresh allocation of that size is new pages from
    the system every step, which costs about as much as the arithmetic on them)."""
    disc, deep, shallow, positives, negatives = _pair_scores_case()
    mi_loss(disc, deep, shallow, positives, negatives).sum().backward()
    before = {k: v.data_ptr() for k, v in disc.workspace.buffers.items()}
    assert set(before) == {"h1", "h2", "grad_h1", "grad_h2"}
    fewer = negatives.clone()
    fewer[1] = -1
    mi_loss(disc, deep, shallow, positives, fewer).sum().backward()
    assert {k: v.data_ptr() for k, v in disc.workspace.buffers.items()} == before


def test_the_pair_scores_follow_autocast_in_bf16():
    """Under bf16 autocast the pairs are scored in bf16, as the convolutions they replace would be:
    the terms stay within bf16's rounding of the float32 ones (8 bits of mantissa: 2^-8 relative per
    operation, a few of them in a row), and every gradient comes back in its parameter's dtype."""
    disc, deep, shallow, positives, negatives = _pair_scores_case(width=32)
    want = mi_loss(disc, deep, shallow, positives, negatives)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mi_loss(disc, deep, shallow, positives, negatives)
    torch.testing.assert_close(got, want.detach(), rtol=0.05, atol=0.02)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in [deep, shallow, *disc.parameters()])


def test_mi_estimate_tells_true_pairs_from_shuffled_ones_after_a_few_steps():
    """Deep features that carry the shallow map's information: the discriminator learns to score
    true pairs above shuffled ones, so -loss (the MI estimate) of true pairs rises above its value
    for shuffled deep/shallow pairs."""
    g = torch.Generator().manual_seed(3)
    shallow = torch.randn(64, 4, 3, 3, generator=g)
    deep = shallow.mean(dim=(2, 3)) @ torch.randn(4, 6, generator=g)
    own = torch.arange(64)[:, None]
    negatives = torch.stack([(torch.arange(64) + k) % 64 for k in (7, 19)], dim=1)
    torch.manual_seed(0)
    disc = LocalDiscriminator(4, 6, width=32)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)

    def estimate(d):
        with torch.no_grad():
            return -float(mi_loss(disc, d, shallow, own, negatives).mean())

    shuffled = deep[torch.randperm(64, generator=g)]
    before = estimate(deep)
    for _ in range(200):
        opt.zero_grad()
        mi_loss(disc, deep, shallow, own, negatives).mean().backward()
        opt.step()
    assert estimate(deep) > before + 0.3
    assert estimate(deep) > estimate(shuffled) + 0.3


def _graph(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_pair_strategies_follow_table6():
    graph = _graph([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]])
    sim = torch.tensor([[1.0, 0.96, 0.99, 0.1, 0.5], [0.96, 1, 0.2, 0.3, 0.4], [0.99, 0.2, 1, 0.6, 0.7],
                        [0.1, 0.3, 0.6, 1, 0.2], [0.5, 0.4, 0.7, 0.2, 1]])
    pos = torch.arange(5)
    v1 = mi_pairs(graph, sim, pos, torch.Generator().manual_seed(0), "nearest-random", 2)
    assert v1.positive.tolist() == [2, 0, 0, -1, -1]  # the most similar neighbour; none for 3 and 4
    for i, row in enumerate(v1.negatives.tolist()):
        assert len(set(row)) == 2 and all(not graph[i, j] and j != i for j in row)
    v2 = mi_pairs(graph, sim, pos, torch.Generator().manual_seed(0), "nearest-farthest", 1)
    assert v2.negatives[:, 0].tolist() == [3, 2, 1, 0, 3]  # the least similar non-neighbour
    v3 = mi_pairs(graph, sim, pos, torch.Generator().manual_seed(0), "random-random", 1)
    assert v3.positive[0].item() in (1, 2) and v3.positive[3].item() == -1
    v4 = mi_pairs(graph, sim, pos, torch.Generator().manual_seed(0), "topn-random", 1)
    assert v4.positive.tolist() == [2, 0, 0, -1, -1]  # the B most similar pairs (both there are); 0 keeps its best
    lonely = mi_pairs(torch.ones(3, 3, dtype=torch.bool), torch.ones(3, 3), torch.arange(3),
                      torch.Generator().manual_seed(0), "nearest-random", 2)
    assert (lonely.negatives == -1).all()  # no non-neighbour: no negative term


def test_pairs_of_a_slice_are_the_slice_of_the_global_pairs():
    """Every process draws the global choice and keeps its rows: a slice equals the whole."""
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(12, 3, generator=g) * 3, dim=1)
    sim = prediction_similarity(p)
    graph = pseudo_graph(sim, 0.95)
    whole = mi_pairs(graph, sim, torch.arange(12), torch.Generator().manual_seed(9), "nearest-random", 2)
    part = mi_pairs(graph, sim, torch.arange(6, 12), torch.Generator().manual_seed(9), "nearest-random", 2)
    assert torch.equal(part.positive, whole.positive[6:]) and torch.equal(part.negatives, whole.negatives[6:])


def test_bcubed_of_a_known_graph():
    labels = torch.tensor([0, 0, 1, 1])
    graph = _graph([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]])
    precision, recall = bcubed(graph, labels)
    assert precision == pytest.approx((2 / 3 + 1 + 1 / 2 + 1) / 4)
    assert recall == pytest.approx((1 + 1 + 1 / 2 + 1 / 2) / 4)


def test_the_heads_argmax_is_the_methods_clusters_and_the_log_describes_it(tmp_path, small_npz):
    out = tmp_path / "run"
    metrics = fit_run(build_config(smoke_layer("dccm", f"npz:{small_npz}", out, cluster={"n_clusters": 10})))
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    probs = state["methods"]["dccm"]["structure"]["probabilities"]  # the last epoch-start pass of the head
    assert probs.shape == (300, 10) and torch.allclose(probs.sum(1), torch.ones(300), atol=1e-5)
    assert metrics["cluster_head"] == "method"
    labels = np.load(out / "labels.npy")
    assert labels.max() < 10 and len(labels) == 300
    method_row = next(h for h in metrics["heads"] if h["head"] == "method")
    assert method_row["acc"] == metrics["acc"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for key in ("confident_fraction", "max_probability_hist", "head_acc", "bcubed_precision", "bcubed_recall"):
        assert key in log[-1], key
    assert sum(log[-1]["max_probability_hist"]) == pytest.approx(1.0, abs=1e-3)


def test_ablation_options_switch_the_terms(tmp_path, small_npz):
    """M1 (the pseudo-graph alone) trains one view; a run with MI off has no discriminator."""
    from deepclust.methods import build_method

    for options, views, disc in (({"local_robustness": False, "pseudo_labels": False, "mutual_information": False},
                                  1, False), ({"mutual_information": False}, 2, False), ({}, 2, True)):
        cfg = build_config(smoke_layer("dccm", f"npz:{small_npz}", tmp_path / "x", options=options))
        m = build_method(cfg, 300, tap_dims={"backbone": 64, "conv2": 4096},
                         tap_shapes={"backbone": (64,), "conv2": (64, 8, 8)}, shallow_layer="conv2")
        assert m.views_at(0) == views and ("discriminator" in m.modules) == disc


def test_the_assignment_map_is_the_heads_argmax_in_eval_mode(small_npz, tmp_path):
    from deepclust.methods import build_method

    cfg = build_config(smoke_layer("dccm", f"npz:{small_npz}", tmp_path / "x"))
    m = build_method(cfg, 300, tap_dims={"backbone": 64, "conv2": 4096},
                     tap_shapes={"backbone": (64,), "conv2": (64, 8, 8)}, shallow_layer="conv2")
    head = m.modules["head"]
    with torch.no_grad():  # statistics and affine parameters away from their initial values
        head[1].running_mean.normal_(0, 0.3), head[1].running_var.uniform_(0.5, 2.0)
        head[1].weight.uniform_(0.5, 1.5), head[1].bias.normal_(0, 0.2), head[0].weight.normal_(0, 0.3)
    head.eval()
    x = torch.randn(200, 64)
    with torch.no_grad():
        expected = torch.softmax(head(x), dim=1).argmax(1).numpy()
    layer, a, c = m.assignment_map()
    assert layer == "backbone"
    assert ((x.numpy() @ a.T + c).argmax(1) == expected).all()


def test_predict_uses_the_head_on_new_images(tmp_path, small_npz):
    from deepclust.heads import ClusterHead
    from deepclust.inference import predict_run

    out = tmp_path / "run"
    fit_run(build_config(smoke_layer("dccm", f"npz:{small_npz}", out)))
    assert ClusterHead.load(out / "head.npz").kind == "linear"
    labels = np.load(out / "labels.npy")
    pred, _ = predict_run(out, f"npz:{small_npz}")
    assert (pred == labels).all()  # the argmax of the head on the fitted images is the method's clusters
    with np.load(small_npz) as z:  # new images: a reversed subset, written as another file
        np.savez(tmp_path / "new.npz", images=z["images"][::-3])
    new, _ = predict_run(out, f"npz:{tmp_path / 'new.npz'}")
    assert (new == labels[::-3]).all()
