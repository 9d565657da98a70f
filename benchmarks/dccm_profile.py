"""DCCM's training step in parts, beside a plain instance-discrimination step of the same network and
batch, interleaved in one process: the ratios hold on a busy host where absolute times do not.

    python benchmarks/dccm_profile.py [--data mnist-test] [--backbone jule_cnn] [--batch-size 128]
        [--steps 12] [--set options.discriminator_width=512 ...]

The DCCM step is the trainer's own (``Trainer.step``: views, forward, ``batch_loss``, backward,
optimiser step) on the configuration ``benchmarks/throughput.py`` runs (the method's defaults, views
from the data). Its parts are timed in a second run of the step with what it calls wrapped (``step``:
that run whole, with the discriminator's own backward, which the plain run does not make):
 - views: the batch's augmentation on tensors (``BatchViews.apply`` / ``plain``);
 - forward: the network's taps and the head, every view in one pass;
 - structure: the pseudo-graph and pseudo-labels of the batch, and the MI pairs (Eq 2, 7-8, Table 6);
 - losses: Eq 3 and Eq 9 terms (graph and label), forward;
 - discriminator: Eq 14's forward (``mi_loss``);
 - discriminator backward: the gradient of beta * Eq 14 to the discriminator and its two inputs;
 - backward: the whole loss's backward (the discriminator's again, with the network);
 - optimiser: the step.
The plain step (what ``throughput.py``'s plain loop does per batch, on pre-made views, as many as
the method class's ``n_views`` or ``--plain-views``): forward of each view, the instance-
discrimination loss over an N x D bank, backward, SGD step, bank update; and, apart, the per-image
PIL + torchvision transforms its DataLoader spends on a batch (0 workers).
And the bound of the discriminator's arithmetic: its three matrix products (forward h1 W2^T, backward
g2^T h1 and g2 W2) at the step's size (pairs x positions rows by the width), timed alone on this
machine's BLAS: the step's time had T cost only those, and the images/s ratio that gives, the most a
float32 implementation of Eq 14 at that width could reach here.
Medians over ``--steps`` repetitions, the steps of the three kinds interleaved. ``--clock cpu`` (the
default) reads the process's CPU time, which other work on a shared host disturbs far less than the
wall clock (run it with OMP_NUM_THREADS=1 there: threads waiting for a busy core spin on CPU time);
``--clock wall`` for a machine of one's own. Prints one JSON object; records nothing (timings of a
shared host are not figures of record).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import class_count, data_spec, load_labelled
from throughput import PlainImages, plain_step, torchvision_views

PARTS = ("views", "forward", "structure", "losses", "discriminator", "discriminator_backward", "backward",
         "optimiser")


NOW = {"cpu": time.process_time, "wall": time.perf_counter}
now = time.process_time


class Clock:
    """Seconds spent per part in the current step."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    @contextmanager
    def part(self, name: str):
        t0 = now()
        try:
            yield
        finally:
            self.spent[name] = self.spent.get(name, 0.0) + now() - t0


def _wrap(obj, name: str, clock: Clock, part: str, saved: list, before=None) -> None:
    """Time every call of ``obj.name`` under ``part`` (set on the instance, removed by the restore);
    ``before()`` runs first, outside the part."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        if before is not None:
            before()
        with clock.part(part):
            return fn(*args, **kwargs)
    setattr(obj, name, wrapper)
    saved.append((obj, name, fn))


def instrument(clock: Clock, stash: dict, trainer, t):
    """Wrap what ``Trainer.step`` calls (the views, the network's taps and the method's head, the
    functions ``methods/dccm.py`` calls, the backward, the optimiser's step) so each call is timed
    under its part; before the backward, the gradient of the MI term to the discriminator and its
    inputs is timed on its own (``discriminator_backward``, the graph retained). Returns the restore."""
    import types

    from deepclust.methods import dccm

    saved: list = []
    for name in ("apply", "plain"):
        _wrap(trainer.views, name, clock, "views", saved)
    _wrap(trainer.net, "taps", clock, "forward", saved)
    _wrap(t.method, "forward", clock, "forward", saved)
    for name, part in (("pseudo_graph", "structure"), ("pseudo_labels", "structure"), ("mi_pairs", "structure"),
                       ("graph_loss", "losses"), ("label_loss", "losses")):
        _wrap(dccm, name, clock, part, saved)
    similarity, mi = dccm.prediction_similarity, dccm.mi_loss

    def timed_similarity(*args, **kwargs):  # without gradient: the graph's; with it: the loss's
        with clock.part("losses" if torch.is_grad_enabled() else "structure"):
            return similarity(*args, **kwargs)

    def timed_mi(disc, deep, shallow_all, positives, negatives):
        with clock.part("discriminator"):
            out = mi(disc, deep, shallow_all, positives, negatives)
        stash.update(mi=out, inputs=[deep, shallow_all, *disc.parameters()])
        pairs = int((positives >= 0).sum() + (negatives >= 0).sum())
        stash["products"] = (pairs * shallow_all[0, 0].numel(), disc.net[2].weight.shape[0])
        return out

    def discriminator_backward():
        if "mi" in stash:
            with clock.part("discriminator_backward"):
                torch.autograd.grad(t.method.options.beta * stash.pop("mi").sum() / trainer.cfg.optim.batch_size,
                                    stash.pop("inputs"), retain_graph=True)
    dccm.prediction_similarity, dccm.mi_loss = timed_similarity, timed_mi
    saved += [(dccm, "prediction_similarity", similarity), (dccm, "mi_loss", mi)]
    _wrap(trainer.fabric, "backward", clock, "backward", saved, before=discriminator_backward)
    _wrap(t.optimizer, "step", clock, "optimiser", saved)

    def restore():
        for obj, name, fn in reversed(saved):
            if isinstance(obj, types.ModuleType):
                setattr(obj, name, fn)
            else:
                delattr(obj, name)
    return restore


def products_ms(rows: int, width: int, repeats: int = 5) -> float:
    """The discriminator's three matrix products at a step's size (``rows`` = pairs x positions by
    ``width``: the forward's h1 W2^T, the backward's g2^T h1 and g2 W2; ``PairScores``), median ms:
    the time no implementation of its loss in float32 can go under on this machine's BLAS, the other
    work of T (the sum, the ReLUs, the gathers and scatters) left out."""
    h1, w2 = torch.randn(rows, width), torch.randn(width, width)
    out, square = torch.empty(rows, width), torch.empty(width, width)
    times = []
    for i in range(repeats + 1):  # the first warms up
        t0 = now()
        torch.mm(h1, w2.t(), out=out)
        torch.mm(out.t(), h1, out=square)
        torch.mm(out, w2, out=h1)
        if i:
            times.append(now() - t0)
    return statistics.median(times) * 1e3


def plain_parts(net, images: np.ndarray, transform, batch: int, temperature: float, lr: float, n_views: int):
    """The plain loop's step (throughput.plain_loop's body) on pre-made views, and its data time."""
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    bank = F.normalize(torch.randn(len(images), net.dim), dim=1)
    data = PlainImages(images, transform, n_views)
    rng = np.random.default_rng(0)

    def fetch():
        chosen = rng.choice(len(images), batch, replace=False)
        t0 = now()
        items = [data[int(i)] for i in chosen]
        views = [torch.stack([item[v] for item in items]) for v in range(n_views)]
        return views, torch.as_tensor(chosen), now() - t0

    def step(views, idx):
        t0 = now()
        plain_step(net, opt, bank, views, idx, temperature)
        return now() - t0

    return fetch, step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist-test")
    p.add_argument("--backbone", default="jule_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--clock", choices=sorted(NOW), default="cpu", help="cpu: process CPU time (default); wall")
    p.add_argument("--plain-views", type=int, help="views per image of the plain step (default: the method "
                                                   "class's n_views, as throughput.py's plain loop)")
    p.add_argument("--set", nargs="*", default=[], help="KEY=VALUE configuration overrides (YAML values)")
    return p.parse_args(argv)


def build(args, out: Path):
    import yaml

    from deepclust.config import merge_layers
    from deepclust.configure import build_config
    from deepclust.resolution import load_data, resolve, view_spec
    from deepclust.train import Trainer

    spec = data_spec(args.data)
    layer = {"method": "dccm", "out": str(out), "data": {"spec": spec}, "cluster": {"n_clusters": class_count(spec)},
             "net": {"backbone": args.backbone}, "optim": {"batch_size": args.batch_size},
             "train": {"epochs": 1, "progress": False, "checkpoint": False, "seed": 0}}
    for item in args.set:
        key, value = item.split("=", 1)
        nested = yaml.safe_load(value)
        for part in reversed(key.split(".")):
            nested = {part: nested}
        layer = merge_layers(layer, nested)
    cfg = build_config(layer)
    images = load_data(cfg.data)
    cfg = resolve(cfg, images)
    trainer = Trainer(cfg, images.images, out, view_spec=view_spec(cfg.views))
    trainer.start(False)
    return cfg, trainer, trainer.begin(0), images


def main(argv=None) -> None:
    global now
    args = parse_args(argv)
    now = NOW[args.clock]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="dccm-profile-") as tmp:
        cfg, trainer, t, images = build(args, Path(tmp))
        batches = t.method.batches(0, trainer.n, cfg.optim.batch_size, cfg.train.seed)
        transform = torchvision_views(view_spec_of(cfg), images.channels, images.image_size)
        from deepclust.methods import METHODS

        plain_views = args.plain_views or int(getattr(METHODS["dccm"], "n_views", 1))
        fetch, plain_step = plain_parts(trainer.net, images.images, transform, cfg.optim.batch_size,
                                        cfg.memory.temperature, cfg.optim.lr, plain_views)
        clock, stash = Clock(), {}
        rows = {k: [] for k in ("dccm_step", "plain_step", "plain_data", *PARTS, "step")}
        for i in range(args.steps + 2):  # the first two warm up
            gidx = batches[i % len(batches)]
            t0 = now()
            trainer.step(t, 0, i, gidx)
            dccm = now() - t0
            x, idx, data_seconds = fetch()
            plain = plain_step(x, idx)
            clock.spent = {}
            restore = instrument(clock, stash, trainer, t)
            try:
                with clock.part("step"):
                    trainer.step(t, 0, i, gidx)
            finally:
                restore()
            if i >= 2:
                rows["dccm_step"].append(dccm)
                rows["plain_step"].append(plain)
                rows["plain_data"].append(data_seconds)
                for k in (*PARTS, "step"):
                    rows[k].append(clock.spent.get(k, 0.0))
    med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    plain, with_data = med["plain_step"], med["plain_step"] + med["plain_data"]
    rows_p, width = stash["products"]
    floor = products_ms(rows_p, width)
    # the step had T cost only its three products, the rest of the step as measured
    floor_step = med["dccm_step"] - med["discriminator"] - med["discriminator_backward"] + floor
    flop = 3 * 2 * rows_p * width * width
    print(json.dumps({
        "settings": {"data": args.data, "backbone": args.backbone, "batch_size": cfg.optim.batch_size,
                     "views": t.method.views_at(0), "options": vars(cfg.options), "steps": args.steps, "clock": args.clock, "plain_views": plain_views,
                     "threads": torch.get_num_threads()},
        "median_ms": {k: round(v, 1) for k, v in med.items()},
        "ratio_to_plain_step": {k: round(v / plain, 2) for k, v in med.items()},
        "images_per_second_ratio": {"to_plain_compute": round(plain / med["dccm_step"], 3),
                                    "to_plain_with_its_data": round(with_data / med["dccm_step"], 3)},
        "discriminator_products": {
            "rows": rows_p, "width": width, "gflop": round(flop / 1e9, 1),
            "ms": round(floor, 1), "gflop_per_s": round(flop / floor / 1e6, 1),
            "step_ms_if_only_products": round(floor_step, 1),
            "images_per_second_ratio_bound": {"to_plain_compute": round(plain / floor_step, 3),
                                              "to_plain_with_its_data": round(with_data / floor_step, 3)}},
    }, indent=1))


def view_spec_of(cfg):
    from deepclust.resolution import view_spec

    return view_spec(cfg.views)


if __name__ == "__main__":
    main()
