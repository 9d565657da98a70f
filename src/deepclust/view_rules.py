"""Views chosen from the pixels: which augmentations suit a data set nobody here has seen.

:func:`choose_views` reads only pixels -- no labels, no data-set name -- of a bounded random sample
(at most :data:`SAMPLE_SIZE` images, reduced by area averaging to at most 32 x 32 for the border
statistic and 16 x 16 for the others) and decides four things, each from one statistic with a
stated threshold:

**Colour or grey.** ``chroma``: the mean absolute difference between each channel and the luma
(ITU-R 601), in [0, 1] units, over the sample. Colour when the images have 3 channels and
``chroma >= CHROMA_THRESHOLD`` (1/255: below one grey level of colour, RGB images are grey images
stored as RGB). Colour images get the colour jitter and random greyscale of the ``natural`` preset
(AND / Wu et al. 2018: ColorJitter 0.4 incl. hue, RandomGrayscale 0.2); grey images get none.

**Left-right flips.** A flip is a good augmentation when a mirrored image is still an image of the
data set (a mirrored shoe or photo is; a mirrored 2 is not a digit). Test it directly: for each
sampled image ``q`` (pixels centred and L2-normalised per image, so cosine = correlation), compare
``s_orig`` = the cosine similarity of ``q``'s nearest neighbour among the *other* sampled images
with ``s_flip`` = that of the *mirrored* ``q`` among the same other images.
``flip_win_rate`` = P(s_flip > s_orig), ties counting one half.

 - If mirroring keeps an image in the data distribution, the mirrored image and the original are
   exchangeable draws for this comparison, so each wins half the time: rate 0.5 (exactly
   symmetric images tie: 0.5 as well).
 - If the mirrored image is implausible it lies off the data manifold, further from every real
   image than real images are from each other: it (nearly) always loses, rate about 0.

A data set in which a fraction ``p`` of the images stays plausible when mirrored therefore has a
rate of about ``p / 2``. **Flip when the rate is >= FLIP_THRESHOLD = 0.25**, i.e. when the majority
of the images (p >= 1/2) stays plausible mirrored. The constant follows from this argument, not
from any data set's accuracy. Checked (``tests/test_view_rules.py``) only on development data --
scikit-learn's digits 0.03 and USPS 0.12 (no flip) -- and on images made there: symmetric shapes
0.48, asymmetric glyphs 0.07-0.14, the same glyphs each mirrored with probability 1/2 0.49,
non-overlapping tiles of scikit-learn's two sample photographs 0.47, textured scenes 0.47.
Limitation: a data set made of near-duplicates (overlapping crops of a few photographs, video
frames) reads as "no flip", because each original has a near-twin that its mirror image lacks
(1,000 overlapping crops of the two sample photographs: 0.19).

**Object on a plain background, or a scene.** ``plain_border``: for each image, the fraction of its
outer ring of pixels (grey, at most 32 x 32) within ``BORDER_TOLERANCE`` of the ring's
median; the data set's value is the median over the sample. **Plain when plain_border >=
PLAIN_THRESHOLD = 0.5**: the typical image's border is mostly one flat level. ``BORDER_TOLERANCE``
= 2/255: "flat" means constant up to the rounding and compression noise of 8-bit images (the
area averaging to 32 x 32 lowers sensor noise further), so scanned or rendered backgrounds (digits,
clothing, icons, studio shots) are flat, while photographed scenes are not -- not even skies, whose
smooth gradients move by more than two grey levels along a border (seen: digits 0.71, USPS 0.83,
synthetic shapes and glyphs 1.0; photograph tiles 0.16, textured scenes 0.05). Objects on a plain background
get the geometric jitter of the ``digits`` preset (rotation 12 degrees, shift 0.1, rescale
0.9-1.1, crop 0.85-1): a random resized crop would cut the object, which is the whole image.
Scenes get the random resized crop of the ``natural`` preset (area 0.2-1), as AND / Wu et al. 2018.
A flat background with visible noise reads as a scene: the safe side (the crop the papers use on
photographs).

**Image size.** A crop must keep enough pixels to be an image: the smallest crop keeps a side of at
least ``MIN_CROP_SIDE`` = 14 px (sqrt(0.2) x 32: the published CIFAR crop, so 32 px images keep the
papers' 0.2), i.e. the lower area bound is raised to (14 / side)^2, and never above the mild
object crop's 0.85 (tiny images get the mild crop, not none).

The returned fields are those of ``deepclust.config.ViewsConfig`` (``resolution.resolve`` writes them into
the resolved configuration, so a run is reproducible from its ``config.yaml``) and the evidence is
every statistic and decision, with the thresholds, for the log.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["choose_views", "image_statistics", "FLIP_THRESHOLD", "PLAIN_THRESHOLD", "CHROMA_THRESHOLD",
           "BORDER_TOLERANCE", "MIN_CROP_SIDE", "SAMPLE_SIZE", "STAT_SIDE"]

SAMPLE_SIZE = 2000  # images looked at (a seeded random sample)
STAT_SIDE = 16  # the flip statistic on images reduced to at most 16 x 16
BORDER_SIDE = 32  # the border statistic on images reduced to at most 32 x 32
FLIP_THRESHOLD = 0.25  # flip when P(mirrored beats original) >= 1/4, i.e. most images stay plausible
PLAIN_THRESHOLD = 0.5  # plain background when the typical border is mostly one flat level
BORDER_TOLERANCE = 2.0 / 255  # "flat": within 2 grey levels of the border's median
CHROMA_THRESHOLD = 1.0 / 255  # colour when channels differ from the luma by >= 1 grey level on average
MIN_CROP_SIDE = 14  # px kept by the smallest crop: sqrt(0.2) * 32, the papers' CIFAR crop
MIN_FLIP_IMAGES = 20  # fewer images: no nearest neighbour worth the name; flips stay off
TIE = 1e-4  # similarities this close count as a tie

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# The two geometric families (values of views.VIEW_PRESETS, repeated here as plain data so the rule
# reads on its own; tests check they agree with the presets).
OBJECT_GEOMETRY = {"crop_scale": [0.85, 1.0], "rotation": 12.0, "shift": 0.1, "rescale": [0.9, 1.1]}
SCENE_GEOMETRY = {"crop_scale": [0.2, 1.0], "rotation": 0.0, "shift": 0.0, "rescale": [1.0, 1.0]}
COLOUR = {"color_jitter": 0.4, "grayscale_p": 0.2}
NO_COLOUR = {"color_jitter": 0.0, "grayscale_p": 0.0}


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise ValueError(f"choose_views expects uint8 images, got {a.dtype}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3) or min(a.shape[1:3]) < 1:
        raise ValueError(f"choose_views expects (N, H, W) or (N, H, W, 3) images, got shape {np.asarray(images).shape}")
    if len(a) < 1:
        raise ValueError("choose_views needs at least one image")
    return a


def _reduce(batch: np.ndarray, side: int) -> np.ndarray:
    """uint8 (B, H, W, C) or float (B, C, H, W) -> float32 (B, C, h, w) in [0, 1], area-averaged to at
    most side x side."""
    import torch
    import torch.nn.functional as F

    if batch.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
    else:
        t = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    h, w = t.shape[-2:]
    oh, ow = min(h, side), min(w, side)
    if (oh, ow) != (h, w):
        t = F.adaptive_avg_pool2d(t, (oh, ow))  # bins are mirror-symmetric: flip commutes with it
    return t.numpy()


def _sample(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, reduced float images (S, C, h, w)) of a seeded random sample, reduced in chunks."""
    n = len(images)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, SAMPLE_SIZE), replace=False))
    parts = [_reduce(images[idx[i:i + 256]], BORDER_SIDE) for i in range(0, len(idx), 256)]
    return idx, np.concatenate(parts)


def _unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = x.reshape(len(x), -1).astype(np.float32)
    v = v - v.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    ok = norm[:, 0] > 1e-6
    return v / np.maximum(norm, 1e-12), ok


def flip_statistics(small: np.ndarray) -> dict[str, Any]:
    """P(the mirrored image's nearest neighbour is closer than the original's), see the module doc."""
    from .structure.knn import topk_cosine

    v, ok = _unit_rows(small)
    m, _ = _unit_rows(small[..., ::-1])
    v, m = v[ok], m[ok]
    n = len(v)
    if n < MIN_FLIP_IMAGES:
        return {"flip_images": int(n), "flip_win_rate": None}
    s_orig = topk_cosine(v, v, 1, exclude_self=True, backend="torch")[0][:, 0]
    sims, ids = topk_cosine(m, v, 2, backend="torch")
    own = ids[:, 0] == np.arange(n)  # the mirrored image's nearest is its own original: skip it
    s_flip = np.where(own, sims[:, 1], sims[:, 0])
    diff = s_flip - s_orig
    wins = (diff > TIE).astype(np.float64) + 0.5 * (np.abs(diff) <= TIE)
    return {"flip_images": int(n), "flip_win_rate": round(float(wins.mean()), 4),
            "nn_similarity_original": round(float(np.median(s_orig)), 4),
            "nn_similarity_mirrored": round(float(np.median(s_flip)), 4)}


def border_statistics(small: np.ndarray) -> dict[str, Any]:
    """Median over images of the fraction of outer-ring pixels within BORDER_TOLERANCE of the ring's
    median (grey), see the module doc."""
    grey = small[:, 0] if small.shape[1] == 1 else np.tensordot(_LUMA, small, axes=([0], [1]))
    h, w = grey.shape[1:]
    if h < 3 or w < 3:
        return {"plain_border": None}
    ring = np.concatenate([grey[:, 0, :], grey[:, -1, :], grey[:, 1:-1, 0], grey[:, 1:-1, -1]], axis=1)
    med = np.median(ring, axis=1, keepdims=True)
    flat = (np.abs(ring - med) <= BORDER_TOLERANCE + 1e-6).mean(axis=1)
    return {"plain_border": round(float(np.median(flat)), 4),
            "plain_border_q25": round(float(np.quantile(flat, 0.25)), 4),
            "plain_border_q75": round(float(np.quantile(flat, 0.75)), 4)}


def colour_statistics(small: np.ndarray) -> dict[str, Any]:
    if small.shape[1] == 1:
        return {"chroma": 0.0}
    grey = np.tensordot(_LUMA, small, axes=([0], [1]))[:, None]
    return {"chroma": round(float(np.abs(small - grey).mean()), 5)}


def image_statistics(images: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Every statistic the rules read, from a seeded sample of at most SAMPLE_SIZE images."""
    a = _as_nhwc(images)
    idx, medium = _sample(a, seed)
    small = _reduce(medium, STAT_SIDE)
    stats: dict[str, Any] = {"n_images": int(len(a)), "sample": int(len(idx)), "channels": int(a.shape[-1]),
                             "height": int(a.shape[1]), "width": int(a.shape[2])}
    stats.update(colour_statistics(small))
    stats.update(flip_statistics(small))
    stats.update(border_statistics(medium))
    return stats


def choose_views(images: np.ndarray, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``ViewsConfig`` fields, evidence) for uint8 images ``(N, H, W)`` or ``(N, H, W, 3)``.

    Reads only pixels of a bounded seeded sample (the module doc states each rule and its threshold).
    Fields: crop_scale, flip, rotation, shift, rescale, color_jitter, grayscale_p. Evidence: the
    statistics, the thresholds, each decision, and ``preset`` -- the ``views.VIEW_PRESETS`` entry that
    supplies the remaining ``ViewSpec`` fields (``natural`` for colour: hue 0.4, crop ratio 3/4-4/3;
    ``digits`` for grey: crop ratio 0.9-1.1).
    """
    stats = image_statistics(images, seed)
    colour = stats["channels"] == 3 and stats["chroma"] >= CHROMA_THRESHOLD
    rate = stats["flip_win_rate"]
    flip = rate is not None and rate >= FLIP_THRESHOLD
    plain = stats["plain_border"] is None or stats["plain_border"] >= PLAIN_THRESHOLD
    side = min(stats["height"], stats["width"])
    fields: dict[str, Any] = {}
    fields.update(OBJECT_GEOMETRY if plain else SCENE_GEOMETRY)
    fields["crop_scale"] = list(fields["crop_scale"])
    fields["rescale"] = list(fields["rescale"])
    size_floor = min((MIN_CROP_SIDE / side) ** 2, OBJECT_GEOMETRY["crop_scale"][0])
    if fields["crop_scale"][0] < size_floor:
        fields["crop_scale"][0] = round(size_floor, 4)
    fields["flip"] = bool(flip)
    fields.update(COLOUR if colour else NO_COLOUR)
    evidence = {
        **stats,
        "thresholds": {"flip_win_rate": FLIP_THRESHOLD, "plain_border": PLAIN_THRESHOLD,
                       "border_tolerance": BORDER_TOLERANCE, "chroma": CHROMA_THRESHOLD,
                       "min_crop_side": MIN_CROP_SIDE},
        "colour": bool(colour), "flip": bool(flip), "background": "plain" if plain else "scene",
        "crop_floor_for_size": round(size_floor, 4), "preset": "natural" if colour else "digits",
        "seed": int(seed),
    }
    return fields, evidence


def describe(evidence: dict[str, Any]) -> str:
    """One line for the log: each decision with the statistic that made it."""
    t = evidence["thresholds"]
    rate = evidence.get("flip_win_rate")
    flip = (f"flip {'on' if evidence['flip'] else 'off'} (mirrored images win {rate:.2f} of nearest-neighbour "
            f"comparisons, threshold {t['flip_win_rate']})" if rate is not None
            else f"flip off (only {evidence.get('flip_images')} usable images)")
    border = evidence.get("plain_border")
    bg = (f"{'plain background' if evidence['background'] == 'plain' else 'scene'} (flat border "
          f"{border:.2f}, threshold {t['plain_border']})" if border is not None else "plain background (tiny images)")
    colour = f"{'colour' if evidence['colour'] else 'grey'} (chroma {evidence['chroma']:.3f})"
    return f"views from the pixels of {evidence['sample']} images: {colour}, {flip}, {bg}; preset {evidence['preset']}"
