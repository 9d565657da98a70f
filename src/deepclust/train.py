"""The training loop: per epoch, discover structure, then train on it.

Written out explicitly so the algorithm reads plainly; Lightning Fabric underneath handles devices,
DDP launch, precision and collectives. One process per device; every process holds the whole
dataset (uint8, on its device) and the whole memory bank.

Reproducibility: the epoch's sample order and every batch's augmentation parameters are drawn from
generators seeded by (seed, epoch, step) for the *global* batch; each process takes its slice. So a
run is the same on 1 or many processes (up to float rounding), and ``--resume`` after a kill gives
the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Config
from .memory import MemoryBank
from .methods import Method, build_method
from .nets import EmbeddingNet
from .views import BatchViews, draw_generator

CHECKPOINT_NAME = "last.pt"


def make_fabric(cfg: Config):
    """A Lightning Fabric for the configured devices (DDP when more than one process)."""
    from lightning.fabric import Fabric

    accelerator = cfg.train.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator in ("cuda", "gpu") else "32-true"
    world = cfg.train.devices * cfg.train.num_nodes
    strategy = "ddp" if world > 1 else "auto"
    return Fabric(
        accelerator=accelerator,
        devices=cfg.train.devices,
        num_nodes=cfg.train.num_nodes,
        strategy=strategy,
        precision=precision,
    )


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N,H,W) or (N,H,W,3) -> uint8 tensor (N,C,H,W)."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    if t.ndim == 3:
        return t[:, None]
    return t.permute(0, 3, 1, 2).contiguous()


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """A fresh permutation split into ceil(N / B) near-equal global batches (every image once an
    epoch, no tiny last batch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    steps = max(1, -(-n // batch_size))
    return list(torch.tensor_split(perm, steps))


def learning_rate(cfg: Config, schedule_epoch: int) -> float:
    """Step schedule: lr * gamma ** (milestones passed), with an optional linear warm-up."""
    o = cfg.optim
    lr = o.lr * o.gamma ** sum(schedule_epoch >= m for m in o.milestones)
    if o.warmup_epochs and schedule_epoch < o.warmup_epochs:
        lr *= (schedule_epoch + 1) / (o.warmup_epochs + 1)
    return lr


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    if o.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, alpha=0.9, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


@dataclass
class TrainResult:
    net: EmbeddingNet
    views: BatchViews
    bank: MemoryBank
    method: Method
    train_seconds: float
    step_seconds: float
    images_seen: int
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.step_seconds if self.step_seconds > 0 else float("nan")


class Trainer:
    """Trains ``cfg.method`` on uint8 images. ``labels`` are optional and only feed diagnostics."""

    def __init__(self, cfg: Config, images: np.ndarray, out_dir: str | Path, *, fabric=None,
                 labels: np.ndarray | None = None, view_spec=None):
        from .views import ViewSpec

        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.fabric = fabric if fabric is not None else make_fabric(cfg)
        self.labels = labels
        self.data_cpu = images_to_tensor(images)
        n, c, h, w = self.data_cpu.shape
        self.n = n
        torch.manual_seed(cfg.train.seed)
        self.net = EmbeddingNet(cfg.net.backbone, c, (h, w), dim=cfg.net.dim)
        self.views = BatchViews(view_spec if view_spec is not None else ViewSpec(), c)
        self.method = build_method(cfg, n)
        self.bank = MemoryBank(n, cfg.net.dim, temperature=cfg.memory.temperature, eta=cfg.memory.eta,
                               seed=cfg.train.seed)

    # -- helpers -----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    @property
    def world(self) -> int:
        return self.fabric.world_size

    def _gather(self, idx: Tensor, feats: Tensor, global_size: int) -> tuple[Tensor, Tensor]:
        """All processes' (idx, feats) in rank order; local slices may differ in size by one."""
        if self.world == 1:
            return idx, feats
        size = feats.shape[0]
        max_size = -(-global_size // self.world)
        pad = max_size - size
        idx_p = F.pad(idx, (0, pad), value=-1)
        feats_p = F.pad(feats, (0, 0, 0, pad))
        all_idx = self.fabric.all_gather(idx_p).reshape(-1)
        all_feats = self.fabric.all_gather(feats_p).reshape(-1, feats.shape[1])
        keep = all_idx >= 0
        return all_idx[keep], all_feats[keep]

    def _broadcast_structure(self, structure):
        if self.world == 1:
            return structure
        return self.fabric.broadcast(structure, src=0)

    def _bank_identical(self) -> bool:
        """Every replica's bank bit for bit the same (a SHA-256 of the bytes, compared across ranks)."""
        import hashlib

        digest = hashlib.sha256(self.bank.features.detach().cpu().numpy().tobytes()).hexdigest()
        digests = [None] * self.world
        torch.distributed.all_gather_object(digests, digest)
        return len(set(digests)) == 1

    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoints" / CHECKPOINT_NAME

    def _save_checkpoint(self, epoch: int, optimizer, history) -> None:
        if self.rank == 0:
            path = self.checkpoint_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "epoch": epoch,
                "model": self.net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "bank": self.bank.state_dict(),
                "method": self.method.state_dict(),
                "rng": _rng_state(),
                "config": self.cfg.to_dict(),
                "history": history,
            }
            _atomic_torch_save(state, path)
        self.fabric.barrier()

    def _load_checkpoint(self, optimizer) -> tuple[int, list]:
        path = self.checkpoint_path()
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        self.bank.load_state_dict(state["bank"])
        self.method.load_state_dict(state["method"])
        _set_rng_state(state["rng"])
        return int(state["epoch"]) + 1, list(state.get("history", []))

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        cfg, fabric = self.cfg, self.fabric
        t_start = time.perf_counter()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        elif fabric.device.type == "cpu" and self.world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(self.world, os.cpu_count() or 1)))
        device = fabric.device
        optimizer = build_optimizer(cfg, self.net.parameters())
        start_epoch, history = 0, []
        if resume and self.checkpoint_path().exists():
            start_epoch, history = self._load_checkpoint(optimizer)
        model, optimizer = fabric.setup(self.net, optimizer)
        self.bank.to(device)
        self.views.to(device)
        data = self.data_cpu.to(device)
        if self.method.structure is not None:
            self.method.set_structure({k: v.to(device) for k, v in self.method.structure.items()})

        total = self.method.total_epochs()
        step_seconds, images_seen = 0.0, 0
        log_path = self.out_dir / "log.jsonl"
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        for epoch in range(start_epoch, total):
            t_epoch = time.perf_counter()
            record: dict[str, Any] = {"epoch": epoch, "phase": self.method.phase(epoch)}
            if self.method.needs_discovery(epoch):
                t0 = time.perf_counter()
                structure = None
                if self.rank == 0:
                    structure = self.method.discover(epoch, self.bank)
                    if structure is not None and self.world > 1:
                        structure = {k: v.cpu() for k, v in structure.items()}
                structure = self._broadcast_structure(structure)
                self.method.set_structure({k: v.to(device) for k, v in structure.items()}
                                          if structure is not None else None)
                record["discovery_seconds"] = round(time.perf_counter() - t0, 3)
                if self.rank == 0:
                    record.update(self.method.describe(self.labels))
                    if self.labels is not None:
                        record["bank_knn_top1"] = bank_knn_top1(self.bank.features, self.labels, cfg)
            lr = learning_rate(cfg, self.method.schedule_epoch(epoch))
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            batches = epoch_batches(self.n, cfg.optim.batch_size, cfg.train.seed, epoch)
            loss_sum = torch.zeros((), device=device)
            t_steps = time.perf_counter()
            bar = None
            if cfg.train.progress and self.rank == 0:
                from tqdm import tqdm

                bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{total}", leave=False,
                           dynamic_ncols=True)
            for step, gidx in enumerate(batches):
                gidx_dev = gidx.to(device, non_blocking=True)
                # Draws for the global batch, then this rank's slice: the same views on any device count.
                gen = draw_generator(cfg.train.seed, epoch, step)
                params = [self.views.sample_params(len(gidx), gen) for _ in range(self.method.n_views)]
                part = torch.tensor_split(torch.arange(len(gidx)), self.world)[self.rank]
                idx = gidx_dev[part.to(device)]
                batch = data[idx]
                with fabric.autocast():
                    embeddings = [model(self.views.apply(batch, p[part])) for p in params]
                    per_sample = self.method.batch_loss(embeddings, idx, self.bank)
                # Sum over the local slice / global batch x world: DDP's gradient average then equals
                # the one-process mean over the global batch.
                loss = per_sample.float().sum() * (self.world / len(gidx))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch} step {step}; "
                                             "lower optim.lr")
                optimizer.zero_grad(set_to_none=True)
                fabric.backward(loss)
                optimizer.step()
                all_idx, all_feats = self._gather(idx, embeddings[0].detach().float(), len(gidx))
                self.bank.update(all_idx, all_feats)
                loss_sum += per_sample.detach().float().sum()
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_steps
            step_seconds += dt
            images_seen += self.n
            loss_total = fabric.all_reduce(loss_sum, reduce_op="sum") if self.world > 1 else loss_sum
            record.update(loss=float(loss_total) / self.n, lr=lr, seconds=round(time.perf_counter() - t_epoch, 3),
                          images_per_second=round(self.n / dt, 1))
            if self.world > 1:
                record["bank_identical_across_ranks"] = self._bank_identical()
            history.append(record)
            if self.rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if cfg.train.checkpoint:
                self._save_checkpoint(epoch, optimizer, history)
        return TrainResult(self.net, self.views, self.bank, self.method, time.perf_counter() - t_start,
                           step_seconds, images_seen, total, history)


def bank_knn_top1(bank: Tensor, labels: np.ndarray, cfg: Config) -> float:
    """Leave-one-out weighted kNN on the memory bank (the AND reference code's protocol)."""
    from .evaluate import knn_top1

    t = cfg.eval.knn_temperature or cfg.memory.temperature
    return round(float(knn_top1(bank.float().cpu().numpy(), labels, k=cfg.eval.knn_k, temperature=t)), 4)


@torch.no_grad()
def extract_features(net: EmbeddingNet, views: BatchViews, images: np.ndarray | Tensor, *,
                     batch_size: int = 512, device: str | torch.device = "cpu",
                     layer: str = "backbone") -> tuple[np.ndarray, np.ndarray]:
    """(features of ``layer``, L2-normalised embeddings) of un-augmented images, float32, dataset
    order. ``layer``: "backbone" (the layer before the head), "embedding", or a stage name of the
    backbone (``net.layer_names()``, e.g. "conv5" of AlexNet)."""
    from .errors import ConfigError

    if layer not in net.layer_names():
        raise ConfigError(f"unknown feature layer '{layer}'; this network has: {', '.join(net.layer_names())}")
    data = images if isinstance(images, Tensor) else images_to_tensor(images)
    was_training = net.training
    net.eval()
    feats, embs = [], []
    for start in range(0, data.shape[0], batch_size):
        x = views.plain(data[start:start + batch_size].to(device))
        f, e = net.forward_features(x)
        if layer == "embedding":
            f = e
        elif layer != "backbone":
            f = net.features_at(x, layer)
        feats.append(f.float().cpu())
        embs.append(e.float().cpu())
    net.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(embs).numpy()
