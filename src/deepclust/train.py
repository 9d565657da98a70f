"""The training loop: a run is a list of methods trained one after another on one network (the
configured method, then those the configuration adds, ``methods.run_methods``); per epoch, a method
discovers structure, then trains on it (``methods/base.py`` has the contract every method fills in).

Written out explicitly so the algorithm reads plainly; Lightning Fabric underneath handles devices,
DDP launch, precision and collectives. One process per device; every process holds the whole
dataset (uint8, on its device) -- or, when it does not fit, reads its rows of each batch from a store
on disk ahead of the step (``imagesource.py``; the same rows either way) -- and, for memory-bank
methods, the whole bank.

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
atomically after each epoch) holds the network, each method's state (structure, modules, bank) and
optimiser state under its name, RNG states, the history of log records and the cumulative timings.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
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

from .config import Config, EvalConfig, TrainConfig
from .durations import format_seconds
from .errors import ConfigError, DataError
from .evaluate import knn_top1
from .heads import OwnClusters
from .imagesource import image_source, images_to_tensor
from .io import append_text, ensure_dir, save_text, save_torch
from .methods import DiscoveryContext, FeatureRequest, Method, Step, build_network, run_methods
from .nets import EmbeddingNet, sync_batchnorm
from .views import BatchViews, ViewSpec, draw_generator

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 3
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
    if world > 1:
        atexit.unregister(close_process_group)  # one entry however many runs a process makes
        atexit.register(close_process_group)
    try:
        return Fabric(accelerator=accelerator, devices=train.devices, num_nodes=train.num_nodes,
                      strategy=strategy, precision=precision)
    except (ValueError, RuntimeError) as e:  # e.g. SLURM's tasks per node other than --devices
        raise ConfigError(f"cannot start {world} process(es) on {accelerator}: {str(e).splitlines()[0].strip()}") from None


def close_process_group() -> None:
    """Destroy the DDP process group before the interpreter's teardown. Left to the C++ destructors,
    gloo's threads can still be joinable there and abort a process whose run has finished (SIGABRT,
    'terminate called without an active exception': one rank in about six of the contract's
    two-process runs on this machine)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()




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


@contextlib.contextmanager
def preserved_rng():
    """The global RNG states (torch, numpy, python) as they were before the block, afterwards."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


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
    keys = ("format", "epoch", "model", "methods", "optimizers", "rng", "config", "history", "timing")
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
class Training:
    """A method set up to train (:meth:`Trainer.begin`): the network with the method's modules as
    one module, and its optimiser, both set up by Fabric."""

    method: Method
    model: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class TrainResult:
    net: EmbeddingNet
    views: BatchViews
    method: Method
    train_seconds: float
    step_seconds: float
    images_seen: int
    epochs: int  # the configured method's
    history: list[dict[str, Any]] = field(default_factory=list)
    # each method's own clusters (final clusters, assignment map), by the cluster head that reads them
    # (``methods.run_methods``); empty ones on ranks other than 0
    own: dict[str, OwnClusters] = field(default_factory=dict)

    @property
    def bank(self):
        return self.method.bank

    @property
    def images_per_second(self) -> float | None:
        return self.images_seen / self.step_seconds if self.step_seconds > 0 else None


class Trainer:
    """Trains the run's methods (``cfg.method``, then those the configuration adds) on uint8 images
    (an array, or a store's images read on demand: ``imagesource.image_source``).
    ``labels`` are optional and only feed diagnostics.

    Its public steps, which :meth:`fit` strings together and the time budget times one at a time
    (``calibration.TrainingProbe``): :meth:`start`, :meth:`begin` for each method in turn,
    :meth:`discover` and :meth:`step` within its epochs, :meth:`final` after the last."""

    def __init__(self, cfg: Config, images: np.ndarray, out_dir: str | Path, *, fabric=None,
                 labels: np.ndarray | None = None, view_spec=None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.fabric = fabric if fabric is not None else make_fabric(cfg.train)
        self.labels = labels
        self.images = image_source(images)
        n, c, h, w = self.images.shape
        self.n = n
        torch.manual_seed(cfg.train.seed)
        run = run_methods(cfg)
        self.cluster_heads, classes = list(run), list(run.values())  # what reads each one's own clusters
        self.net = build_network(cfg, (c, h, w))
        self.views = BatchViews(view_spec if view_spec is not None else ViewSpec(), c)
        shapes = self.net.tap_shapes()
        info = {"tap_shapes": shapes, "shallow_layer": self.net.shallow_layer}
        dims = {k: int(np.prod(v)) for k, v in shapes.items()}
        self.methods: list[Method] = [classes[0](cfg, n, dims, **info)]
        for place, cls in enumerate(classes[1:], 1):  # parameters from a generator of their own
            with preserved_rng():  # (seed + place): the run before them is the same with or without them
                torch.manual_seed(cfg.train.seed + place)
                self.methods.append(cls(cfg, n, dims, **info))
        self.optimizers: dict[int, torch.optim.Optimizer] = {}  # place in the run -> optimiser, once begun
        self.saved_optimizers: dict[str, Any] = {}  # name -> optimiser state read from a checkpoint
        # cumulative over a resumed run (checkpointed); ``steps`` drives the per-step rate schedules
        self.timing = {"train_seconds": 0.0, "step_seconds": 0.0, "images_seen": 0, "steps": 0}
        self.epoch_seconds: list[float] = []  # this process's last epochs (discovery included), for the bar

    @property
    def method(self) -> Method:
        """The configured method, the run's first."""
        return self.methods[0]

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

    def _replica_checks(self, record: dict[str, Any], method: Method) -> None:
        """Every part of the method's state (bank, structure, own modules) identical on every rank."""
        if self.world == 1:
            return
        state = method.state_dict()
        parts = {"bank": [state["bank"]["features"]] if state["bank"] is not None else [],
                 "structure": [v for _, v in sorted((state["structure"] or {}).items())],
                 "modules": [v for _, v in sorted(state["modules"].items())]}
        for name, tensors in parts.items():
            if tensors:
                record[f"{name}_identical_across_ranks"] = self._identical_across_ranks(tensors)

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoints" / CHECKPOINT_NAME

    def checkpoint_state(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint after ``epoch`` (tensors and plain values): the network, each method's state
        and its optimiser's (None before it begins) under the method's name, the RNG states, the
        configuration, the log's records and the cumulative counters."""
        optimizers = {m.name: self.optimizers[i].state_dict() if i in self.optimizers
                      else self.saved_optimizers.get(m.name) for i, m in enumerate(self.methods)}
        return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": self.net.state_dict(),
                "methods": {m.name: m.state_dict() for m in self.methods}, "optimizers": optimizers,
                "rng": _rng_state(), "config": self.cfg.to_dict(), "history": history, "timing": dict(self.timing)}

    def _save_checkpoint(self, epoch: int, history: list[dict[str, Any]]) -> None:
        if self.rank == 0:
            path = self.checkpoint_path()
            ensure_dir(path.parent)
            save_torch(path, self.checkpoint_state(epoch, history))
        self.fabric.barrier()

    def _misfit(self, error: Exception) -> DataError:
        return DataError(f"checkpoint {self.checkpoint_path()} does not fit this run's network or methods: "
                         f"{str(error).splitlines()[0][:200] if str(error) else type(error).__name__}")

    def _load_checkpoint(self) -> tuple[int, list]:
        """The network, every method's state and the RNG states from the checkpoint; the optimisers'
        states are kept until each method begins."""
        state = read_checkpoint(self.checkpoint_path())
        try:
            self.net.load_state_dict(state["model"])
            for method in self.methods:
                method.load_state_dict(state["methods"][method.name])
                self.saved_optimizers[method.name] = state["optimizers"][method.name]
            _set_rng_state(state["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise self._misfit(e) from None
        self.timing = {k: state["timing"].get(k, 0) for k in self.timing}
        return int(state["epoch"]) + 1, list(state["history"])

    # -- full passes and discovery -------------------------------------------------------------------
    @torch.no_grad()
    def _full_passes(self, method: Method, requests: tuple[FeatureRequest, ...],
                     epoch: int) -> dict[FeatureRequest, Tensor]:
        """Each requested tap over all training images (network in eval mode), shared out over the
        processes and gathered; augmented passes draw one view per image from (seed, epoch)."""
        if not requests:
            return {}
        device, out = self.fabric.device, {}
        rows = self._slices(self.n)[self.rank]
        was, was_modules = self.net.training, method.modules.training
        self.net.eval()
        method.modules.eval()
        layers = set(self.net.layer_names())
        for augmented in sorted({r.augmented for r in requests}):
            taps = tuple(sorted({r.tap for r in requests if r.augmented == augmented}))
            net_taps = tuple(sorted({t for t in taps if t in layers} | set(method.taps)))
            params = self.views.sample_params(self.n, draw_generator(self.cfg.train.seed, epoch, 9_000_011)) \
                if augmented else None
            parts: dict[str, list[Tensor]] = {t: [] for t in taps}
            blocks = list(torch.split(rows, PASS_BATCH))
            with contextlib.closing(self.images.reader(blocks)) as reader:
                for block, x in zip(blocks, reader):
                    x = self.views.apply(x, params[block].to(device)) if augmented else self.views.plain(x)
                    with self.fabric.autocast():
                        got = method.forward(self.net.taps(x, net_taps))  # network taps + the method's outputs
                    for t in taps:
                        parts[t].append(got[t].float())
            for t in taps:
                out[FeatureRequest(t, augmented)] = self._gather_rows(torch.cat(parts[t]), self.n)
        self.net.train(was)
        method.modules.train(was_modules)
        return out

    def _context(self, method: Method, epoch: int, passes) -> DiscoveryContext:
        return DiscoveryContext(epoch=epoch, n_images=self.n, seed=self.cfg.train.seed, device=self.fabric.device,
                                bank=method.bank, passes=passes, images=self.images.tensor)

    def discover(self, t: Training, epoch: int, record: dict[str, Any] | None = None) -> None:
        """The method's structure discovery of its ``epoch``: full passes on every rank, ``discover``
        on rank 0, broadcast, ``set_structure`` everywhere, the optimiser state of re-initialised
        parameters dropped; its seconds and diagnostics (with the labels, when given) into ``record``."""
        t0, method, record = time.perf_counter(), t.method, {} if record is None else record
        passes = self._full_passes(method, method.discovery_features(epoch), epoch)
        structure = None
        if self.rank == 0:
            structure = method.discover(self._context(method, epoch, passes))
            if structure is not None and self.world > 1:
                structure = {k: v.cpu() for k, v in structure.items()}
        if self.world > 1:
            structure = self.fabric.broadcast(structure, src=0)
        device = self.fabric.device
        method.set_structure({k: v.to(device) for k, v in structure.items()} if structure is not None else None)
        for p in method.reset_parameters():
            t.optimizer.state.pop(p, None)
        record["discovery_seconds"] = round(time.perf_counter() - t0, 3)
        if self.rank == 0:
            record.update(method.describe(self.labels))
            if self.labels is not None and method.bank is not None:
                record["bank_knn_top1"] = bank_knn_top1(method.bank.features, self.labels, self.cfg.eval,
                                                       self.cfg.memory.temperature)

    # -- one epoch -------------------------------------------------------------------------------
    def _views(self, method: Method, epoch: int, step: int, gidx: Tensor, part: Tensor, batch: Tensor):
        """This rank's views of the global batch: view 0 of every row, views 1.. of the rows the
        method selects; returns (images, rows per view, positions of the extra rows or None)."""
        device = self.fabric.device
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

    def local_rows(self, gidx: Tensor) -> Tensor:
        """This rank's rows of the global batch ``gidx`` (its contiguous slice)."""
        return gidx[self._slices(len(gidx))[self.rank]]

    def step(self, t: Training, epoch: int, step: int, gidx: Tensor, batch: Tensor | None = None) -> Tensor:
        """One optimiser step of the method's ``epoch`` on the global batch ``gidx`` (this rank's
        slice): views, forward, loss, backward, step, ``after_step``. Returns the local loss sum.
        ``batch``: this rank's images of it, read ahead (``imagesource``); None: read now."""
        device, method = self.fabric.device, t.method
        part = self._slices(len(gidx))[self.rank]
        gidx_dev = gidx.to(device, non_blocking=True)
        idx = gidx_dev[part.to(device)]
        batch = self.images.rows(idx) if batch is None else batch
        x, sizes, extra = self._views(method, epoch, step, gidx, part, batch)
        with self.fabric.autocast():
            out = t.model(x)  # one forward for all views: one DDP pass, BatchNorm over all views
            outputs = [dict(zip(out, vals)) for vals in zip(*(v.split(sizes) for v in out.values()))]
            s = Step(epoch=epoch, step=step, idx=idx, gidx=gidx_dev, positions=part.to(device), outputs=outputs,
                     bank=method.bank, world=self.world, extra_rows=extra,
                     gather_fn=lambda x, grad: self._gather_rows(x, len(gidx), grad))
            per_sample = method.batch_loss(s)
        # Sum over the local rows / global batch x world: DDP's gradient average is the one-process mean.
        loss = per_sample.float().sum() * (self.world / len(gidx))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch} step {step}; lower optim.lr")
        t.optimizer.zero_grad(set_to_none=True)
        self.fabric.backward(loss)
        t.optimizer.step()
        method.after_step(s)
        return per_sample.detach().float().sum()

    def _set_rate(self, t: Training, epoch: int) -> float:
        lr = t.method.learning_rate(epoch, int(self.timing["steps"]))
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _train_mode(self, t: Training) -> None:
        t.model.train()
        if not t.method.trains_network():
            self.net.eval()

    def _progress(self, method: Method, epoch: int, images: int, record: dict[str, Any]):
        """The epoch's bar on rank 0: images and images/s, the epoch's time left, and after it the
        epoch's discovery time and the method's time left at the mean epoch so far."""
        if not (self.cfg.train.progress and self.rank == 0):
            return None
        from tqdm import tqdm

        name = f"{method.phase(epoch)} " if method.phase(epoch) else ""
        bar = tqdm(total=images, unit="img", unit_scale=True, desc=f"{name}epoch {epoch + 1}/{method.total_epochs()}",
                   leave=False, dynamic_ncols=True)
        post = {}
        if "discovery_seconds" in record:
            post["discovery"] = format_seconds(record["discovery_seconds"])
        if self.epoch_seconds:
            left = (method.total_epochs() - epoch) * sum(self.epoch_seconds) / len(self.epoch_seconds)
            post["left"] = "~" + format_seconds(left)
        bar.set_postfix(post, refresh=False)
        return bar

    def _train_epoch(self, t: Training, epoch: int, record: dict[str, Any]) -> None:
        cfg, device, method = self.cfg, self.fabric.device, t.method
        per_step = method.rate_per_step()
        lr = self._set_rate(t, epoch)
        self._train_mode(t)
        batches = method.batches(epoch, self.n, cfg.optim.batch_size, cfg.train.seed)
        loss_sum = torch.zeros((), device=device)
        bar = self._progress(method, epoch, sum(len(g) for g in batches), record)
        t_steps = time.perf_counter()
        seen = 0
        with contextlib.closing(self.images.reader([self.local_rows(gidx) for gidx in batches])) as reader:
            for step, (gidx, batch) in enumerate(zip(batches, reader)):
                if per_step and step:
                    self._set_rate(t, epoch)
                loss_sum += self.step(t, epoch, step, gidx, batch)
                self.timing["steps"] += 1
                seen += len(gidx)
                if bar is not None:
                    bar.update(len(gidx))
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
            record["lr_last"] = t.optimizer.param_groups[0]["lr"]
        self._replica_checks(record, method)

    # -- the loop --------------------------------------------------------------------------------
    def start(self, resume: bool) -> tuple[int, list[dict[str, Any]]]:
        """Ready the run: threads; on ``resume`` the checkpoint's network, methods' states, RNG states
        and counters; the images and views on the device. Returns (the run's next epoch, its log
        records so far)."""
        cfg, fabric = self.cfg, self.fabric
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        elif fabric.device.type == "cpu" and self.world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(self.world, os.cpu_count() or 1)))
        start_epoch, history = 0, []
        if resume and self.checkpoint_path().exists():
            start_epoch, history = self._load_checkpoint()
        self.views.to(fabric.device)
        self.images.to(fabric.device)
        return start_epoch, history

    def begin(self, place: int) -> Training:
        """Set up the run's method at ``place`` to train: the network's parameters it trains (the
        others frozen, ``Method.network_parameters``), its optimiser (``Method.make_optimizer``) with
        the checkpoint's state on resume, both set up by Fabric, its bank and structure on the device,
        in training mode."""
        method, device = self.methods[place], self.fabric.device
        module = TrainModule(self.net, method)
        if self.world > 1 and self.cfg.train.sync_batchnorm:  # the network's and the method modules' BatchNorm
            module = sync_batchnorm(module, device=device)
        trained = {id(p) for p in method.network_parameters(self.net)}
        for p in self.net.parameters():
            p.requires_grad_(id(p) in trained)
        optimizer = method.make_optimizer([p for p in module.parameters() if p.requires_grad])
        if self.saved_optimizers.get(method.name) is not None:
            try:
                optimizer.load_state_dict(self.saved_optimizers[method.name])
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
                raise self._misfit(e) from None
        model, optimizer = self.fabric.setup(module, optimizer)
        self.optimizers[place] = optimizer
        if method.bank is not None:
            method.bank.to(device)
        if method.structure is not None:  # idempotent (methods/base.py): the restored one, on the device
            method.set_structure({k: v.to(device) for k, v in method.structure.items()})
        t = Training(method, model, optimizer)
        self._train_mode(t)
        return t

    def _write_log(self, history: list[dict[str, Any]], append: dict[str, Any] | None = None) -> None:
        """log.jsonl: one record per finished epoch (rewritten from the checkpoint's history on resume,
        so a kill between the log and the checkpoint leaves no duplicate)."""
        if self.rank != 0:
            return
        path = self.out_dir / "log.jsonl"
        if append is None:  # the run's start: its directory made if it is not there yet
            ensure_dir(self.out_dir)
            save_text(path, "".join(json.dumps(r) + "\n" for r in history))
        else:
            append_text(path, json.dumps(append) + "\n")

    def fit(self, resume: bool = False) -> TrainResult:
        """Train each method of the run in turn, its epochs numbered on in the log; then each one's
        final clusters, read after all have trained."""
        t_start = time.perf_counter()
        epoch, history = self.start(resume)
        self.clock = (t_start, self.timing["train_seconds"])
        self._write_log(history)
        ends, first = [], 0  # the run's epoch at which each method ends; the current one's first
        for place, method in enumerate(self.methods):
            t = self.begin(place)
            while epoch < first + method.total_epochs():  # re-read: a length may follow the structure (JULE)
                self._epoch(t, epoch, epoch - first, history)
                epoch += 1
            first += method.total_epochs()  # fixed once the method has finished
            ends.append(first)
        own = {head: self.final(method, end) for head, method, end in zip(self.cluster_heads, self.methods, ends)}
        self.timing["train_seconds"] = self.clock[1] + time.perf_counter() - t_start
        return TrainResult(self.net, self.views, self.method, self.timing["train_seconds"],
                           self.timing["step_seconds"], int(self.timing["images_seen"]), ends[0], history, own)

    def _epoch(self, t: Training, epoch: int, local: int, history: list) -> None:
        """The run's ``epoch``, the method's ``local`` one: discovery when due, training, the log
        record, the checkpoint."""
        t_epoch, method = time.perf_counter(), t.method
        record: dict[str, Any] = {"epoch": epoch, "phase": method.phase(local)}
        if method.needs_discovery(local):
            self.discover(t, local, record)
        self._train_epoch(t, local, record)
        record["seconds"] = round(time.perf_counter() - t_epoch, 3)
        self.epoch_seconds = [*self.epoch_seconds[-4:], record["seconds"]]  # the bar's time left: the last 5
        self.timing["train_seconds"] = self.clock[1] + time.perf_counter() - self.clock[0]
        history.append(record)
        self._write_log(history, append=record)
        if self.cfg.train.checkpoint:
            self._save_checkpoint(epoch, history)

    def final(self, method: Method, epoch: int) -> OwnClusters:
        """The method's own clusters on rank 0: its final clusters of the training images (or None),
        read off full passes of its ``final_features`` after the run's ``epoch``, and its
        ``assignment_map``; empty on the other ranks, which share the passes."""
        passes = self._full_passes(method, method.final_features(), epoch)
        if self.rank != 0:
            return OwnClusters()
        labels = method.final_clusters(self._context(method, epoch, passes))
        return OwnClusters(None if labels is None else np.asarray(labels, dtype=np.int64), method.assignment_map())


def bank_knn_top1(bank: Tensor, labels: np.ndarray, ev: EvalConfig, bank_temperature: float) -> float:
    """Leave-one-out weighted kNN on the memory bank (the AND reference code's protocol); T is
    ``eval.knn_temperature`` or the bank's."""
    t = ev.knn_temperature or bank_temperature
    return round(float(knn_top1(bank.float().cpu().numpy(), labels, k=ev.knn_k, temperature=t)), 4)


@torch.no_grad()
def extract_features(net: EmbeddingNet, views: BatchViews, images, *,
                     batch_size: int = 512, device: str | torch.device = "cpu",
                     layer: str = "backbone") -> tuple[np.ndarray, np.ndarray]:
    """(features of ``layer``, L2-normalised embeddings) of un-augmented images, float32, dataset
    order. ``layer``: "backbone" (the layer before the head), "embedding", or a layer name of the
    backbone (``net.layer_names()``, e.g. "conv5" of AlexNet). ``images`` may be a store's (read block
    by block, ahead: ``imagesource``)."""
    if layer not in net.layer_names():
        raise ConfigError(f"unknown feature layer '{layer}'; this network has: {', '.join(net.layer_names())}")
    if isinstance(images, (Tensor, np.ndarray)):
        data = images if isinstance(images, Tensor) else images_to_tensor(images)
        blocks = (data[start:start + batch_size] for start in range(0, data.shape[0], batch_size))
    else:
        blocks = image_source(images).reader(list(torch.split(torch.arange(len(images)), batch_size)))
    was_training = net.training
    net.eval()
    feats, embs = [], []
    for block in blocks:
        x = views.plain(block.to(device))
        taps = net.taps(x, tuple({layer, "embedding"}))
        feats.append(taps[layer].flatten(1).float().cpu())
        embs.append(taps["embedding"].float().cpu())
    net.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(embs).numpy()
