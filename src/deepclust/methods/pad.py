"""PAD: Progressive Affinity Diffusion (Zhang, Dong & Gong, "Unsupervised Deep Learning via
Affinity Diffusion", AAAI 2020).

Each epoch (Algorithm 1): the kNN affinity graph of the memory bank (Eq 1: k = 5, cosine, the
sample itself excluded), then the strongly connected subgraphs (SCS) of that graph (section
"Affinity Diffusion across Neighbourhoods", Fig 3; ``structure.scs``, which writes down its own
choices), from a start order drawn from the (seed, epoch) generator; every sample outside an SCS is
its own group. The loss is Eq 5 = Eq 3 (group loss over the bank's softmax, Eq 2) + lambda Eq 4
(hard positive enhancement, HPE), ``losses/pad.py``; the bank update is Eq 6, the loop's default
``after_step`` (``MemoryBank.update``: (1 - eta) x~_i + eta x_i with eta = ``memory.eta`` = 0.5,
then L2 re-normalisation as in Wu et al. / AND: Eq 2's affinity is a cosine). The method's own
clusters: none (the paper clusters with k-means afterwards, Table 2; ``cluster.head``).

The authors published no code; this is a first public implementation. Choices the paper leaves open:
 - Start (``start_epoch``, default 1): the paper gives no instance-discrimination warm-up ("PAD
   starts with a randomly initialised CNN") and builds the graph at the top of every epoch. At
   epoch 0 the bank is still its random initialisation (``memory.py``), whose kNN graph says
   nothing about the images, so its SCS would be random groups; discovery therefore starts at
   epoch 1, once every bank row has been written by the network. Epoch 0 trains every sample as an
   isolated one (Eq 3 = instance loss, HPE against a second view). ``start_epoch: 0`` is the
   literal Algorithm 1.
 - The hard positive of a sample in a group is the member (other than itself) with the smallest
   affinity p_ij to the sample's fresh feature, i.e. the smallest term of Eq 3's sum, chosen anew at
   every step; its prediction p_hp is the softmax of its *memory* feature x~_hp against the bank
   (Eq 2): the member is usually not in the batch and the SCS themselves are found on memory
   features ("for efficiency concern"), so its bank row is the feature at hand. A bank row carries
   no gradient: Eq 4 then pulls p_i towards p_hp.
 - The hard positive of an isolated sample is "a randomly transformed variant": a second view of
   the same image from the same augmentation (a fresh forward). The gradient flows through both
   sides of Eq 4, as printed (the paper detaches neither); ``hpe_detach_view`` stops it at the
   view. Eq 4's direction is KL(p_i || p_hp) as printed.
 - The second view is only made for the samples that need it: ``views_at`` is 1 when HPE is off,
   with diffusion off (every kNN group has members) and in an epoch whose SCS leave no sample
   isolated; otherwise ``extra_view_rows`` asks the loop for second views of the isolated rows only
   (about 1.15x the work of one view once most samples are grouped, not 2x). Their draws are still
   made for the whole global batch, so they do not depend on the selection or the process count.
 - Diffusion off (Table 3): C(x) = {x} + its ``knn_group_size`` = 10 nearest neighbours from the
   same bank kNN; its hard positive is the farthest of them, as in an SCS.
 - Not stated, taken from Wu et al. 2018 / AND (on which PAD builds, Eq 2 and Eq 6): temperature
   T = 0.1, weight decay 5e-4, batch 128, feature dimension 128; groups are fixed within an epoch.
 - The HPE "feature cosine similarity" variant (Table 5) is 1 - cos(x_i, x_hp) with the same x_hp.
 - Diagnostics (Fig 4, log only): number, coverage, mean and largest size of the SCS; with labels
   their precision (fraction of members in their SCS's majority class) and pair precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import option
from ..errors import ConfigError
from ..losses.pad import hard_positive, hpe_cosine_loss, hpe_kl_loss, scs_loss
from ..structure.knn import topk_cosine
from ..structure.purification import batch_members, member_table
from ..structure.scs import scs_quality, strongly_connected_subgraphs
from .base import DiscoveryContext, Method, Step, Structure


@dataclass
class PadOptions:
    """PAD (Zhang et al., AAAI 2020); every ablation of Tables 3-6 is a combination of these."""

    neighbours: int = option(5, low=1)  # k of Eq 1 ("Implementation details"; Table 6: 1, 3, 5, 10)
    max_size: int | None = option(10, low=1)  # scale threshold s (Table 6: 5..100); None: off (Table 4)
    cyclic: bool = True  # the cyclic constraint (Table 4)
    diffusion: bool = True  # False: C(x) = x + its knn_group_size nearest neighbours (Table 3)
    knn_group_size: int = option(10, low=1)  # k of the diffusion-off ablation (Table 3: 10)
    hpe: str = option("kl", choices=("kl", "cosine", "off"))  # Eq 4 (Table 5: KL / FCS / off)
    hpe_weight: float = option(0.8, low=0, high=100)  # lambda of Eq 5 (Table 6: 0.2, 0.5, 0.8, 1.0)
    hpe_detach_view: bool = False  # stop the gradient at an isolated sample's second view
    start_epoch: int = option(1, low=0)  # first epoch with SCS discovery (see the docstring)


class Pad(Method):
    name = "pad"
    needs_k_to_train = False  # SCS groups of the bank kNN graph, never K
    Options = PadOptions
    n_views = 2
    # Development data (issue 29): agglomeration of the embedding's kNN graph (heads.agglomerative_labels,
    # JULE's merges with the small-cluster rule). USPS, pad-cpu, 3 seeds (accuracy-pad-usps-heads):
    # ACC 0.979 +- 0.001 against 0.932 +- 0.087 for spectral on the embedding with K eigenvectors (the
    # earlier default, dev-choices-*.json); digits, --budget 2m, 3 seeds (backbone-budget-digits):
    # NMI 0.913 against 0.889. The spectral head stays one --cluster-head away. Since then the graph
    # head (heads.graph_labels): that partition (size-aware since issue 42) unless spectral
    # clustering's wins both of its label-free judges, the silhouette on the features and the
    # split-half stability (benchmarks/weak_features.py, digits and USPS).
    cluster_head = ("graph", "embedding", 1)

    def __init__(self, cfg, n_images: int, tap_dims: dict[str, int] | None = None, **net_info):
        super().__init__(cfg, n_images, tap_dims, **net_info)
        self._table: tuple[Tensor, Tensor] | None = None  # SCS members in CSR layout (members, offsets)
        self._isolated = True  # does the current structure leave any sample on its own?

    @classmethod
    def check_data(cls, options: PadOptions, n_images: int) -> None:
        name, k = ("neighbours", options.neighbours) if options.diffusion else \
            ("knn_group_size", options.knn_group_size)
        if k >= n_images:
            raise ConfigError(f"options.{name} (k={k}) must be smaller than the number of images (N={n_images})")

    # -- schedule -------------------------------------------------------------------------------
    def phase(self, epoch: int) -> str:
        return "pad" if epoch >= self.options.start_epoch else "instance"

    def views_at(self, epoch: int) -> int:
        if self.options.hpe == "off":
            return 1
        if epoch < self.options.start_epoch or self.structure is None:
            return 2  # every sample isolated: HPE against a second view
        return 2 if self._isolated else 1

    def extra_view_rows(self, epoch: int, gidx: Tensor) -> Tensor | None:
        """Only isolated samples use a second view (PAD Eq 4): the others' hard positive is a group
        member's memory feature."""
        if self._table is None or self.structure is None or "groups" not in self.structure:
            return None
        members, offsets = self._table
        groups = self.structure["groups"]
        g = groups.to(gidx.device)[gidx]
        return (offsets[1:] - offsets[:-1]).to(gidx.device)[g] == 1

    # -- structure ------------------------------------------------------------------------------
    @classmethod
    def discovers_at(cls, cfg, epoch: int) -> bool:
        return epoch >= cfg.options.start_epoch  # Algorithm 1: every epoch

    def discover(self, ctx: DiscoveryContext) -> Structure:
        o = self.options
        bank = ctx.bank.features
        k = o.neighbours if o.diffusion else o.knn_group_size
        _, nbrs = topk_cosine(bank, bank, k, exclude_self=True)  # PAD Eq 1 (nearest first)
        nbrs = nbrs.cpu()
        if not o.diffusion:
            return {"neighbours": nbrs}  # Table 3: C(x) = N_k(x) + x
        order = torch.randperm(self.n_images, generator=ctx.generator(1)).numpy()  # "a random vertex"
        groups = strongly_connected_subgraphs(nbrs.numpy(), max_size=o.max_size, cyclic=o.cyclic,
                                              order=order)  # PAD Fig 3
        return {"groups": torch.from_numpy(groups)}

    def set_structure(self, structure: Structure | None) -> None:
        super().set_structure(structure)
        self._table, self._isolated = None, True
        if structure is None:
            return
        if "neighbours" in structure:
            self._isolated = False
            return
        groups = structure["groups"]
        members, offsets = member_table(groups.cpu().numpy())
        dev = groups.device
        self._table = (torch.from_numpy(members).to(dev), torch.from_numpy(offsets).to(dev))
        self._isolated = bool((offsets[1:] - offsets[:-1] == 1).any())

    def _members(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """C(x_i) of the batch rows as a padded (B, M) index array and mask, the row itself included."""
        s = self.structure
        if s is None:  # before discovery every sample is its own group
            return idx[:, None], torch.ones(idx.numel(), 1, dtype=torch.bool, device=idx.device)
        if "neighbours" in s:
            members = torch.cat([idx[:, None], s["neighbours"].to(idx.device)[idx]], dim=1)
            return members, torch.ones_like(members, dtype=torch.bool)
        members, offsets = self._table
        return batch_members(s["groups"], members, offsets, idx)

    # -- loss -----------------------------------------------------------------------------------
    def batch_loss(self, step: Step) -> Tensor:
        o, bank, idx = self.options, step.bank, step.idx
        x = step.outputs[0]["embedding"]
        logits = bank.logits(x)
        members, mask = self._members(idx)
        loss = scs_loss(logits, members, mask)  # PAD Eq 3
        if o.hpe == "off":
            return loss
        hp, found = hard_positive(logits, members, mask, idx)  # PAD Eq 4's x_hp
        x_hp = bank.features[hp].to(x.dtype)  # memory feature of the hardest group member
        if len(step.outputs) > 1:  # isolated samples: their second view (made for those rows only)
            view = step.outputs[1]["embedding"]
            view = view.detach() if o.hpe_detach_view else view
            if step.extra_rows is None:  # every row has a second view; the grouped ones ignore it
                x_hp = torch.where(found[:, None], x_hp, view.to(x_hp.dtype))
            else:  # views of the isolated rows only
                x_hp = x_hp.index_copy(0, step.extra_rows, view.to(x_hp.dtype))
        elif not bool(found.all()):
            raise RuntimeError("PAD: an isolated sample in a one-view epoch (views_at is out of step)")
        if o.hpe == "kl":
            hpe = hpe_kl_loss(logits, bank.logits(x_hp))  # PAD Eq 4
        else:
            hpe = hpe_cosine_loss(x, x_hp)  # Table 5's FCS
        return loss + o.hpe_weight * hpe  # PAD Eq 5

    # -- diagnostics ----------------------------------------------------------------------------
    def describe(self, labels: np.ndarray | None) -> dict[str, Any]:
        """PAD Fig 4: SCS count, coverage, mean / largest size; with labels, their precision."""
        s = self.structure
        if s is None:
            return {}
        if "neighbours" in s:
            nbrs = s["neighbours"].cpu().numpy()
            out: dict[str, Any] = {"group_mean_size": nbrs.shape[1] + 1}
            if labels is not None:
                lab = np.asarray(labels)
                out["group_precision"] = round(float((lab[nbrs] == lab[:, None]).mean()), 4)
            return out
        groups = s["groups"].cpu().numpy()
        q = scs_quality(groups, labels if labels is not None else np.zeros_like(groups))
        out = {"scs_count": q.n_scs, "scs_coverage": round(q.coverage, 4),
               "scs_mean_size": _rounded(q.mean_size), "scs_max_size": q.max_size}
        if labels is not None:
            out.update(scs_precision=_rounded(q.precision), scs_pair_precision=_rounded(q.pair_precision))
        return out


def _rounded(v: float) -> float | None:
    return None if v != v else round(float(v), 4)  # NaN (no SCS) -> null in the JSON log
