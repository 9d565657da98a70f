"""Training throughput of instance discrimination: small CNN on 28x28 grayscale, augmentation and
full-softmax memory bank included (issue 2's target: >= 700 images/s on the 2-core CPU).

    python benchmarks/throughput.py [--quick] [--data mnist-test] [--epochs 3] [--backbone jule_cnn]

Reports the end-to-end training rate (every step: views, forward, loss over the whole bank,
backward, optimiser, bank update) of the epochs after the first, and for reference the raw
forward+backward rate of the same network on the same batch size with no augmentation and no bank.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from common import data_spec, save_result


def raw_rate(backbone: str, images: np.ndarray, batch: int, steps: int = 30) -> float:
    from deepclust.nets import EmbeddingNet

    torch.manual_seed(0)
    net = EmbeddingNet(backbone, 1, images.shape[1:3])
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.from_numpy(images[:batch, None].astype(np.float32) / 255.0)
    for _ in range(3):
        net(x).sum().backward()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="mnist-test")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--backbone", default="jule_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    from deepclust.config import build_config
    from deepclust.data import load_images
    from deepclust.runs import resolve, view_spec
    from deepclust.train import Trainer

    spec = data_spec(args.data)
    try:
        images = load_images(spec)
    except Exception:  # no shared data here: synthetic 28x28 images of the same size
        rng = np.random.default_rng(0)
        from deepclust.data import ImageSet

        images = ImageSet(rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8), None, None, None, None, "random")
        spec = "random 10000 x 28 x 28"
    if args.quick:
        images = images.subset(np.arange(2000))
        args.epochs = 2
    out = tempfile.mkdtemp(prefix="deepclust-throughput-")
    cfg = build_config({"method": "instance", "out": out, "net": {"backbone": args.backbone},
                        "optim": {"batch_size": args.batch_size},
                        "train": {"epochs": args.epochs, "progress": False, "checkpoint": False}})
    cfg = resolve(cfg, images)
    try:
        result = Trainer(cfg, images.images, out, view_spec=view_spec(cfg)).fit()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rates = [h["images_per_second"] for h in result.history]
    steady = rates[1:] or rates
    raw = raw_rate(args.backbone, images.images, args.batch_size)
    save_result(f"throughput-instance-{args.backbone}" + ("-quick" if args.quick else ""), {
        "data": spec, "n_images": len(images), "image_size": list(images.image_size), "backbone": args.backbone,
        "batch_size": args.batch_size, "views": cfg.views.preset, "epochs": args.epochs,
        "images_per_second_per_epoch": rates, "images_per_second": round(statistics.fmean(steady), 1),
        "raw_forward_backward_images_per_second": round(raw, 1), "target_images_per_second": 700,
        "meets_target": statistics.fmean(steady) >= 700,
    })


if __name__ == "__main__":
    main()
