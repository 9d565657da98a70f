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


# -- the authors' per-block schedule (options.schedule: block) ---------------------------------------

BLOCK = {"schedule": "block", "block_size": 100, "block_repeats": 4, "block_draws": 2, "block_epochs": 2}


def _block_method(tmp_path, small_npz, n=300, batch=32, **options):
    from deepclust.methods import build_method

    layer = smoke_layer("dccm", f"npz:{small_npz}", tmp_path / "x", options={**BLOCK, **options},
                        optim={"batch_size": batch}, train={"epochs": 2})
    return build_method(build_config(layer), n, tap_dims={"backbone": 6, "conv2": 32},
                        tap_shapes={"backbone": (6,), "conv2": (2, 4, 4)}, shallow_layer="conv2")


def test_the_block_schedule_cuts_blocks_passes_and_draws_as_the_authors_loop(tmp_path, small_npz):
    """main.py train: a data epoch's permutation cut into blocks; per block, repeated passes, each a
    fresh order of the block cut into mini-batches (the remainder left out: 100 // 32 = 3), each
    mini-batch trained on block_draws consecutive steps; block_epochs loop epochs a block."""
    m = _block_method(tmp_path, small_npz)
    assert m.n_blocks() == 3 and m.total_epochs() == 2 * 3 * 2  # 2 data epochs x 3 blocks x 2 epochs a block
    assert [m.needs_discovery(e) for e in range(6)] == [True, False] * 3  # each block's first epoch
    assert [m.phase(e) for e in (0, 1, 2, 5, 6)] == ["epoch 0 block 0", "epoch 0 block 0", "epoch 0 block 1",
                                                   "epoch 0 block 2", "epoch 1 block 0"]
    blocks = [m.block_rows(e) for e in (0, 2, 4)]
    assert sorted(torch.cat(blocks).tolist()) == list(range(300))  # a partition of the data epoch
    assert torch.equal(m.block_rows(1), blocks[0]) and not torch.equal(m.block_rows(6), blocks[0])
    for epoch in (0, 1):  # the two epochs of block 0: passes 0-1, then 2-3
        batches = m.batches(epoch, 300, 32, 3)
        assert len(batches) == 2 * 3 * 2 and all(len(b) == 32 for b in batches)
        assert all(torch.equal(batches[i], batches[i + 1]) for i in range(0, 12, 2))  # the two draws
        for p in range(2):
            one_pass = torch.cat(batches[p * 6:(p + 1) * 6:2])
            assert len(set(one_pass.tolist())) == 96 and set(one_pass.tolist()) <= set(blocks[0].tolist())
    passes = [torch.cat(m.batches(e, 300, 32, 3)[::2]) for e in (0, 1)]
    assert not torch.equal(passes[0], passes[1])  # every pass its own order
    assert all(torch.equal(a, b) for a, b in zip(m.batches(1, 300, 32, 3), m.batches(1, 300, 32, 3)))  # seeded


def test_the_block_schedule_forwards_only_the_views_it_trains(tmp_path, small_npz):
    """Per mini-batch the original is forwarded for its graph in any case; per block the graph is the
    block's, so the original is forwarded only when its terms are trained (Eq 15's L_PG, L_PL)."""
    for options, views, plain, trained in (({}, 2, (0,), (0, 1)), ({"original_terms": False}, 1, (), (0,)),
                                           ({"local_robustness": False}, 1, (0,), (0,))):
        m = _block_method(tmp_path, small_npz, **options)
        assert (m.views_at(0), m.plain_views(0), m.trained_views) == (views, plain, trained), options
    m = _block_method(tmp_path, small_npz, schedule="minibatch", original_terms=False)
    assert (m.views_at(0), m.plain_views(0), m.trained_views) == (2, (0,), (1,))


def _block_structure(m, epoch=0, seed=5):
    g = torch.Generator().manual_seed(seed)
    probabilities = torch.softmax(torch.randn(300, 10, generator=g) * 4, dim=1)
    rows = m.block_rows(epoch)
    return {"probabilities": probabilities, "block": rows, "block_probabilities": probabilities[rows]}


def _step(m, gidx, seed=7):
    from deepclust.methods import Step

    g = torch.Generator().manual_seed(seed)
    outputs = [{"probabilities": torch.softmax(torch.randn(len(gidx), 10, generator=g), dim=1).requires_grad_(),
                "backbone": torch.randn(len(gidx), 6, generator=g), "conv2": torch.randn(len(gidx), 2, 4, 4, generator=g)}
               for _ in range(m.views_at(0))]
    return Step(epoch=0, step=0, idx=gidx, gidx=gidx, positions=torch.arange(len(gidx)), outputs=outputs, bank=None)


def test_a_block_step_trains_on_the_blocks_graph_and_labels(tmp_path, small_npz):
    """Eq 3 and Eq 9 of a block's mini-batch against the graph and labels of the block's predictions
    (the authors' mask[address,:][:,address], labels[address]), computed here independently from
    them; the step's own predictions are what is trained, not what is thresholded."""
    m = _block_method(tmp_path, small_npz, mutual_information=False)
    structure = _block_structure(m)
    m.set_structure(structure)
    gidx = m.batches(0, 300, 32, 3)[0]
    step = _step(m, gidx)
    got = m.batch_loss(step)
    p_block = structure["probabilities"][gidx]  # the block's predictions of these images
    cos = F.normalize(p_block, dim=1) @ F.normalize(p_block, dim=1).T
    w, top = cos >= 0.95, p_block.max(dim=1)
    want = torch.zeros(32)
    for out in step.outputs:
        p = out["probabilities"]
        s = F.normalize(p, dim=1) @ F.normalize(p, dim=1).T
        want = want + torch.where(w, -torch.log(s.clamp_min(1e-7)), -torch.log((1 - s).clamp_min(1e-7))).mean(1)
        want = want + 5.0 * -torch.log(p.gather(1, top.indices[:, None]).squeeze(1)) * (top.values >= 0.9)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    off = ~torch.eye(32, dtype=torch.bool)
    assert bool((w & off).any()) and bool((~w & off).any())  # the case has both kinds of pair,
    assert bool((top.values >= 0.9).any()) and not bool((top.values >= 0.9).all())  # and of label
    m.set_structure(None)
    minibatch = _block_method(tmp_path, small_npz, mutual_information=False, schedule="minibatch")
    assert not torch.allclose(minibatch.batch_loss(step), got)  # per mini-batch: the step's own originals


def test_the_block_graph_is_made_once_per_block_and_set_structure_is_idempotent(tmp_path, small_npz, monkeypatch):
    """The block's similarities, graph and labels come from set_structure (idempotent: the same from
    the same structure), and the repeated steps only index them: no pseudo-graph is computed in them."""
    import deepclust.methods.dccm as method_module
    import deepclust.structure.pseudo_graph as graph_module

    m = _block_method(tmp_path, small_npz)
    structure = _block_structure(m)
    m.set_structure(structure)
    first = m.block
    m.set_structure(structure)
    for name in ("where", "similarity", "graph", "labels", "confident"):
        assert torch.equal(getattr(first, name), getattr(m.block, name)), name
    calls = []
    for module in (graph_module, method_module):
        for name in ("pseudo_graph", "pseudo_labels"):
            original = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    for gidx in m.batches(0, 300, 32, 3)[:6]:
        m.batch_loss(_step(m, gidx))
    assert calls == []


def test_block_predictions_normalise_the_head_by_the_blocks_statistics(tmp_path, small_npz):
    """The authors' BatchNorm keeps no running statistics (track_running_stats=False): a block is
    predicted with its own mean and variance. Discovery mutates nothing: the running statistics stay."""
    m = _block_method(tmp_path, small_npz)
    head = m.modules["head"]
    with torch.no_grad():
        head[0].weight.normal_(0, 0.5), head[1].weight.uniform_(0.5, 2), head[1].bias.normal_(0, 0.3)
    running = (head[1].running_mean.clone(), head[1].running_var.clone())
    x = torch.randn(100, 6) * 3 + 1
    z = head[0](x).detach()
    z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + head[1].eps) * head[1].weight + head[1].bias
    torch.testing.assert_close(m.block_predictions(x), torch.softmax(z, dim=1).detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(head[1].running_mean, running[0]) and torch.equal(head[1].running_var, running[1])


def test_the_block_schedule_is_refused_by_a_time_budget_and_checks_its_epochs(tmp_path, small_npz):
    """train.epochs counts passes over the data in blocks, which the budget's plan of mini-batch epochs
    cannot price: it asks for the epochs instead of planning wrongly. A block's passes split evenly."""
    from deepclust.budget import method_schedule
    from deepclust.methods import Dccm
    from deepclust.errors import ConfigError

    layer = smoke_layer("dccm", f"npz:{small_npz}", tmp_path / "x", options=BLOCK)
    with pytest.raises(ConfigError, match="give train.epochs"):
        method_schedule(Dccm, build_config(layer))(3)
    assert method_schedule(Dccm, build_config(smoke_layer("dccm", f"npz:{small_npz}", tmp_path / "x")))(3) == (3, 3, 0)
    with pytest.raises(ConfigError, match="block_epochs"):
        build_config(smoke_layer("dccm", f"npz:{small_npz}", tmp_path / "x", options={**BLOCK, "block_epochs": 3}))


def test_v4_partners_are_each_rows_most_similar_chosen_pair_whatever_the_write_order():
    """V4 (top-n pairs): a row in several of the chosen pairs keeps its most similar partner; the
    choice is a mask and a max per row, the same on any device (writes of several pairs to one entry
    have no defined order on CUDA). Against an independent loop over the chosen pairs."""
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(16, 3, generator=g) * 4, dim=1)
    sim = prediction_similarity(p)
    graph = pseudo_graph(sim, 0.9)
    got = mi_pairs(graph, sim, torch.arange(16), torch.Generator().manual_seed(0), "topn-random", 1).positive
    allowed = sorted(((float(sim[i, j]), i, j) for i in range(16) for j in range(i + 1, 16) if graph[i, j]), reverse=True)
    pairs = allowed[:16]  # n = the batch size
    want = [-1] * 16
    for i in range(16):
        mine = [(s, j if a == i else a) for s, a, j in pairs if i in (a, j)]
        want[i] = max(mine)[1] if mine else -1
    assert got.tolist() == want
    per_row = [sum(i in (a, j) for _, a, j in pairs) for i in range(16)]
    assert len(allowed) > 16 and max(per_row) >= 3 and -1 in want  # rows in several pairs, rows in none
