"""The memory bank: one L2-normalised embedding per training image (N x D).

Shared by instance discrimination, AND, PAD and PCP. Each step the batch's fresh embeddings are
compared with the whole bank (a non-parametric softmax, Wu et al. 2018 / AND Eq 2), and after the
optimiser step the bank rows of the batch are moved towards the fresh embeddings (AND Eq 8, PAD Eq 6).

Distributed training: every process holds the whole bank. The training loop gathers the features and
indices of all processes before :meth:`MemoryBank.update`, so every replica applies the same update
in the same order and the banks stay identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .precision import similarities


class MemoryBank(nn.Module):
    """N x D bank of L2-normalised features with an exponential moving average update."""

    def __init__(self, n: int, dim: int, *, temperature: float = 0.1, eta: float = 0.5, seed: int = 0):
        super().__init__()
        self.n, self.dim = n, dim
        self.temperature = temperature
        self.eta = eta
        g = torch.Generator().manual_seed(seed)
        # Random start as in the reference code (uniform in [-1/sqrt(D/3), 1/sqrt(D/3)]), normalised.
        init = torch.rand(n, dim, generator=g).mul_(2).sub_(1)
        self.register_buffer("features", F.normalize(init, dim=1))
        # NCE's normalisation constant Z (Wu et al. 2018 Eq 5), estimated once on the first batch.
        self.register_buffer("nce_z", torch.zeros(()))

    def logits(self, x: Tensor) -> Tensor:
        """x: (B, D) normalised -> (B, N) similarities / T in float32 (also under bf16 autocast); the
        bank takes no gradient."""
        return similarities(x, self.features, self.temperature)

    def probabilities_of(self, x: Tensor) -> Tensor:
        """Row-wise softmax p_ij of AND Eq 2 for a batch (B, N)."""
        return torch.softmax(self.logits(x), dim=1)

    @torch.no_grad()
    def update(self, idx: Tensor, x: Tensor) -> None:
        """AND Eq 8: bank[i] = (1 - eta) * bank[i] + eta * x_i, then re-normalised.

        Rows listed twice in ``idx`` take the last occurrence's value (same result on every replica).
        """
        idx = idx.to(self.features.device)
        x = x.detach().to(self.features.device, self.features.dtype)
        mixed = (1.0 - self.eta) * self.features.index_select(0, idx) + self.eta * x
        self.features.index_copy_(0, idx, F.normalize(mixed, dim=1))

    @torch.no_grad()
    def fill(self, features: Tensor) -> None:
        """Replace the whole bank (e.g. by features of a fresh pass over the data)."""
        self.features.copy_(F.normalize(features.to(self.features), dim=1))

    def nce_loss(self, x: Tensor, idx: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """Noise-contrastive estimate of the instance loss (Wu et al. 2018, Eq 5-7), for large N.

        The true bank row of each sample is the positive; ``k`` rows drawn uniformly are noise.
        Returns the per-sample loss (B,).
        """
        b = x.shape[0]
        noise = torch.randint(0, self.n, (b, k), generator=generator, device="cpu").to(idx.device)
        rows = torch.cat([idx[:, None], noise], dim=1)  # (B, 1+k)
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 (see precision.py)
            w = self.features[rows].float()  # (B, 1+k, D)
            scores = torch.exp(torch.einsum("bd,bkd->bk", x.float(), w) / self.temperature)
        if float(self.nce_z) == 0.0:
            with torch.no_grad():
                z = scores.mean() * self.n
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(z)
                    z /= torch.distributed.get_world_size()
                self.nce_z.fill_(float(z))
        p = scores / self.nce_z
        pn = k / self.n  # k * P_noise with uniform noise
        eps = 1e-7
        log_pos = torch.log(p[:, 0] / (p[:, 0] + pn + eps))
        log_neg = torch.log(pn / (p[:, 1:] + pn + eps)).sum(dim=1)
        return -(log_pos + log_neg)

