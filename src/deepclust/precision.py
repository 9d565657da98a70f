"""Similarities in float32 whatever the autocast context.

Under bf16 autocast (the GPU presets' default) a matrix product is computed in bf16 even when its
inputs are float32: 8 bits of mantissa, so cosine similarities near 1 collapse (0.95 and 0.953 are
the same number) and softmax logits over a memory bank lose the differences they rank by. Every
similarity that feeds a logit or is compared with a threshold goes through :func:`similarities`,
which turns autocast off for the product and computes it in at least float32 (float64 stays, for
gradient checks). Gradients flow as usual.
"""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_float32(x: Tensor) -> Tensor:
    """bf16 / fp16 up to float32; float32 and float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def similarities(a: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """(n, d) x (m, d) -> (n, m) = a . b^T / scale, in at least float32 with autocast off."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        a32, b32 = at_least_float32(a), at_least_float32(b)
        dtype = torch.promote_types(a32.dtype, b32.dtype)
        out = a32.to(dtype) @ b32.to(dtype).t()
        return out / scale if scale != 1.0 else out
