"""Batched random augmentations ("views") of uint8 image tensors, on any device.

Training keeps the whole data set in memory as a uint8 tensor ``(N, C, H, W)`` on the training
device. Each step indexes a batch and turns it into random views with **one batched call**: no
per-image Python, no PIL, so the same code runs on CPU and GPU.

How a view is made (:meth:`BatchViews.apply`):

1. ``uint8 -> float32 in [0, 1]``.
2. Geometry: ONE affine matrix per sample composes the random resized crop (area fraction, aspect
   ratio, offset; torchvision's ``RandomResizedCrop`` rule including its 10 tries and centre-crop
   fallback, but with continuous instead of whole-pixel boxes), the horizontal flip, the rotation,
   the shift and the isotropic rescale. One ``F.affine_grid`` + ``F.grid_sample`` (bilinear,
   ``align_corners=False``) applies it. Padding is ``"border"`` by default (``ViewSpec.padding_mode``):
   rotated / shifted corners repeat the edge pixels like the Keras ``ImageDataGenerator``
   (``fill_mode="nearest"``) the DCCM code used, instead of inventing black corners that a network
   can use as a cue. For MNIST-like data (black background) the two modes agree anyway.
   Fast paths: no geometric augmentation skips the resampling entirely; a flip-only spec flips by
   indexing (exact).
3. Colour (per-sample factors, fixed order brightness -> contrast -> saturation -> hue, each followed
   by a clamp to [0, 1] as in torchvision): brightness scales, contrast blends with the image's mean
   grey level, saturation blends with the grey image, hue rotates the chroma plane in YIQ space (a
   cheap linear stand-in for torchvision's HSV hue shift), then an additive channel shift (DCCM's
   Keras ``channel_shift_range``), then random greyscale by a per-sample mask. Saturation, hue and
   greyscale are no-ops for 1-channel images.
4. Normalise with the spec's per-channel mean / std (default 0.5 / 0.5, i.e. to [-1, 1]).

Randomness and reproducibility
------------------------------
Every random number is drawn by :meth:`BatchViews.sample_params` from the given
``torch.Generator`` as tensors shaped ``(B,)`` or ``(B, k)``, in a fixed order, *before* any image
work. ``forward(images, generator)`` is exactly ``apply(images, sample_params(len(images),
generator))``, so the same generator state and the same batch give the same output, bit for bit.

Multi-device training: draw the parameters for the **global** batch on every rank (the same
generator seed on every rank, e.g. ``draw_generator(seed, epoch, step)``) and slice them::

    params = views.sample_params(global_batch_size, draw_generator(seed, epoch, step, device="cpu"))
    local = views.apply(data[global_idx[lo:hi]], params[lo:hi])

``apply`` treats every sample independently, so ``local`` equals rows ``lo:hi`` of the views of the
whole global batch made on one device, whatever the device count. (Calling ``views(batch,
generator=gen)`` on the full global batch on every rank and slicing the result gives the same rows
too, at the cost of augmenting the whole global batch on every rank.) Note that the draws depend on
the generator's device type (CPU and CUDA generators are different streams): a CPU generator makes
the views identical on CPU and GPU machines, for a negligible cost (the parameters are a few
``(B,)`` tensors).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ViewSpec", "ViewParams", "VIEW_PRESETS", "BatchViews", "draw_generator"]

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ (NTSC) and back, for the hue rotation.
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.595716, -0.274453, -0.321263), (0.211456, -0.522591, 0.311135))
_CROP_TRIES = 10  # torchvision RandomResizedCrop tries this many boxes before its fallback


@dataclass
class ViewSpec:
    """What augmentation to apply. Plain data; the config layer builds it (``VIEW_PRESETS``)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # random resized crop area fraction; (1, 1) disables
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range (w/h) of the crop box
    flip: bool = False  # horizontal flip with p = 0.5
    rotation: float = 0.0  # max degrees; angle uniform in [-r, r]
    shift: float = 0.0  # max translation as a fraction of the size, uniform per axis in [-s, s]
    rescale: tuple[float, float] = (1.0, 1.0)  # extra isotropic zoom range (>1 enlarges the content)
    color_jitter: float = 0.0  # brightness/contrast/saturation strength j: factors in [1-j, 1+j]
    grayscale_p: float = 0.0  # probability of converting an RGB view to grey
    mean: Optional[tuple[float, ...]] = None  # per-channel normalisation after aug (None: 0.5)
    std: Optional[tuple[float, ...]] = None  # (None: 0.5)
    hue: float = 0.0  # hue shift in turns, uniform in [-h, h] (h <= 0.5); torchvision's ColorJitter hue
    channel_shift: float = 0.0  # additive shift in [-s, s] (of the [0, 1] range), same for all channels
    padding_mode: str = "border"  # grid_sample padding outside the image: "border" | "zeros" | "reflection"

    @property
    def crop(self) -> bool:
        return tuple(self.crop_scale) != (1.0, 1.0)

    @property
    def geometric(self) -> bool:
        """True when the spec moves pixels (crop, flip, rotation, shift or rescale)."""
        return (self.crop or self.flip or self.rotation > 0 or self.shift > 0
                or tuple(self.rescale) != (1.0, 1.0))



VIEW_PRESETS: dict[str, ViewSpec] = {
    # Identity: only the uint8 -> float conversion and normalisation.
    "none": ViewSpec(crop_scale=(1.0, 1.0)),
    # AND / Instance discrimination on natural images, as the AND reference code's configs/base.yaml
    # (and Wu et al. 2018's lemniscate cifar.py): RandomResizedCrop(scale=(0.2, 1)),
    # ColorJitter(0.4, 0.4, 0.4, 0.4), RandomGrayscale(0.2); AND's base.yaml comments the flip out.
    "natural": ViewSpec(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), color_jitter=0.4, hue=0.4,
                        grayscale_p=0.2),
    # Hand-written digits (MNIST / USPS / sklearn digits): a small affine jitter and a mild crop;
    # no flip (digits are not mirror-symmetric) and no colour.
    "digits": ViewSpec(crop_scale=(0.85, 1.0), crop_ratio=(0.9, 1.1), rotation=12.0, shift=0.1,
                       rescale=(0.9, 1.1)),
    # DCCM: "rotation, shift, rescale, etc." (ICCV 2019, Sec. 4); values from the authors' code
    # (Keras ImageDataGenerator: rotation_range=20, width/height_shift_range=0.18,
    # zoom_range=[0.85, 1.15], horizontal_flip=True, channel_shift_range=0.1). Keras zooms the two
    # axes independently; here the zoom is isotropic.
    "dccm": ViewSpec(crop_scale=(1.0, 1.0), flip=True, rotation=20.0, shift=0.18, rescale=(0.85, 1.15),
                     channel_shift=0.1),
}


@dataclass
class ViewParams:
    """The random draws for a batch of views, every field shaped ``(B,)`` or ``(B, k)`` (None: off).

    Indexing (``params[lo:hi]``, or with an index tensor) selects samples, which is how a rank takes
    its slice of the draws made for the global batch.
    """

    crop_area: Optional[Tensor] = None  # (B, 10) area fractions of the candidate boxes
    crop_log_ratio: Optional[Tensor] = None  # (B, 10) log aspect ratios of the candidates
    crop_offset: Optional[Tensor] = None  # (B, 2) position of the box in the free space, in [0, 1]
    flip: Optional[Tensor] = None  # (B,) bool
    angle: Optional[Tensor] = None  # (B,) radians, counter-clockwise as displayed
    shift: Optional[Tensor] = None  # (B, 2) (x, y) fractions of the output width / height
    scale: Optional[Tensor] = None  # (B,) zoom factor
    brightness: Optional[Tensor] = None  # (B,)
    contrast: Optional[Tensor] = None  # (B,)
    saturation: Optional[Tensor] = None  # (B,)
    hue: Optional[Tensor] = None  # (B,) turns
    channel_shift: Optional[Tensor] = None  # (B,)
    gray: Optional[Tensor] = None  # (B,) bool

    def _tensors(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def batch_size_or(self, default: int) -> int:
        """The number of samples the draws are for (``default`` when nothing was drawn)."""
        for t in self._tensors().values():
            if t is not None:
                return int(t.shape[0])
        return default

    def __getitem__(self, index) -> "ViewParams":
        return ViewParams(**{k: (v[index] if v is not None else None) for k, v in self._tensors().items()})

    def to(self, device: torch.device | str) -> "ViewParams":
        return ViewParams(**{k: (v.to(device) if v is not None else None) for k, v in self._tensors().items()})


def draw_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, *keys)``, e.g. ``(seed, epoch, step)``.

    The tuple is hashed (BLAKE2b) into a 63-bit seed, so nearby keys give unrelated streams and the
    result does not depend on the process, the rank or the device count.
    """
    packed = struct.pack(f"<{1 + len(keys)}q", int(seed), *(int(k) for k in keys))
    value = int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(value)
    return gen


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator | None,
             device: torch.device) -> Tensor:
    return torch.rand(shape, generator=gen, device=device).mul_(high - low).add_(low)


class BatchViews(torch.nn.Module):
    """Makes random views of uint8 image batches in one batched call (see the module docstring).

    ``channels`` is the images' channel count (1 or 3); ``out_size`` an optional (h, w) output size
    (default: the input size). The module has no parameters, only the normalisation buffers, so
    ``.to(device)`` moves them next to the data.
    """

    def __init__(self, spec: ViewSpec, channels: int, out_size: tuple[int, int] | None = None):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"BatchViews supports 1 or 3 channels, got {channels}")
        if spec.padding_mode not in ("zeros", "border", "reflection"):
            raise ValueError(f"unknown padding_mode {spec.padding_mode!r}")
        if not 0 <= spec.hue <= 0.5:
            raise ValueError(f"hue must be within [0, 0.5], got {spec.hue}")
        self.spec = replace(spec)
        self.channels = channels
        self.out_size = tuple(out_size) if out_size is not None else None
        mean = self._per_channel(spec.mean, "mean")
        std = self._per_channel(spec.std, "std")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1),
                             persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        yiq = torch.tensor(_RGB2YIQ, dtype=torch.float64)
        self.register_buffer("yiq", yiq.float(), persistent=False)
        self.register_buffer("yiq_inv", torch.linalg.inv(yiq).float(), persistent=False)

    def _per_channel(self, value: tuple[float, ...] | None, name: str) -> tuple[float, ...]:
        if value is None:
            return (0.5,) * self.channels
        value = tuple(float(v) for v in value)
        if len(value) == 1:
            return value * self.channels
        if len(value) != self.channels:
            raise ValueError(f"{name} has {len(value)} values for {self.channels} channel(s)")
        return value

    def extra_repr(self) -> str:
        return f"channels={self.channels}, out_size={self.out_size}, spec={self.spec}"

    # -- randomness ---------------------------------------------------------------------------
    def sample_params(self, batch_size: int, generator: torch.Generator | None = None) -> ViewParams:
        """All random draws for ``batch_size`` views, on the generator's device (CPU if None).

        Each field is drawn for the whole batch at once, in a fixed order; the draws only depend on
        the spec, ``batch_size`` and the generator state.
        """
        s, b = self.spec, batch_size
        dev = generator.device if generator is not None else torch.device("cpu")
        g = generator
        p = ViewParams()
        if s.crop:
            lo, hi = s.crop_scale
            p.crop_area = _uniform((b, _CROP_TRIES), lo, hi, g, dev)
            p.crop_log_ratio = _uniform((b, _CROP_TRIES), math.log(s.crop_ratio[0]), math.log(s.crop_ratio[1]), g, dev)
            p.crop_offset = torch.rand((b, 2), generator=g, device=dev)
        if s.flip:
            p.flip = torch.rand((b,), generator=g, device=dev) < 0.5
        if s.rotation > 0:
            r = math.radians(s.rotation)
            p.angle = _uniform((b,), -r, r, g, dev)
        if s.shift > 0:
            p.shift = _uniform((b, 2), -s.shift, s.shift, g, dev)
        if tuple(s.rescale) != (1.0, 1.0):
            p.scale = _uniform((b,), s.rescale[0], s.rescale[1], g, dev)
        j = s.color_jitter
        if j > 0:
            p.brightness = _uniform((b,), max(0.0, 1 - j), 1 + j, g, dev)
            p.contrast = _uniform((b,), max(0.0, 1 - j), 1 + j, g, dev)
            if self.channels == 3:
                p.saturation = _uniform((b,), max(0.0, 1 - j), 1 + j, g, dev)
        if s.hue > 0 and self.channels == 3:
            p.hue = _uniform((b,), -s.hue, s.hue, g, dev)
        if s.channel_shift > 0:
            p.channel_shift = _uniform((b,), -s.channel_shift, s.channel_shift, g, dev)
        if s.grayscale_p > 0 and self.channels == 3:
            p.gray = torch.rand((b,), generator=g, device=dev) < s.grayscale_p
        return p

    # -- public entry points -----------------------------------------------------------------
    def forward(self, images_uint8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Random views: (B, C, H, W) uint8 on any device -> (B, C, h, w) float32, normalised."""
        return self.apply(images_uint8, self.sample_params(images_uint8.shape[0], generator))

    @torch.no_grad()
    def plain(self, images_uint8: Tensor) -> Tensor:
        """No augmentation: the same conversion (and resize to ``out_size``) and normalisation."""
        x = self._to_float(images_uint8)
        if self.out_size is not None and tuple(x.shape[-2:]) != self.out_size:
            if x.shape[0] == 0:
                return x.new_empty((0, x.shape[1], *self.out_size))
            x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False, antialias=True)
        return self._normalise(x)

    @torch.no_grad()
    def apply(self, images_uint8: Tensor, params: ViewParams) -> Tensor:
        """Views of ``images_uint8`` with the given draws (``params`` has one row per image)."""
        x = self._to_float(images_uint8)
        b = x.shape[0]
        nb = params.batch_size_or(b)
        if nb != b:
            raise ValueError(f"params are for {nb} images, the batch has {b}")
        p = params.to(x.device)
        out_hw = self.out_size or (x.shape[-2], x.shape[-1])
        if b == 0:  # e.g. PAD's second views when no row of the batch is isolated
            return x.new_empty((0, x.shape[1], *out_hw))
        if any(t is not None for t in (p.crop_area, p.angle, p.shift, p.scale)):  # needs resampling
            theta = self._theta(p, (x.shape[-2], x.shape[-1]), out_hw)
            grid = F.affine_grid(theta, [b, x.shape[1], out_hw[0], out_hw[1]], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.spec.padding_mode,
                              align_corners=False)
        else:
            if p.flip is not None:  # exact, no resampling
                x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
            if self.out_size is not None and tuple(x.shape[-2:]) != self.out_size:
                x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False,
                                  antialias=True)
        x = self._colour(x, p)
        return self._normalise(x)

    # -- internals ----------------------------------------------------------------------------
    @staticmethod
    def _to_float(images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images.float().div_(255.0)
        return images.to(torch.float32, copy=True)  # already in [0, 1]; copied, ops below are in place

    def _normalise(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channel(s), got {x.shape[1]}")
        return x.sub_(self.mean).div_(self.std)

    def _crop_boxes(self, p: ViewParams, in_hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """torchvision RandomResizedCrop.get_params, vectorised and continuous: (cx, cy, w, h) with
        the centre in normalised [-1, 1] coordinates and w, h as fractions of the input size."""
        H, W = in_hw
        area = p.crop_area * (H * W)
        ratio = torch.exp(p.crop_log_ratio)
        w = torch.sqrt(area * ratio)
        h = torch.sqrt(area / ratio)
        valid = (w <= W) & (h <= H)
        first = valid.float().argmax(dim=1, keepdim=True)  # first valid try (0 if none)
        any_valid = valid.any(dim=1)
        w = w.gather(1, first).squeeze(1)
        h = h.gather(1, first).squeeze(1)
        # Fallback (no valid try): the central box with the ratio clamped into range.
        lo, hi = self.spec.crop_ratio
        in_ratio = W / H
        if in_ratio < lo:
            fw, fh = float(W), W / lo
        elif in_ratio > hi:
            fw, fh = H * hi, float(H)
        else:
            fw, fh = float(W), float(H)
        w = torch.where(any_valid, w, torch.full_like(w, fw))
        h = torch.where(any_valid, h, torch.full_like(h, fh))
        ox = torch.where(any_valid, p.crop_offset[:, 0], torch.full_like(w, 0.5))
        oy = torch.where(any_valid, p.crop_offset[:, 1], torch.full_like(h, 0.5))
        left = ox * (W - w)
        top = oy * (H - h)
        cx = (left + w / 2) / W * 2 - 1
        cy = (top + h / 2) / H * 2 - 1
        return cx, cy, w / W, h / H

    def _theta(self, p: ViewParams, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
        """(B, 2, 3) affine_grid matrices: output normalised coords -> input normalised coords.

        For an output point u (normalised), with P = diag(w_out/2, h_out/2) (pixel aspect):
            src = P^-1 R(angle)^-1 (P u - t) / zoom     rotation / shift / zoom of the output frame
            src = diag(flip, 1) src                      horizontal flip
            in  = c + diag(crop_w, crop_h) src           random resized crop box (c: its centre)
        """
        ref = next(t for t in (p.crop_area, p.flip, p.angle, p.shift, p.scale) if t is not None)
        b, dev = ref.shape[0], ref.device
        ho, wo = out_hw
        ones = torch.ones(b, device=dev)
        zeros = torch.zeros(b, device=dev)
        # Linear part L = P^-1 R^-1 P / zoom, R counter-clockwise on screen (y points down).
        if p.angle is not None:
            cos, sin = torch.cos(p.angle), torch.sin(p.angle)
        else:
            cos, sin = ones, zeros
        zoom = p.scale if p.scale is not None else ones
        a = wo / ho
        l00, l01 = cos / zoom, -sin / a / zoom
        l10, l11 = sin * a / zoom, cos / zoom
        # Translation part -L P^-1 t, t in pixels = shift * size, so P^-1 t = 2 * shift.
        if p.shift is not None:
            tx, ty = 2 * p.shift[:, 0], 2 * p.shift[:, 1]
            t0 = -(l00 * tx + l01 * ty)
            t1 = -(l10 * tx + l11 * ty)
        else:
            t0, t1 = zeros, zeros
        if p.flip is not None:
            f = torch.where(p.flip, -ones, ones)
            l00, l01, t0 = l00 * f, l01 * f, t0 * f
        if p.crop_area is not None:
            cx, cy, sw, sh = self._crop_boxes(p, in_hw)
            l00, l01, t0 = l00 * sw, l01 * sw, t0 * sw + cx
            l10, l11, t1 = l10 * sh, l11 * sh, t1 * sh + cy
        return torch.stack([torch.stack([l00, l01, t0], 1), torch.stack([l10, l11, t1], 1)], 1)

    def _gray(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            return x
        return (x * self.luma).sum(dim=1, keepdim=True)

    def _colour(self, x: Tensor, p: ViewParams) -> Tensor:
        if p.brightness is not None:
            x = x.mul_(p.brightness.view(-1, 1, 1, 1)).clamp_(0, 1)
        if p.contrast is not None:
            c = p.contrast.view(-1, 1, 1, 1)
            m = self._gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = x.mul_(c).add_((1 - c) * m).clamp_(0, 1)
        if p.saturation is not None and x.shape[1] == 3:
            s = p.saturation.view(-1, 1, 1, 1)
            x = x.mul_(s).add_((1 - s) * self._gray(x)).clamp_(0, 1)
        if p.hue is not None and x.shape[1] == 3:
            x = torch.einsum("bij,bjhw->bihw", self._hue_matrices(p.hue), x).clamp_(0, 1)
        if p.channel_shift is not None:
            x = x.add_(p.channel_shift.view(-1, 1, 1, 1)).clamp_(0, 1)
        if p.gray is not None and x.shape[1] == 3:
            x = torch.where(p.gray.view(-1, 1, 1, 1), self._gray(x).expand_as(x), x)
        return x

    def _hue_matrices(self, hue: Tensor) -> Tensor:
        """(B, 3, 3) RGB -> RGB matrices rotating the IQ chroma plane by ``hue`` turns."""
        ang = hue * (2 * math.pi)
        cos, sin = torch.cos(ang), torch.sin(ang)
        one, zero = torch.ones_like(ang), torch.zeros_like(ang)
        rot = torch.stack([torch.stack([one, zero, zero], 1),
                           torch.stack([zero, cos, -sin], 1),
                           torch.stack([zero, sin, cos], 1)], 1)
        return self.yiq_inv.to(hue.device) @ rot @ self.yiq.to(hue.device)
