"""Batched augmentations: shapes, exactness of the simple cases, and reproducibility of the draws."""

import math

import pytest
import torch

from deepclust.views import VIEW_PRESETS, BatchViews, ViewParams, ViewSpec, draw_generator

NO_CROP = (1.0, 1.0)


def images(b=8, c=1, h=28, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)


def normalised(x, mean=0.5, std=0.5):
    return (x.float() / 255 - mean) / std


@pytest.mark.parametrize("preset", sorted(VIEW_PRESETS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (3, 20, 30)])
def test_output_shape_dtype_range(preset, shape):
    c = shape[0]
    x = images(16, *shape)
    v = BatchViews(VIEW_PRESETS[preset], c)
    y = v(x, generator=draw_generator(0, 1, 2))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6  # 0.5 / 0.5 normalisation of [0, 1]


def test_out_size_and_custom_normalisation():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    v = BatchViews(ViewSpec(mean=mean, std=std), 3, out_size=(24, 20))
    x = images(4, 3, 32, 32)
    assert v(x, draw_generator(1)).shape == (4, 3, 24, 20)
    assert v.plain(x).shape == (4, 3, 24, 20)
    v = BatchViews(ViewSpec(crop_scale=NO_CROP, mean=mean, std=std), 3)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(v.plain(x), expected)
    with pytest.raises(ValueError):
        BatchViews(ViewSpec(mean=(0.5, 0.5)), 3)


@pytest.mark.parametrize("preset", sorted(VIEW_PRESETS))
@pytest.mark.parametrize("out_size", [None, (24, 20)])
def test_an_empty_batch_gives_empty_views(preset, out_size):
    """PAD asks for second views of a batch's isolated rows only; a batch may have none."""
    v = BatchViews(VIEW_PRESETS[preset], 3, out_size=out_size)
    x = images(0, 3, 32, 32)
    hw = out_size or (32, 32)
    assert v(x, draw_generator(0)).shape == (0, 3, *hw)
    assert v.plain(x).shape == (0, 3, *hw)


def test_identity_preset_reproduces_normalised_input():
    x = images(8, 3, 32, 32)
    v = BatchViews(VIEW_PRESETS["none"], 3)
    assert not VIEW_PRESETS["none"].geometric
    torch.testing.assert_close(v(x, draw_generator(3)), normalised(x), rtol=0, atol=1e-6)
    assert torch.equal(v(x, draw_generator(3)), v.plain(x))
    assert torch.equal(v.plain(x), v(x))  # no generator: still the identity


@pytest.mark.parametrize("preset", ["digits", "dccm", "natural"])
def test_same_seed_same_views_different_seed_different(preset):
    c = 3 if preset == "natural" else 1
    x = images(16, c, 28, 28)
    v = BatchViews(VIEW_PRESETS[preset], c)
    a = v(x, draw_generator(7, 0, 5))
    b = v(x, draw_generator(7, 0, 5))
    d = v(x, draw_generator(7, 0, 6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, d)
    # the global RNG is not touched when a generator is given
    state = torch.get_rng_state()
    v(x, draw_generator(1))
    assert torch.equal(state, torch.get_rng_state())


def test_parameters_differ_within_batch():
    v = BatchViews(VIEW_PRESETS["natural"], 3)
    p = v.sample_params(32, draw_generator(0))
    for t in (p.angle, p.scale, p.brightness, p.contrast, p.saturation, p.hue):
        assert t is None or t.unique().numel() == 32
    assert p.crop_area.shape == (32, 10) and p.crop_area[:, 0].unique().numel() == 32
    # the same image repeated: every view differs from every other one
    one = images(1, 1, 28, 28).expand(8, -1, -1, -1).contiguous()
    y = BatchViews(VIEW_PRESETS["digits"], 1)(one, draw_generator(0)).flatten(1)
    dist = torch.cdist(y, y) + torch.eye(8) * 1e9
    assert dist.min() > 1e-3


def test_flip_only_flips_exactly():
    x = images(64, 3, 16, 12)
    v = BatchViews(ViewSpec(crop_scale=NO_CROP, flip=True), 3)
    params = v.sample_params(64, draw_generator(4))
    y = v.apply(x, params)
    plain = v.plain(x)
    flipped = params.flip
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(y[flipped], plain[flipped].flip(-1))
    assert torch.equal(y[~flipped], plain[~flipped])


def test_flip_through_affine_path_matches():
    """A flip drawn together with a resampling aug (zoom 1, so no-op) equals exact flipping."""
    x = images(6, 1, 10, 10)
    v = BatchViews(ViewSpec(crop_scale=NO_CROP, flip=True, rescale=(0.5, 2.0)), 1)
    p = ViewParams(flip=torch.tensor([True, False, True, False, True, True]), scale=torch.ones(6))
    torch.testing.assert_close(v.apply(x, p)[p.flip], v.plain(x)[p.flip].flip(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("degrees,k", [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_right_angle_rotation_matches_rot90(degrees, k):
    """Positive angles rotate counter-clockwise on screen, like torch.rot90(k=1) on (H, W)."""
    x = images(4, 3, 12, 12)
    v = BatchViews(ViewSpec(crop_scale=NO_CROP, rotation=180.0), 3)
    p = ViewParams(angle=torch.full((4,), math.radians(degrees)))
    torch.testing.assert_close(v.apply(x, p), torch.rot90(v.plain(x), k, dims=(-2, -1)), rtol=0, atol=1e-5)


def test_shift_by_one_pixel_is_a_zero_filled_roll():
    x = images(2, 1, 10, 10)
    v = BatchViews(ViewSpec(crop_scale=NO_CROP, shift=0.5, padding_mode="zeros", mean=(0.0,), std=(1.0,)), 1)
    p = ViewParams(shift=torch.tensor([[0.1, 0.0], [0.0, -0.2]]))  # +1 px right; 2 px up
    y = v.apply(x, p)
    ref = x.float() / 255
    expect0 = torch.zeros_like(ref[0])
    expect0[..., 1:] = ref[0, ..., :-1]
    expect1 = torch.zeros_like(ref[1])
    expect1[..., :-2, :] = ref[1, ..., 2:, :]
    torch.testing.assert_close(y[0], expect0, rtol=0, atol=1e-5)
    torch.testing.assert_close(y[1], expect1, rtol=0, atol=1e-5)


def test_crop_boxes_stay_inside_the_image():
    v = BatchViews(ViewSpec(crop_scale=(0.08, 1.0), crop_ratio=(0.5, 2.0)), 1)
    for hw in [(32, 32), (20, 40)]:
        p = v.sample_params(512, draw_generator(9))
        cx, cy, w, h = v._crop_boxes(p, hw)
        assert (cx.abs() + w <= 1 + 1e-5).all() and (cy.abs() + h <= 1 + 1e-5).all()
        area = w * h
        assert area.min() >= 0.08 - 1e-5 and area.max() <= 1 + 1e-5
    # a full-image crop is the identity
    p = ViewParams(crop_area=torch.ones(3, 10), crop_log_ratio=torch.zeros(3, 10), crop_offset=torch.rand(3, 2))
    x = images(3, 1, 9, 9)
    torch.testing.assert_close(v.apply(x, p), v.plain(x), rtol=0, atol=1e-5)


def test_grayscale_p1_gives_equal_channels():
    x = images(8, 3, 16, 16)
    v = BatchViews(ViewSpec(crop_scale=NO_CROP, grayscale_p=1.0), 3)
    y = v(x, draw_generator(0))
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    luma = (x.float() / 255 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    torch.testing.assert_close(y[:, 0], (luma - 0.5) / 0.5, rtol=0, atol=1e-5)


def test_colour_ops():
    x = images(6, 3, 8, 8)
    v = BatchViews(ViewSpec(crop_scale=NO_CROP, color_jitter=0.4, hue=0.5, mean=(0.0,), std=(1.0,)), 3)
    ones = torch.ones(6)
    # neutral factors change nothing
    neutral = ViewParams(brightness=ones, contrast=ones, saturation=ones, hue=torch.zeros(6))
    torch.testing.assert_close(v.apply(x, neutral), x.float() / 255, rtol=0, atol=1e-5)
    # brightness 0.5 halves; contrast 0 gives the mean grey level everywhere
    y = v.apply(x, ViewParams(brightness=ones * 0.5))
    torch.testing.assert_close(y, x.float() / 255 * 0.5, rtol=0, atol=1e-6)
    y = v.apply(x, ViewParams(contrast=torch.zeros(6)))
    assert (y.flatten(1).std(1) < 1e-6).all()
    # hue rotation keeps grey pixels grey
    grey = images(6, 1, 8, 8).expand(-1, 3, -1, -1).contiguous()
    torch.testing.assert_close(v.apply(grey, ViewParams(hue=torch.linspace(-0.5, 0.5, 6))),
                               grey.float() / 255, rtol=0, atol=1e-4)
    # 1-channel images skip saturation / hue / grayscale draws
    p = BatchViews(VIEW_PRESETS["natural"], 1).sample_params(4, draw_generator(0))
    assert p.saturation is None and p.hue is None and p.gray is None and p.brightness is not None


@pytest.mark.parametrize("preset", ["natural", "digits", "dccm"])
def test_sliced_draws_equal_global_batch_views(preset):
    """Draw for the global batch, give each 'rank' its slice: rows equal the one-device views."""
    c = 3 if preset == "natural" else 1
    x = images(8, c, 28, 28)
    v = BatchViews(VIEW_PRESETS[preset], c)
    full = v(x, generator=draw_generator(11, 3, 4))
    params = v.sample_params(8, draw_generator(11, 3, 4))
    first = v.apply(x[0:4], params[0:4])
    second = v.apply(x[4:8], params[4:8])
    assert torch.equal(first, full[0:4])
    assert torch.equal(torch.cat([first, second]), full)
    # 3 "ranks" with uneven slices, and index tensors
    parts = torch.tensor_split(torch.arange(8), 3)
    out = torch.cat([v.apply(x[i], params[i]) for i in parts])
    assert torch.equal(out, full)
    with pytest.raises(ValueError):
        v.apply(x[0:3], params[0:4])


def test_draw_generator_is_a_pure_function_of_keys():
    a = torch.rand(4, generator=draw_generator(0, 1, 2))
    assert torch.equal(a, torch.rand(4, generator=draw_generator(0, 1, 2)))
    for other in [(0, 1, 3), (0, 2, 1), (1, 1, 2), (0, 1), (0, 1, 2, 0)]:
        assert not torch.equal(a, torch.rand(4, generator=draw_generator(*other)))
    assert draw_generator(0, device="cpu").device.type == "cpu"
    assert draw_generator(2**40, -5).initial_seed() < 2**63


def test_module_moves_buffers_and_rejects_bad_input():
    v = BatchViews(VIEW_PRESETS["natural"], 3)
    assert len(v.state_dict()) == 0  # nothing to save
    v = v.to(torch.float32)
    with pytest.raises(ValueError):
        v(images(2, 1, 8, 8))  # wrong channel count
    with pytest.raises(ValueError):
        v(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        BatchViews(ViewSpec(), 2)


def test_crop_box_position_and_resize():
    """area 1/4, ratio 1, offset (0, 0): the top-left quarter, resized (bilinear) to the full size."""
    x = images(2, 1, 8, 8)
    v = BatchViews(ViewSpec(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), mean=(0.0,), std=(1.0,)), 1)
    p = ViewParams(crop_area=torch.full((2, 10), 0.25), crop_log_ratio=torch.zeros(2, 10),
                   crop_offset=torch.zeros(2, 2))
    y = v.apply(x, p)
    ref = torch.nn.functional.interpolate(x[..., :4, :4].float() / 255, size=(8, 8), mode="bilinear",
                                          align_corners=False)
    # inside the box the two agree; on its last row/column grid_sample reads the real neighbour pixel
    # where interpolate clamps to the box edge
    torch.testing.assert_close(y[..., :7, :7], ref[..., :7, :7], rtol=0, atol=1e-5)


def test_float_input_is_accepted_and_not_modified():
    x = images(4, 3, 16, 16).float() / 255
    before = x.clone()
    v = BatchViews(VIEW_PRESETS["natural"], 3)
    y = v(x, draw_generator(0))
    assert torch.equal(x, before)
    assert torch.equal(y, v((x * 255).round().to(torch.uint8), draw_generator(0)))
    assert torch.equal(v.plain(x), normalised((x * 255).round().to(torch.uint8)))
