"""DCCM's training step in parts, beside a plain instance-discrimination step of the same network and
batch, interleaved in one process: the ratios hold on a busy host where absolute times do not.

    python benchmarks/dccm_profile.py [--data mnist-test] [--backbone jule_cnn] [--batch-size 128]
        [--steps 12] [--set options.discriminator_width=512 ...]

The DCCM step is the trainer's own (``Trainer.step``: views, forward, ``batch_loss``, backward,
optimiser step) on the configuration ``benchmarks/throughput.py`` runs (the method's defaults, views
from the data). Its parts are timed in a second, instrumented copy of the step:
 - views: ``Trainer._views`` (the batch's augmentation on tensors);
 - forward: the network and the head, every view in one pass;
 - structure: the pseudo-graph and pseudo-labels of the batch, and the MI pairs (Eq 2, 7-8, Table 6);
 - losses: Eq 3 and Eq 9 terms (graph and label), forward;
 - discriminator: Eq 14's forward (``mi_loss``);
 - discriminator backward: the gradient of beta * Eq 14 to the discriminator and its two inputs;
 - backward: the whole loss's backward (the discriminator's again, with the network);
 - optimiser: the step.
The plain step (what ``throughput.py``'s plain loop does per batch, on a pre-made view): forward of one
view, the instance-discrimination loss over an N x D bank, backward, SGD step, bank update; and,
apart, the per-image PIL + torchvision transforms its DataLoader spends on a batch (0 workers).
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
from throughput import PlainImages, torchvision_views

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


def instrument(clock: Clock, stash: dict):
    """Wrap the functions ``methods/dccm.py`` calls so each call is timed under its part; ``mi_loss``'s
    inputs and output are kept for the discriminator's own backward."""
    from deepclust.methods import dccm

    def timed(fn, part):
        def wrapper(*args, **kwargs):
            with clock.part(part):
                return fn(*args, **kwargs)
        return wrapper

    def mi(fn):
        def wrapper(disc, deep, shallow_all, *rest):
            with clock.part("discriminator"):
                out = fn(disc, deep, shallow_all, *rest)
            stash.update(mi=out, inputs=[deep, shallow_all, *disc.parameters()])
            return out
        return wrapper

    parts = {"prediction_similarity": None, "pseudo_graph": "structure", "pseudo_labels": "structure",
             "mi_pairs": "structure", "graph_loss": "losses", "label_loss": "losses"}
    saved = {}
    for name, part in parts.items():
        if hasattr(dccm, name):
            saved[name] = getattr(dccm, name)
            if name == "prediction_similarity":  # without gradient: the graph's; with it: the loss's
                fn = saved[name]

                def similarity(*args, _fn=fn, **kwargs):
                    with clock.part("losses" if torch.is_grad_enabled() else "structure"):
                        return _fn(*args, **kwargs)
                setattr(dccm, name, similarity)
            else:
                setattr(dccm, name, timed(saved[name], part))
    saved["mi_loss"] = dccm.mi_loss
    dccm.mi_loss = mi(dccm.mi_loss)
    return lambda: [setattr(dccm, k, v) for k, v in saved.items()]


def instrumented_step(trainer, t, epoch: int, step: int, gidx, clock: Clock, stash: dict) -> None:
    """``Trainer.step`` with a clock around each part (the same calls, in the same order)."""
    from deepclust.methods import Step

    method = t.method
    part = trainer._slices(len(gidx))[trainer.rank]
    idx = gidx[part]
    with clock.part("views"):
        x, sizes, extra = trainer._views(method, epoch, step, gidx, part, trainer.data[idx])
    with clock.part("forward"):
        out = t.model(x)
        outputs = [dict(zip(out, vals)) for vals in zip(*(v.split(sizes) for v in out.values()))]
    s = Step(epoch=epoch, step=step, idx=idx, gidx=gidx, positions=part, outputs=outputs, bank=None,
             world=1, extra_rows=extra)
    per_sample = method.batch_loss(s)
    loss = per_sample.float().sum() / len(gidx)
    if "mi" in stash:
        with clock.part("discriminator_backward"):
            mi = stash.pop("mi")
            torch.autograd.grad(method.options.beta * mi.sum() / len(gidx), stash.pop("inputs"), retain_graph=True)
    t.optimizer.zero_grad(set_to_none=True)
    with clock.part("backward"):
        trainer.fabric.backward(loss)
    with clock.part("optimiser"):
        t.optimizer.step()


def plain_parts(net, images: np.ndarray, transform, batch: int, temperature: float, lr: float):
    """The plain loop's step (throughput.plain_loop's body) on a pre-made view, and its data time."""
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    bank = F.normalize(torch.randn(len(images), net.dim), dim=1)
    data = PlainImages(images, transform, 1)
    rng = np.random.default_rng(0)

    def fetch():
        chosen = rng.choice(len(images), batch, replace=False)
        t0 = now()
        items = [data[int(i)] for i in chosen]
        x = torch.stack([v for v, _ in items])
        return x, torch.as_tensor(chosen), now() - t0

    def step(x, idx):
        t0 = now()
        emb = net(x)
        loss = F.cross_entropy(emb @ bank.t() / temperature, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            bank[idx] = F.normalize(0.5 * bank[idx] + 0.5 * emb.detach(), dim=1)
        return now() - t0

    return fetch, step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist-test")
    p.add_argument("--backbone", default="jule_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--clock", choices=sorted(NOW), default="cpu", help="cpu: process CPU time (default); wall")
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
        fetch, plain_step = plain_parts(trainer.net, images.images, transform, cfg.optim.batch_size,
                                        cfg.memory.temperature, cfg.optim.lr)
        clock, stash = Clock(), {}
        rows = {k: [] for k in ("dccm_step", "plain_step", "plain_data", *PARTS)}
        for i in range(args.steps + 2):  # the first two warm up
            gidx = batches[i % len(batches)]
            t0 = now()
            trainer.step(t, 0, i, gidx)
            dccm = now() - t0
            x, idx, data_seconds = fetch()
            plain = plain_step(x, idx)
            clock.spent = {}
            restore = instrument(clock, stash)
            try:
                instrumented_step(trainer, t, 0, i, gidx, clock, stash)
            finally:
                restore()
            if i >= 2:
                rows["dccm_step"].append(dccm)
                rows["plain_step"].append(plain)
                rows["plain_data"].append(data_seconds)
                for k in PARTS:
                    rows[k].append(clock.spent.get(k, 0.0))
    med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    plain, with_data = med["plain_step"], med["plain_step"] + med["plain_data"]
    print(json.dumps({
        "settings": {"data": args.data, "backbone": args.backbone, "batch_size": cfg.optim.batch_size,
                     "views": t.method.views_at(0), "options": vars(cfg.options), "steps": args.steps, "clock": args.clock,
                     "threads": torch.get_num_threads()},
        "median_ms": {k: round(v, 1) for k, v in med.items()},
        "ratio_to_plain_step": {k: round(v / plain, 2) for k, v in med.items()},
        "images_per_second_ratio": {"to_plain_compute": round(plain / med["dccm_step"], 3),
                                    "to_plain_with_its_data": round(with_data / med["dccm_step"], 3)},
    }, indent=1))


def view_spec_of(cfg):
    from deepclust.resolution import view_spec

    return view_spec(cfg.views)


if __name__ == "__main__":
    main()
