"""The training loop: per epoch, discover structure, then train on it (``methods/base.py`` has the
contract every method fills in).

Written out explicitly so the algorithm reads plainly; Lightning Fabric underneath handles devices,
DDP launch, precision and collectives. One process per device; every process holds the whole
dataset (uint8, on its device) and, for memory-bank methods, the whole bank.

What one process equals N processes (``--devices N``), up to float rounding:
 - the epoch's batches and every augmentation draw come from generators seeded by (seed, epoch,
   step) for the *global* batch; each process takes its contiguous slice;
 - losses are per-row terms summed and scaled by world size / global batch, so DDP's gradient
   average is the one-process mean; pair and triplet terms are taken against the gathered batch;
 - BatchNorm statistics are those of the global batch (``train.sync_batchnorm``, on by default:
   torch's SyncBatchNorm on GPU, ``nets.GlobalBatchNorm`` on CPU); with it off, every process
   normalises by its own slice (the usual DDP semantics) and only BN-free networks equal one process;
 - memory-bank updates gather every process's rows in rank order; the banks are compared by SHA-256
   each epoch (``bank_identical_across_ranks`` in the log);
 - structure is discovered on rank 0 and broadcast.
``--resume`` after a kill gives the same result as an uninterrupted run: the checkpoint (written
atomically after each epoch) holds the network, optimiser, method state (structure, modules, bank),
RNG states, the history of log records and the cumulative timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, EvalConfig, OptimConfig, TrainConfig
from .errors import ConfigError, DataError
from .evaluate import knn_top1
from .io import append_text, ensure_dir, save_text, save_torch
from .methods import DiscoveryContext, FeatureRequest, Method, Step, build_method, build_phase, method_class
from .nets import EmbeddingNet, sync_batchnorm
from .views import BatchViews, ViewSpec, draw_generator

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 2
PASS_BATCH = 512  # images per forward in full feature passes


def make_fabric(train: TrainConfig):
    """A Lightning Fabric for the configured devices (``cfg.train``; DDP when more than one process)."""
    # Imported here, not at the top: importing lightning takes 2.3 s, and at the top it would more than
    # double every command's start-up (``python -X importtime -c "import deepclust.cli"``: 1.5 s -> 3.9 s).
    from lightning.fabric import Fabric

    accelerator = train.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    precision = train.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator in ("cuda", "gpu") else "32-true"
    world = train.devices * train.num_nodes
    strategy = "ddp" if world > 1 else "auto"
    return Fabric(accelerator=accelerator, devices=train.devices, num_nodes=train.num_nodes,
                  strategy=strategy, precision=precision)


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N,H,W) or (N,H,W,3) -> uint8 tensor (N,C,H,W)."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    if t.ndim == 3:
        return t[:, None]
    return t.permute(0, 3, 1, 2).contiguous()


def learning_rate(o: OptimConfig, schedule_epoch: int, iteration: int = 0, length: int | None = None) -> float:
    """The rate of ``optim.schedule``, set per epoch unless said otherwise: ``step``, lr * gamma **
    (milestones passed by the schedule's epoch; ``OptimConfig.milestone_epochs(length)``: fixed
    epochs or fractions of the run); ``cosine``, lr * (1 + cos(pi * epoch / length)) / 2; both with
    an optional linear warm-up. ``length``: the epochs of the run (or round) the schedule spans
    (``Method.schedule_length``), needed by fractions and cosine. ``inv``, Caffe's inverse decay
    lr * (1 + inv_gamma * iteration) ** -inv_power over the run's optimiser steps, set per step (JULE)."""
    if o.schedule == "inv":
        return o.lr * (1.0 + o.inv_gamma * iteration) ** (-o.inv_power)
    if length is None and (o.schedule == "cosine" or (o.milestones is None and o.milestones_frac)):
        raise ValueError("learning_rate: this schedule follows the run's length; pass length")
    if o.schedule == "cosine":
        lr = o.lr * 0.5 * (1.0 + math.cos(math.pi * min(schedule_epoch, length) / max(length, 1)))
    else:
        lr = o.lr * o.gamma ** sum(schedule_epoch >= m for m in o.milestone_epochs(length or 0))
    if o.warmup_epochs and schedule_epoch < o.warmup_epochs:
        lr *= (schedule_epoch + 1) / (o.warmup_epochs + 1)
    return lr


def build_optimizer(o: OptimConfig, params) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optim`` names over ``params``."""
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    if o.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, alpha=0.9, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's content, loaded with ``weights_only=True`` (tensors, numbers, strings, lists and
    dicts only: a file carrying code is refused, never run). DataError in one line otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"no checkpoint at {path}") from None
    except pickle.UnpicklingError:
        raise DataError(f"refusing checkpoint {path}: it holds objects other than tensors and plain "
                        "values (weights-only loading)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read checkpoint {path} (corrupt or truncated): {first[:200]}") from None
    keys = ("format", "epoch", "model", "optimizer", "method", "rng", "config", "history", "timing")
    if not isinstance(state, dict) or any(k not in state for k in keys) or state["format"] != CHECKPOINT_FORMAT:
        raise DataError(f"{path} is not a deepclust checkpoint of this version")
    return state


class TrainModule(nn.Module):
    """The network and the method's own modules as one module (what the optimiser and Fabric see).
    ``forward`` returns the method's taps of the network plus its modules' outputs."""

    def __init__(self, net: EmbeddingNet, method: Method):
        super().__init__()
        self.net = net
        self.method_modules = method.modules
        self._method = method  # a plain attribute: the method object is not a module

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self._method.forward(self.net.taps(x, self._method.taps))


@dataclass
class TrainResult:
    net: EmbeddingNet
    views: BatchViews
    method: Method
    train_seconds: float
    step_seconds: float
    images_seen: int
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    method_clusters: np.ndarray | None = None
    method_map: tuple[str, np.ndarray, np.ndarray] | None = None  # Method.assignment_map()
    phase_map: tuple[str, np.ndarray, np.ndarray] | None = None  # the clustering phase's kept head

    @property
    def bank(self):
        return self.method.bank

    @property
    def images_per_second(self) -> float | None:
        return self.images_seen / self.step_seconds if self.step_seconds > 0 else None


class Trainer:
    """Trains ``cfg.method`` on uint8 images. ``labels`` are optional and only feed diagnostics."""

    def __init__(self, cfg: Config, images: np.ndarray, out_dir: str | Path, *, fabric=None,
                 labels: np.ndarray | None = None, view_spec=None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.fabric = fabric if fabric is not None else make_fabric(cfg.train)
        self.labels = labels
        self.data_cpu = images_to_tensor(images)
        n, c, h, w = self.data_cpu.shape
        self.n = n
        torch.manual_seed(cfg.train.seed)
        self.net = EmbeddingNet(cfg.net.backbone, c, (h, w), dim=cfg.net.dim, sobel=cfg.net.sobel,
                                head=method_class(cfg.method).embedding_head)
        self.views = BatchViews(view_spec if view_spec is not None else ViewSpec(), c)
        shapes = self._tap_shapes()
        self.method = build_method(cfg, n, tap_dims={k: int(np.prod(v)) for k, v in shapes.items()},
                                   tap_shapes=shapes, shallow_layer=self.net.shallow_layer)
        # the learned clustering phase after the method's epochs (``cluster.head: scan``), or None;
        # its heads drawn from a generator of their own: the method's run is the same with or without it
        with preserved_rng():
            torch.manual_seed(cfg.train.seed + 1)
            self.phase = build_phase(cfg, n, tap_dims={k: int(np.prod(v)) for k, v in shapes.items()})
        self.phase_state: dict[str, Any] | None = None  # its optimiser's state read from a checkpoint
        self.phase_optimizer = None
        # cumulative over a resumed run (checkpointed); ``steps`` drives the per-step rate schedules
        self.timing = {"train_seconds": 0.0, "step_seconds": 0.0, "images_seen": 0, "steps": 0}

    def _tap_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every tap, for methods that size their own modules from it."""
        with torch.no_grad():
            was = self.net.training
            self.net.eval()
            x = torch.zeros(1, *self.data_cpu.shape[1:])
            taps = self.net.taps(x, tuple(self.net.layer_names()))
            self.net.train(was)
        return {k: tuple(v.shape[1:]) for k, v in taps.items()}

    # -- collectives -----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    @property
    def world(self) -> int:
        return self.fabric.world_size

    def _slices(self, length: int) -> list[Tensor]:
        return list(torch.tensor_split(torch.arange(length), self.world))

    def _gather_rows(self, t: Tensor, global_rows: int, grad: bool = False) -> Tensor:
        """Rows of every process (contiguous slices of ``global_rows``) in rank order."""
        if self.world == 1:
            return t
        sizes = [len(s) for s in self._slices(global_rows)]
        padded = F.pad(t, (0, 0) * (t.ndim - 1) + (0, max(sizes) - t.shape[0]))
        if grad:
            import torch.distributed.nn.functional as dist_nn

            parts = dist_nn.all_gather(padded)
        else:
            parts = list(self.fabric.all_gather(padded).unbind(0))
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def _identical_across_ranks(self, tensors: list[Tensor]) -> bool:
        """Every replica's tensors bit for bit the same (SHA-256 of their bytes, compared across ranks)."""
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        digests = [None] * self.world
        torch.distributed.all_gather_object(digests, h.hexdigest())
        return len(set(digests)) == 1

    def _replica_checks(self, record: dict[str, Any], stage: Method | None = None) -> None:
        """Every part of the stage's state (bank, structure, own modules) identical on every rank."""
        if self.world == 1:
            return
        state = (stage or self.method).state_dict()
        parts = {"bank": [state["bank"]["features"]] if state["bank"] is not None else [],
                 "structure": [v for _, v in sorted((state["structure"] or {}).items())],
                 "modules": [v for _, v in sorted(state["modules"].items())]}
        for name, tensors in parts.items():
            if tensors:
                record[f"{name}_identical_across_ranks"] = self._identical_across_ranks(tensors)

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoints" / CHECKPOINT_NAME

    def _save_checkpoint(self, epoch: int, optimizer, history) -> None:
        if self.rank == 0:
            path = self.checkpoint_path()
            ensure_dir(path.parent)
            save_torch(path, {
                "format": CHECKPOINT_FORMAT, "epoch": epoch, "model": self.net.state_dict(),
                "optimizer": optimizer.state_dict(), "method": self.method.state_dict(), "rng": _rng_state(),
                "config": self.cfg.to_dict(), "history": history, "timing": dict(self.timing),
                "phase": self.phase.state_dict() if self.phase is not None else None,
                "phase_optimizer": self.phase_optimizer.state_dict() if self.phase_optimizer is not None else None,
            })
        self.fabric.barrier()

    def _load_checkpoint(self, optimizer) -> tuple[int, list]:
        path = self.checkpoint_path()
        state = read_checkpoint(path)
        try:
            self.net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state["method"])
            if self.phase is not None and state.get("phase") is not None:
                self.phase.load_state_dict(state["phase"])
                self.phase_state = state.get("phase_optimizer")
            _set_rng_state(state["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise DataError(f"checkpoint {path} does not fit this run's network or method: "
                            f"{str(e).splitlines()[0][:200]}") from None
        self.timing = {k: state["timing"].get(k, 0) for k in self.timing}
        return int(state["epoch"]) + 1, list(state["history"])

    # -- full passes and discovery -------------------------------------------------------------------
    @torch.no_grad()
    def _full_passes(self, requests: tuple[FeatureRequest, ...], epoch: int,
                     stage: Method | None = None) -> dict[FeatureRequest, Tensor]:
        """Each requested tap over all training images (network in eval mode), shared out over the
        processes and gathered; augmented passes draw one view per image from (seed, epoch)."""
        if not requests:
            return {}
        stage = stage or self.method
        device, out = self.fabric.device, {}
        rows = self._slices(self.n)[self.rank]
        was = self.net.training
        self.net.eval()
        stage.modules.eval()
        layers = set(self.net.layer_names())
        for augmented in sorted({r.augmented for r in requests}):
            taps = tuple(sorted({r.tap for r in requests if r.augmented == augmented}))
            net_taps = tuple(sorted({t for t in taps if t in layers} | set(stage.taps)))
            params = self.views.sample_params(self.n, draw_generator(self.cfg.train.seed, epoch, 9_000_011)) \
                if augmented else None
            parts: dict[str, list[Tensor]] = {t: [] for t in taps}
            for block in torch.split(rows, PASS_BATCH):
                x = self.data[block.to(device)]
                x = self.views.apply(x, params[block].to(device)) if augmented else self.views.plain(x)
                with self.fabric.autocast():
                    got = stage.forward(self.net.taps(x, net_taps))  # network taps + the stage's outputs
                for t in taps:
                    parts[t].append(got[t].float())
            for t in taps:
                out[FeatureRequest(t, augmented)] = self._gather_rows(torch.cat(parts[t]), self.n)
        self.net.train(was)
        stage.modules.train(was)
        return out

    def _context(self, epoch: int, passes, stage: Method | None = None) -> DiscoveryContext:
        return DiscoveryContext(epoch=epoch, n_images=self.n, seed=self.cfg.train.seed, device=self.fabric.device,
                                bank=(stage or self.method).bank, passes=passes, images=self.data)

    def _discover(self, epoch: int, optimizer, record: dict[str, Any], stage: Method | None = None) -> None:
        t0 = time.perf_counter()
        method = stage or self.method
        passes = self._full_passes(method.discovery_features(epoch), epoch, method)
        structure = None
        if self.rank == 0:
            structure = method.discover(self._context(epoch, passes, method))
            if structure is not None and self.world > 1:
                structure = {k: v.cpu() for k, v in structure.items()}
        if self.world > 1:
            structure = self.fabric.broadcast(structure, src=0)
        device = self.fabric.device
        method.set_structure({k: v.to(device) for k, v in structure.items()} if structure is not None else None)
        for p in method.reset_parameters():
            optimizer.state.pop(p, None)
        record["discovery_seconds"] = round(time.perf_counter() - t0, 3)
        if self.rank == 0:
            record.update(method.describe(self.labels))
            if self.labels is not None and method.bank is not None:
                record["bank_knn_top1"] = bank_knn_top1(method.bank.features, self.labels, self.cfg.eval,
                                                       self.cfg.memory.temperature)

    # -- one epoch -------------------------------------------------------------------------------
    def _views(self, epoch: int, step: int, gidx: Tensor, part: Tensor, batch: Tensor, stage: Method | None = None):
        """This rank's views of the global batch: view 0 of every row, views 1.. of the rows the
        method selects; returns (images, rows per view, positions of the extra rows or None)."""
        method, device = stage or self.method, self.fabric.device
        n_views = method.views_at(epoch)
        gen = draw_generator(self.cfg.train.seed, epoch, step)
        # Draws for the global batch, then this rank's slice: the same views on any device count.
        params = [self.views.sample_params(len(gidx), gen) for _ in range(n_views)]
        plain = set(method.plain_views(epoch))

        def make(view: int, x: Tensor, p) -> Tensor:
            return self.views.plain(x) if view in plain else self.views.apply(x, p)

        images = [make(0, batch, params[0][part])]
        extra = None
        if n_views > 1:
            chosen = method.extra_view_rows(epoch, gidx)
            if chosen is not None:
                extra = torch.nonzero(chosen.to(device)[part.to(device)]).flatten()
            rows = extra if extra is not None else slice(None)
            for v, p in enumerate(params[1:], 1):
                local = p[part]
                images.append(make(v, batch[rows], local[extra.cpu()] if extra is not None else local))
        return torch.cat(images) if n_views > 1 else images[0], [len(t) for t in images], extra

    def _step(self, model, optimizer, epoch: int, step: int, gidx: Tensor, stage: Method | None = None) -> Tensor:
        device, method = self.fabric.device, stage or self.method
        part = self._slices(len(gidx))[self.rank]
        gidx_dev = gidx.to(device, non_blocking=True)
        idx = gidx_dev[part.to(device)]
        x, sizes, extra = self._views(epoch, step, gidx, part, self.data[idx], method)
        with self.fabric.autocast():
            out = model(x)  # one forward for all views: one DDP pass, BatchNorm over all views
            outputs = [dict(zip(out, vals)) for vals in zip(*(v.split(sizes) for v in out.values()))]
            s = Step(epoch=epoch, step=step, idx=idx, gidx=gidx_dev, positions=part.to(device), outputs=outputs,
                     bank=method.bank, world=self.world, extra_rows=extra,
                     gather_fn=lambda t, grad: self._gather_rows(t, len(gidx), grad))
            per_sample = method.batch_loss(s)
        # Sum over the local rows / global batch x world: DDP's gradient average is the one-process mean.
        loss = per_sample.float().sum() * (self.world / len(gidx))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch} step {step}; lower optim.lr")
        optimizer.zero_grad(set_to_none=True)
        self.fabric.backward(loss)
        optimizer.step()
        method.after_step(s)
        return per_sample.detach().float().sum()

    def _set_lr(self, optimizer, epoch: int) -> float:
        lr = learning_rate(self.cfg.optim, self.method.schedule_epoch(epoch), int(self.timing["steps"]),
                           self.method.schedule_length(epoch))
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _train_epoch(self, model, optimizer, epoch: int, record: dict[str, Any], stage: Method | None = None) -> None:
        cfg, device, method = self.cfg, self.fabric.device, stage or self.method
        per_step = cfg.optim.schedule == "inv" and stage is None
        lr = self._set_lr(optimizer, epoch) if stage is None else optimizer.param_groups[0]["lr"]  # a phase: constant
        model.train()
        if not method.trains_network():
            self.net.eval()
        batches = method.batches(epoch, self.n, cfg.optim.batch_size, cfg.train.seed)
        loss_sum = torch.zeros((), device=device)
        bar = None
        if cfg.train.progress and self.rank == 0:
            from tqdm import tqdm

            name = f"{method.phase(epoch)} " if stage is not None else ""
            bar = tqdm(total=len(batches), desc=f"{name}epoch {epoch + 1}/{method.total_epochs()}", leave=False,
                       dynamic_ncols=True)
        t_steps = time.perf_counter()
        seen = 0
        for step, gidx in enumerate(batches):
            if per_step and step:
                self._set_lr(optimizer, epoch)
            loss_sum += self._step(model, optimizer, epoch, step, gidx, stage)
            self.timing["steps"] += 1
            seen += len(gidx)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t_steps
        self.timing["step_seconds"] += dt
        self.timing["images_seen"] += seen
        total = self.fabric.all_reduce(loss_sum, reduce_op="sum") if self.world > 1 else loss_sum
        record.update(loss=float(total) / max(seen, 1), lr=lr, images_per_second=round(seen / dt, 1))
        if per_step:
            record["lr_last"] = optimizer.param_groups[0]["lr"]
        self._replica_checks(record, stage)

    # -- the loop --------------------------------------------------------------------------------
    def _setup(self, resume: bool):
        cfg, fabric = self.cfg, self.fabric
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        elif fabric.device.type == "cpu" and self.world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(self.world, os.cpu_count() or 1)))
        module = TrainModule(self.net, self.method)
        if self.world > 1 and cfg.train.sync_batchnorm:  # the network's and the method modules' BatchNorm
            module = sync_batchnorm(module, device=fabric.device)
        optimizer = build_optimizer(cfg.optim, module.parameters())
        start_epoch, history = 0, []
        if resume and self.checkpoint_path().exists():
            start_epoch, history = self._load_checkpoint(optimizer)
        model, optimizer = fabric.setup(module, optimizer)
        if self.method.bank is not None:
            self.method.bank.to(fabric.device)
        self.views.to(fabric.device)
        self.data = self.data_cpu.to(fabric.device)
        if self.method.structure is not None:  # idempotent (methods/base.py): the restored one, on the device
            self.method.set_structure({k: v.to(fabric.device) for k, v in self.method.structure.items()})
        return model, optimizer, start_epoch, history

    def _write_log(self, history: list[dict[str, Any]], append: dict[str, Any] | None = None) -> None:
        """log.jsonl: one record per finished epoch (rewritten from the checkpoint's history on resume,
        so a kill between the log and the checkpoint leaves no duplicate)."""
        if self.rank != 0:
            return
        path = self.out_dir / "log.jsonl"
        if append is None:
            save_text(path, "".join(json.dumps(r) + "\n" for r in history))
        else:
            append_text(path, json.dumps(append) + "\n")

    def fit(self, resume: bool = False) -> TrainResult:
        t_start = time.perf_counter()
        model, optimizer, start_epoch, history = self._setup(resume)
        self.method_optimizer, self.clock = optimizer, (t_start, self.timing["train_seconds"])
        if self.rank == 0:
            ensure_dir(self.out_dir)
            self._write_log(history)
        epoch = start_epoch
        while epoch < self.method.total_epochs():  # re-read: a method's length may follow its structure (JULE)
            self._epoch(model, optimizer, epoch, epoch, history)
            epoch += 1
        method_end = self.method.total_epochs()  # fixed once the method has finished
        if self.phase is not None:  # the learned clustering phase, its epochs numbered on in the log
            phase_model, phase_optimizer = self._setup_phase()
            while epoch < method_end + self.phase.total_epochs():
                self._epoch(phase_model, phase_optimizer, epoch, epoch - method_end, history, self.phase)
                epoch += 1
        clusters = self._final_clusters(method_end)
        phase_map = self._phase_head(epoch) if self.phase is not None else None
        self.timing["train_seconds"] = self.clock[1] + time.perf_counter() - t_start
        return TrainResult(self.net, self.views, self.method, self.timing["train_seconds"],
                           self.timing["step_seconds"], int(self.timing["images_seen"]), method_end, history, clusters,
                           self.method.assignment_map() if self.rank == 0 else None, phase_map)

    def _epoch(self, model, optimizer, epoch: int, local: int, history: list, stage: Method | None = None) -> None:
        """One epoch of the method (``stage`` None) or of the phase (``local``: its epoch within the
        stage): discovery when due, training, the log record, the checkpoint."""
        t_epoch, method = time.perf_counter(), stage or self.method
        record: dict[str, Any] = {"epoch": epoch, "phase": method.phase(local)}
        if method.needs_discovery(local):
            self._discover(local, optimizer, record, stage)
        self._train_epoch(model, optimizer, local, record, stage)
        record["seconds"] = round(time.perf_counter() - t_epoch, 3)
        self.timing["train_seconds"] = self.clock[1] + time.perf_counter() - self.clock[0]
        history.append(record)
        self._write_log(history, append=record)
        if self.cfg.train.checkpoint:
            self._save_checkpoint(epoch, self.method_optimizer, history)

    def _setup_phase(self):
        """The phase's module (the network and its heads) and optimiser (``scan.optimizer`` at the
        phase's constant rate: Adam, SCAN's, by default), its optimiser state restored on resume, set
        up by Fabric as the method's."""
        phase, device = self.phase, self.fabric.device
        module = TrainModule(self.net, phase)
        if self.world > 1 and self.cfg.train.sync_batchnorm:
            module = sync_batchnorm(module, device=device)
        for p in self.net.parameters():
            p.requires_grad_(phase.trains_network())
        if "embedding" not in phase.taps:  # the projection head does not reach the phase's loss (DDP)
            for p in self.net.head.parameters():
                p.requires_grad_(False)
        s = self.cfg.scan
        make = torch.optim.SGD if s.optimizer == "sgd" else torch.optim.Adam
        optimizer = make([p for p in module.parameters() if p.requires_grad], lr=s.lr, weight_decay=s.weight_decay)
        if self.phase_state is not None:
            optimizer.load_state_dict(self.phase_state)
        model, optimizer = self.fabric.setup(module, optimizer)
        self.phase_optimizer = optimizer
        if phase.structure is not None:  # restored by a resume: on the device (idempotent)
            phase.set_structure({k: v.to(device) for k, v in phase.structure.items()})
        return model, optimizer

    def _phase_head(self, epoch: int) -> tuple[str, np.ndarray, np.ndarray] | None:
        """The phase's kept head (rank 0), read off a full pass of its predictions."""
        passes = self._full_passes(self.phase.final_features(), epoch, self.phase)
        if self.rank != 0:
            return None
        self.phase.final_clusters(self._context(epoch, passes, self.phase))
        return self.phase.assignment_map()

    def _final_clusters(self, epoch: int) -> np.ndarray | None:
        passes = self._full_passes(self.method.final_features(), epoch)
        if self.rank != 0:
            return None
        labels = self.method.final_clusters(self._context(epoch, passes))
        return None if labels is None else np.asarray(labels, dtype=np.int64)


def bank_knn_top1(bank: Tensor, labels: np.ndarray, ev: EvalConfig, bank_temperature: float) -> float:
    """Leave-one-out weighted kNN on the memory bank (the AND reference code's protocol); T is
    ``eval.knn_temperature`` or the bank's."""
    t = ev.knn_temperature or bank_temperature
    return round(float(knn_top1(bank.float().cpu().numpy(), labels, k=ev.knn_k, temperature=t)), 4)


@torch.no_grad()
def extract_features(net: EmbeddingNet, views: BatchViews, images: np.ndarray | Tensor, *,
                     batch_size: int = 512, device: str | torch.device = "cpu",
                     layer: str = "backbone") -> tuple[np.ndarray, np.ndarray]:
    """(features of ``layer``, L2-normalised embeddings) of un-augmented images, float32, dataset
    order. ``layer``: "backbone" (the layer before the head), "embedding", or a stage name of the
    backbone (``net.layer_names()``, e.g. "conv5" of AlexNet)."""
    if layer not in net.layer_names():
        raise ConfigError(f"unknown feature layer '{layer}'; this network has: {', '.join(net.layer_names())}")
    data = images if isinstance(images, Tensor) else images_to_tensor(images)
    was_training = net.training
    net.eval()
    feats, embs = [], []
    for start in range(0, data.shape[0], batch_size):
        x = views.plain(data[start:start + batch_size].to(device))
        taps = net.taps(x, tuple({layer, "embedding"}))
        feats.append(taps[layer].flatten(1).float().cpu())
        embs.append(taps["embedding"].float().cpu())
    net.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(embs).numpy()


# ----------------------------------------------------------------------------------------------
# Timing the training on this machine (the time budget, ``budget.py``)


@contextlib.contextmanager
def preserved_rng():
    """The global RNG states (torch, numpy, python) as they were before the block, afterwards."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


class TrainingProbe:
    """A :class:`Trainer`'s training steps and discoveries, timed one at a time with nothing written:
    the trainer is set up as for a fresh run, the steps are epoch 0's batches in order, and a
    discovery runs as the loop runs it (with the label diagnostics it logs). The batches are drawn at
    the first step and again after each discovery (DeepCluster samples them uniformly over the
    pseudo-labels its discovery makes: drawn before it, a budgeted DeepCluster run failed). Training
    changes the global RNG states: measure inside :func:`preserved_rng`."""

    def __init__(self, trainer: Trainer, clock=time.perf_counter):
        self.trainer, self.clock = trainer, clock
        self.model, self.optimizer, _, _ = trainer._setup(resume=False)
        self.steps = 0
        self.phase_parts, self.phase_steps = None, 0
        self.batch_cache: dict[tuple[bool, int], list[Tensor]] = {}  # (phase?, epoch) -> its batches
        self.model.train()

    def _batches(self, epoch: int, stage: Method | None = None) -> list[Tensor]:
        """The batches of the method's (``stage`` None) or the phase's ``epoch``, drawn once per
        structure as the loop draws them: they may need it (DeepCluster samples uniformly over its
        pseudo-labels, SCAN pairs anchors with their mined neighbours), so a discovery drops them."""
        key = (stage is not None, epoch)
        if key not in self.batch_cache:
            cfg = self.trainer.cfg
            self.batch_cache[key] = (stage or self.trainer.method).batches(epoch, self.trainer.n,
                                                                          cfg.optim.batch_size, cfg.train.seed)
        return self.batch_cache[key]

    def _timed(self, work) -> float:
        """Seconds of ``work()`` on this clock, the device synchronised before the reading."""
        t = self.clock()
        work()
        if self.trainer.fabric.device.type == "cuda":
            torch.cuda.synchronize()
        return self.clock() - t

    def time_step(self, epoch: int = 0) -> tuple[int, float]:
        """(images, seconds) of the next training step as ``epoch`` trains it (its views and loss,
        with the structure the method holds; the batches are epoch 0's): forward, loss, backward,
        optimiser step and the method's bank update."""
        batches = self._batches(0)
        gidx = batches[self.steps % len(batches)]
        seconds = self._timed(lambda: self.trainer._step(self.model, self.optimizer, epoch, self.steps, gidx))
        self.steps += 1
        return len(gidx), seconds

    def time_discovery(self, epoch: int) -> float:
        """Seconds of the structure discovery of ``epoch`` on the current state."""
        self.batch_cache.pop((False, 0), None)  # a new structure: the batches are drawn again
        return self._timed(lambda: self.trainer._discover(epoch, self.optimizer, {}))

    # the learned clustering phase after the method (``cluster.head: scan``), timed the same way
    def _phase(self):
        if self.phase_parts is None:  # set up as the loop sets it up after the method's epochs
            self.phase_parts = self.trainer._setup_phase()
        return self.phase_parts

    def time_phase_discovery(self, local: int) -> float:
        """Seconds of the phase's discovery of its epoch ``local`` (SCAN: mining the neighbours)."""
        _, optimizer = self._phase()
        self.batch_cache.pop((True, local), None)  # a new structure: its batches are drawn again
        return self._timed(lambda: self.trainer._discover(local, optimizer, {}, self.trainer.phase))

    def phase_batches(self, local: int) -> list[Tensor]:
        """The phase's batches of its epoch ``local`` (they need its structure: discover first)."""
        return self._batches(local, self.trainer.phase)

    def time_phase_step(self, local: int) -> tuple[int, float]:
        """(images, seconds) of the phase's next step of its epoch ``local``."""
        model, optimizer = self._phase()
        batches = self.phase_batches(local)
        gidx = batches[self.phase_steps % len(batches)]
        seconds = self._timed(lambda: self.trainer._step(model, optimizer, local, self.phase_steps, gidx,
                                                         self.trainer.phase))
        self.phase_steps += 1
        return len(gidx), seconds

    def time_phase_head(self, epoch: int) -> float:
        """Seconds of the full pass that reads the phase's kept head after its last epoch."""
        return self._timed(lambda: self.trainer._phase_head(epoch))

    def checkpoint_seconds(self) -> float:
        """Seconds to serialise an epoch's checkpoint (network, optimiser, method), in memory."""
        return self._timed(lambda: torch.save({"model": self.trainer.net.state_dict(),
                                               "optimizer": self.optimizer.state_dict(),
                                               "method": self.trainer.method.state_dict()}, io.BytesIO()))
