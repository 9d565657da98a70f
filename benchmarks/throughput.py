"""Training throughput of every registered method (deepclust.methods.METHODS), each beside the same
network trained in a plain PyTorch loop, in the same run; the figure is the ratio (goal >= 1.5x;
DCCM's 0.6x).

    python benchmarks/throughput.py [--data mnist-test] [--methods instance and] [--epochs 2]
        [--backbone jule_cnn] [--batch-size 128] [--workers 0 2] [--plain-epochs 2] [--limit N] [--tag T]

deepclust: ``fit_run`` of the method with its defaults (views from the data, the method's own
options) for --epochs epochs (for AND: per round, so 5 x --epochs in all); the rate is
images_per_second of the run's log.jsonl (training steps: views, forward, the method's loss,
backward, optimiser step, memory-bank update; structure discovery excluded and recorded apart as
discovery_seconds), the median over the epochs after the first.

The plain loop, the way the papers' code runs: a torch Dataset that turns each uint8 image into a
PIL image and applies torchvision.transforms.v2 per image (the method's resolved views mapped to
RandomResizedCrop, RandomHorizontalFlip, RandomAffine, ColorJitter, RandomGrayscale, ToImage,
ToDtype, Normalize; as many views per image as the method uses), a DataLoader (shuffle, batch
--batch-size, for each --workers count), the same network architecture (built from the run's
resolved configuration), the same SGD settings, and per step: forward of each view, the instance-
discrimination loss (softmax over an N x D memory bank with the method's temperature, averaged over
the views), backward, step, EMA update of the batch's bank rows (eta 0.5). This is one common
workload for every method: what the authors' loops do per step at the least. Each epoch is timed
whole, DataLoader worker start-up included (no persistent workers, as in those scripts); the rate is
the median over the epochs after the first. The ratio divides deepclust's rate by the FASTEST plain
loop over the worker counts. On a 2-core CPU, 0 workers leaves both cores to torch, 2 workers take
them for the transforms (each worker runs torch with one thread): both are measured.

Also recorded: the raw forward+backward rate of the network with no augmentation and no bank.
The result is saved as RESULTS/throughput-BACKBONE[-TAG].json (RESULTS: benchmarks/results/ or
$DEEPCLUST_RESULTS_DIR). The script refuses to start (exit 2) while a fit or another benchmark runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import LIBRARY_DEFAULTS, class_count, data_spec, exclusive, fail, load_labelled, save_result, write_npz

GOAL_RATIO = 1.5
# DCCM's step adds its local discriminator (Eq 14: three 1x1 convolutions of width 512 at every position
# of every (row, partner) pair), several times the plain loop's arithmetic: its goal is issue 44's 0.6x
GOALS = {"dccm": 0.6}
DEFAULT_DATA = "mnist-test"


class ChannelShift:
    """Add one uniform shift in [-s, s] to every channel of a float image in [0, 1] (DCCM's Keras
    channel_shift_range; torchvision has no such transform)."""

    def __init__(self, s: float):
        self.s = s

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x + (torch.rand(()) * 2 - 1) * self.s).clamp_(0, 1)


def torchvision_views(spec, channels: int, size: tuple[int, int]):
    """deepclust's ViewSpec as a torchvision.transforms.v2 pipeline on one PIL image."""
    from torchvision.transforms import v2

    steps = []
    if tuple(spec.crop_scale) != (1.0, 1.0):
        steps.append(v2.RandomResizedCrop(size, scale=tuple(spec.crop_scale), ratio=tuple(spec.crop_ratio),
                                          antialias=True))
    if spec.flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if spec.rotation > 0 or spec.shift > 0 or tuple(spec.rescale) != (1.0, 1.0):
        steps.append(v2.RandomAffine(degrees=spec.rotation, translate=(spec.shift, spec.shift) if spec.shift else None,
                                     scale=tuple(spec.rescale) if tuple(spec.rescale) != (1.0, 1.0) else None,
                                     interpolation=v2.InterpolationMode.BILINEAR))  # bilinear, as deepclust
    j, colour = spec.color_jitter, channels == 3
    if j > 0 or (colour and spec.hue > 0):
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j if colour else 0,
                                    hue=spec.hue if colour else 0))
    if colour and spec.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(spec.grayscale_p))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if spec.channel_shift > 0:
        steps.append(ChannelShift(spec.channel_shift))
    mean = tuple(spec.mean) if spec.mean else (0.5,) * channels
    std = tuple(spec.std) if spec.std else (0.5,) * channels
    steps.append(v2.Normalize(mean, std))
    return v2.Compose(steps)


class PlainImages(torch.utils.data.Dataset):
    """uint8 images -> PIL -> per-image transforms, ``n_views`` views per image, and the index."""

    def __init__(self, images: np.ndarray, transform, n_views: int = 1):
        self.images, self.transform, self.n_views = images, transform, n_views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return (*[self.transform(img) for _ in range(self.n_views)], i)


def plain_step(net, opt, bank, views, idx, temperature: float) -> None:
    """One step of the plain loop: forward of each view, the instance loss over the whole bank (averaged
    over the views), backward, optimiser step, the EMA (eta 0.5) of the batch's bank rows."""
    embs = [net(v) for v in views]
    loss = sum(F.cross_entropy(e @ bank.t() / temperature, idx) for e in embs) / len(embs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        bank[idx] = F.normalize(0.5 * bank[idx] + 0.5 * embs[0].detach(), dim=1)


def plain_loop(net, images: np.ndarray, transform, *, n_views: int, batch: int, workers: int, epochs: int,
               temperature: float, lr: float) -> dict:
    """Train ``net`` the plain way (see the module docstring); images/s per epoch."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(PlainImages(images, transform, n_views), batch_size=batch,
                                         shuffle=True, num_workers=workers, drop_last=False)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    bank = F.normalize(torch.randn(len(images), net.dim), dim=1)
    net.train()
    rates = []
    for _ in range(epochs):
        t0, seen = time.perf_counter(), 0
        for *views, idx in loader:
            plain_step(net, opt, bank, views, idx, temperature)
            seen += len(idx)
        rates.append(round(seen / (time.perf_counter() - t0), 1))
    steady = rates[1:] or rates
    return {"num_workers": workers, "images_per_second": round(statistics.median(steady), 1),
            "images_per_second_per_epoch": rates}


def run_network(out: Path, cfg, images):
    """A fresh network of the run's architecture (inference.load_network builds it from the resolved
    configuration; a plain EmbeddingNet of its backbone where that is unavailable)."""
    try:
        from deepclust.inference import load_network

        net = load_network(out, cfg, images)[0]
    except Exception:  # the run API moves; the backbone alone is the same workload
        from deepclust.nets import EmbeddingNet

        net = EmbeddingNet(cfg.net.backbone, images.channels, images.image_size, dim=cfg.net.dim)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return net


def deepclust_epochs(method: str, spec: str, images, args) -> tuple[dict, object, object]:
    """One fit_run of the method; (its rates from log.jsonl, resolved config, a fresh network)."""
    from deepclust.configure import build_config, load_config
    from deepclust.runs import fit_run

    out = Path(tempfile.mkdtemp(prefix="deepclust-throughput-"))
    try:
        cfg = build_config({"method": method, "out": str(out), "data": {"spec": spec},
                            "cluster": {"n_clusters": class_count(spec)},
                            "net": {"backbone": args.backbone}, "optim": {"batch_size": args.batch_size},
                            "train": {"epochs": args.epochs, "progress": False, "checkpoint": False, "seed": 0}})
        fit_run(cfg)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        resolved = load_config(out / "config.yaml")
        net = run_network(out, resolved, images)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rates = [rec["images_per_second"] for rec in log]
    steady = rates[1:] or rates
    return ({"images_per_second": round(statistics.median(steady), 1), "images_per_second_per_epoch": rates,
             "phases": [rec.get("phase") for rec in log], "epochs": len(log),
             "discovery_seconds": round(sum(rec.get("discovery_seconds", 0.0) for rec in log), 3)},
            resolved, net)


def view_spec_of(cfg):
    from deepclust.resolution import view_spec

    return view_spec(cfg.views)


def measure_method(method: str, spec: str, images, args) -> dict:
    from deepclust.methods import METHODS

    dc, cfg, net = deepclust_epochs(method, spec, images, args)
    vspec = view_spec_of(cfg)
    transform = torchvision_views(vspec, images.channels, images.image_size)
    n_views = int(getattr(METHODS[method], "n_views", 1))
    plain = [plain_loop(net, images.images, transform, n_views=n_views, batch=args.batch_size, workers=w,
                        epochs=args.plain_epochs, temperature=cfg.memory.temperature, lr=cfg.optim.lr)
             for w in args.workers]
    best = max(plain, key=lambda p: p["images_per_second"])
    ratio, goal = dc["images_per_second"] / best["images_per_second"], GOALS.get(method, GOAL_RATIO)
    return {"deepclust_images_per_second": dc["images_per_second"], "deepclust": dc, "plain": best,
            "plain_runs": plain, "ratio": round(ratio, 3), "goal": goal, "meets_goal": ratio >= goal,
            "n_views": n_views, "views": {k: v for k, v in vars(vspec).items()},
            "plain_transform": repr(transform), "backbone": cfg.net.backbone}


def raw_rate(net, images: np.ndarray, batch: int, steps: int = 30) -> float:
    """Forward+backward of the network alone, on one fixed batch (no views, no bank)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.from_numpy(images[:batch].astype(np.float32) / 255.0)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    for _ in range(3):
        net(x).sum().backward()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
    return steps * len(x) / (time.perf_counter() - t0)


def load_or_synthetic(name: str, limit: int | None):
    """The named images; for the default (mnist-test) on a machine without the shared data, 10,000
    random 28x28 images instead (the timing does not depend on what the pixels show)."""
    from deepclust.errors import DataError

    try:
        return load_labelled(name, limit=limit), data_spec(name)
    except DataError:
        if name != DEFAULT_DATA:
            raise
        from deepclust.data import ImageSet

        n = limit or 10000
        rng = np.random.default_rng(0)
        return ImageSet(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)), f"random {n} x 28 x 28"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from deepclust.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help=f"data spec or short name (default {DEFAULT_DATA})")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"default: all ({', '.join(METHODS)})")
    p.add_argument("--epochs", type=int, default=2, help="deepclust epochs (per round for AND; default 2)")
    p.add_argument("--plain-epochs", type=int, default=2, help="plain-loop epochs per worker count (default 2)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers (default 0 2)")
    p.add_argument("--backbone", default="jule_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, help="only the first N images (a smoke test; marked quick)")
    p.add_argument("--tag", default="", help="suffix of the result's name (e.g. a subset of --methods, "
                                             "which must not replace the file of all of them)")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        fail(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if min(args.epochs, args.plain_epochs) < 1 or min(args.workers) < 0 or args.batch_size < 1:
        fail("--epochs, --plain-epochs and --batch-size must be positive, --workers not negative")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name = (f"throughput-{args.backbone}" + (f"-{args.tag}" if args.tag else "")
            + (f"-limit{args.limit}" if args.limit else ""))
    with exclusive(name), tempfile.TemporaryDirectory(prefix="deepclust-throughput-data-") as tmp:
        images, source = load_or_synthetic(args.data, args.limit)
        spec = write_npz(images, Path(tmp) / "images.npz")
        methods = {}
        for method in args.methods:
            methods[method] = measure_method(method, spec, images, args)
            print(json.dumps({method: {k: methods[method][k] for k in ("deepclust_images_per_second", "ratio")}}),
                  flush=True)
        from deepclust.nets import EmbeddingNet

        raw_net = EmbeddingNet(args.backbone, images.channels, images.image_size)
        save_result(name, {
            "data": source, "n_images": len(images), "quick": bool(args.limit), "goal_ratio": GOAL_RATIO,
            "settings": {"backbone": args.backbone, "batch_size": args.batch_size, "image_size": list(images.image_size),
                         "channels": images.channels, "epochs": args.epochs, "plain_epochs": args.plain_epochs,
                         "workers": args.workers, "plain_input": "PIL image per sample, torchvision.transforms.v2"},
            "methods": methods,
            "raw_forward_backward_images_per_second": round(raw_rate(raw_net, images.images, args.batch_size), 1),
        }, chosen_on=LIBRARY_DEFAULTS)


if __name__ == "__main__":
    main()
