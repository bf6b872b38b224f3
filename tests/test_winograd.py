"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions equal the direct ones; the fast path uses them, the reference
path does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ldm.modules.winograd as winograd
from cldm.control import Control
from cldm.inference import use_path
from cldm.model import load_model, model_config
from ldm.modules.winograd import (
    Conv2d,
    filter_transform,
    set_conv_algorithm,
    unfold_conv3x3,
    winograd_conv3x3,
    winograd_tile,
)
from ldm.util import instantiate_from_config
from tests.conftest import TINY_CONFIG


@pytest.mark.parametrize("shape", [(2, 64, 16, 16), (1, 32, 7, 9), (3, 40, 1, 1), (1, 33, 2, 5), (1, 32, 6, 10)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_equals_direct_convolution(shape: tuple[int, ...], channels_last: bool, bias: bool, tile: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(48, shape[1], 3, 3, generator=g) / (9 * shape[1]) ** 0.5
    b = torch.randn(48, generator=g) if bias else None
    exact = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    y = winograd_conv3x3(x, w, b, tile)
    assert y.shape == exact.shape and y.dtype == torch.float32
    assert (y.double() - exact).abs().max() < (1e-5 if tile == 2 else 5e-5)  # direct float32: ~1e-5
    layout = torch.channels_last if channels_last and shape[2] * shape[3] > 1 else torch.contiguous_format
    assert y.is_contiguous(memory_format=layout)


G_TILE = {  # Lavin & Gray's filter transforms
    2: [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
    4: [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
}  # fmt: skip


@pytest.mark.parametrize("tile", [2, 4])
def test_filter_transform_is_g_w_gt(tile: int) -> None:
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    g = torch.tensor(G_TILE[tile], dtype=torch.float64)
    size = (tile + 2) ** 2
    u = filter_transform(w, tile)
    assert u.shape == (size, 5, 3)
    expected = torch.einsum("ae,oief,bf->aboi", g, w, g).reshape(size, 5, 3)
    assert torch.allclose(u, expected)


def test_tile_size_follows_pixel_count() -> None:
    assert [winograd_tile(p) for p in (128, 511, 512, 1023, 1024, 8192)] == [0, 0, 2, 2, 4, 4]
    with pytest.raises(ValueError, match="tile must be 2 or 4"):
        winograd_conv3x3(torch.randn(1, 32, 8, 8), torch.randn(32, 32, 3, 3), tile=3)


def test_conv2d_keeps_keys_and_switches_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = Conv2d(32, 32, 3, padding=1)
    assert list(conv.state_dict()) == list(nn.Conv2d(32, 32, 3, padding=1).state_dict())
    assert conv.algorithm == "winograd"  # the fast path is the default
    assert set_conv_algorithm(conv, "direct") == 1
    calls = []
    real = winograd.winograd_conv3x3
    monkeypatch.setattr(winograd, "winograd_conv3x3", lambda *a: calls.append(a[-1]) or real(*a))
    x = torch.randn(2, 32, 16, 16)
    big = torch.randn(2, 32, 32, 32)
    with torch.no_grad():
        direct = conv(x)
        direct_big = conv(big)
        assert set_conv_algorithm(conv, "winograd") == 1
        fast = conv(x)
        assert calls == [2]  # 512 pixels: F(2x2, 3x3)
        fast_big = conv(big)
        assert calls == [2, 4]  # 2048 pixels: F(4x4, 3x3)
        conv(torch.randn(1, 32, 8, 8))  # 64 pixels < MIN_PIXELS: direct
        assert calls == [2, 4]
    conv(x).sum().backward()  # recording gradients: the direct kernel (training is unchanged)
    assert calls == [2, 4] and conv.weight.grad is not None
    assert (direct - fast).abs().max() < 1e-5
    assert (direct_big - fast_big).abs().max() < 5e-5
    assert set_conv_algorithm(Conv2d(32, 32, 3, stride=2, padding=1), "winograd") == 0
    assert set_conv_algorithm(Conv2d(3, 32, 3, padding=1), "winograd") == 0  # the RGB stem: too few channels
    with pytest.raises(ValueError, match="unknown convolution algorithm"):
        set_conv_algorithm(conv, "fft")


def test_fast_path_runs_winograd_and_reference_does_not(tiny_ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(TINY_CONFIG, tiny_ckpt)
    calls = []
    real = winograd.winograd_conv3x3
    monkeypatch.setattr(winograd, "winograd_conv3x3", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        use_path(model, "reference")
        reference = model.decode_first_stage(x)
        assert calls == []
        use_path(model, "fast")
        fast = model.decode_first_stage(x)
    assert len(calls) > 0
    assert (fast - reference).abs().max() < 1e-4


def test_direct_layers_convert_the_smaller_operand() -> None:
    """oneDNN converts whichever operand's layout differs: channels-last inputs of 3x3 layers with larger weights go
    to NCHW (SD's 8x8 level), large channels-last activations and 1x1 layers are left as they are."""
    w3, w1 = torch.randn(64, 64, 3, 3), torch.randn(64, 64, 1, 1)
    small = torch.randn(1, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    large = torch.randn(1, 64, 48, 48).contiguous(memory_format=torch.channels_last)
    assert winograd._layout_of_weight(small, w3).is_contiguous()
    assert not winograd._layout_of_weight(large, w3).is_contiguous()
    assert not winograd._layout_of_weight(small, w1).is_contiguous()
    conv = Conv2d(64, 64, 3, padding=1)
    set_conv_algorithm(conv, "winograd")
    with torch.no_grad():
        assert (conv(small) - F.conv2d(small, conv.weight, conv.bias, padding=1)).abs().max() < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_unfold_convolution_equals_direct(channels_last: bool, bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 4, 3, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(48, 64, 3, 3, generator=g) / 24
    b = torch.randn(48, generator=g) if bias else None
    exact = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    y = unfold_conv3x3(x, w, b)
    assert y.shape == exact.shape and (y.double() - exact).abs().max() < 1e-5


def test_smallest_batches_take_the_unfold_convolution(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = Conv2d(32, 32, 3, padding=1)
    set_conv_algorithm(conv, "winograd")
    calls = []
    real = winograd.unfold_conv3x3
    monkeypatch.setattr(winograd, "unfold_conv3x3", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        small = torch.randn(2, 32, 4, 4)  # 32 pixels
        y = conv(small)
        conv(torch.randn(2, 32, 8, 8))  # 128 pixels: direct
    assert calls == [(2, 32, 4, 4)]
    assert (y - F.conv2d(small, conv.weight, conv.bias, padding=1)).abs().max() < 1e-5


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_winograd_follows_the_device_and_dtype_of_its_inputs(tile: int, dtype: torch.dtype) -> None:
    # On the meta device any tensor made on the CPU (a transform matrix) and mixed in raises.
    x = torch.empty(2, 32, 8, 8, device="meta", dtype=dtype)
    w = torch.empty(48, 32, 3, 3, device="meta", dtype=dtype)
    y = winograd_conv3x3(x, w, torch.empty(48, device="meta", dtype=dtype), tile)
    assert y.is_meta and y.dtype == dtype and y.shape == (2, 48, 8, 8)
    assert filter_transform(w, tile).is_meta and filter_transform(w, tile).dtype == dtype


def test_fast_path_forward_creates_no_tensor_off_the_input_device() -> None:
    # The tiny model on the meta device, fast path (Winograd with tile 4 and 2, unfold, direct at the levels of a
    # 256 px batch of 2): the text encoder, the ControlNet, the UNet and the VAE decoder give meta tensors.
    with torch.device("meta"):
        model = instantiate_from_config(model_config(TINY_CONFIG)).eval()
    use_path(model, "fast")
    assert set_conv_algorithm(model, "winograd") > 0
    x = torch.empty(2, 4, 32, 32, device="meta")
    t = torch.full((2,), 500, dtype=torch.long, device="meta")
    hint = torch.empty(1, 3, 256, 256, device="meta")
    with torch.no_grad():
        context = model.get_learned_conditioning(["a", "b"])
        control = Control.from_strength(model.control_model, hint)
        eps = model.apply_model(x, t, {"c_crossattn": [context]}, controls=[control])
        image = model.decode_first_stage(eps)
    assert context.is_meta and eps.is_meta and image.is_meta
    assert eps.shape == x.shape and image.shape == (2, 3, 256, 256)
