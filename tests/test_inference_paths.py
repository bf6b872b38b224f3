"""The fast inference path gives the reference path's output, with the hint encoded once per run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cldm.inference import PATHS, InferencePath, use_path
from cldm.model import load_model
from ldm.models.diffusion.ddim import DDIMSampler
from tests.conftest import TINY_CONFIG


@pytest.fixture()
def model(tiny_ckpt):  # a fresh copy: switching paths changes the model's memory format and attention
    return load_model(TINY_CONFIG, tiny_ckpt)


def sample(model: torch.nn.Module, path: str | InferencePath, calls: list[int], steps: int = 4) -> torch.Tensor:
    """A reference-API run (``DDIMSampler(model).sample``) on ``path``; ``calls`` gets the rows of every hint
    encoding."""
    g = torch.Generator().manual_seed(0)
    hint = torch.rand(2, 3, 128, 128, generator=g)
    x_t = torch.randn(2, 4, 16, 16, generator=g)
    cond = {"c_concat": [hint], "c_crossattn": [model.get_learned_conditioning(["a house", "a tree"])]}
    uncond = {"c_concat": [hint], "c_crossattn": [model.get_learned_conditioning([""] * 2)]}
    use_path(model, path)
    hook = model.control_model.input_hint_block.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            z, _ = DDIMSampler(model).sample(steps, 2, (4, 16, 16), cond, verbose=False, x_T=x_t, progress=False,
                                             unconditional_guidance_scale=9.0,
                                             unconditional_conditioning=uncond)  # fmt: skip
            return model.decode_first_stage(z)
    finally:
        hook.remove()


def test_fast_path_equals_reference_path(model: torch.nn.Module) -> None:
    fast_calls: list[int] = []
    ref_calls: list[int] = []
    fast = sample(model, "fast", fast_calls)
    reference = sample(model, "reference", ref_calls)
    assert (fast - reference).abs().max() < 1e-4
    assert fast.std() > 0.01
    assert fast_calls == [2]  # once per run, shared by the conditional and unconditional halves
    assert ref_calls == [2] * 8  # the reference re-encodes it for both passes at every step


@pytest.mark.slow
def test_channels_last_switch_keeps_the_output(model: torch.nn.Module) -> None:
    fast = sample(model, "fast", [])
    channels_last = sample(model, InferencePath(channels_last=True), [])
    assert model.model.diffusion_model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert (fast - channels_last).abs().max() < 1e-4


def test_fast_path_decodes_channels_last(model: torch.nn.Module) -> None:
    layouts: list[bool] = []
    decoder = model.first_stage_model.decoder
    hook = decoder.conv_in.register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    try:
        use_path(model, "fast")
        assert model.decode_channels_last
        fast = model.decode_first_stage(z)
        use_path(model, "reference")
        assert not model.decode_channels_last
        reference = model.decode_first_stage(z)
    finally:
        hook.remove()
    assert layouts == [True, False]  # the latents enter the decoder channels-last on the fast path only
    assert decoder.conv_in.weight.is_contiguous()  # weights stay as mapped
    assert reference.is_contiguous() and (fast - reference).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_path_keeps_the_output_and_the_keys(model: torch.nn.Module) -> None:
    """The opt-in torch.compile path (here with a backend that records the captured graphs and runs them eagerly;
    the scripts use inductor) gives the fast path's output and keeps the state-dict keys; it is one-way."""
    assert PATHS["compiled"] == replace(PATHS["fast"], compile="inductor")
    keys = list(model.state_dict())
    fast = sample(model, "fast", [])
    graphs: list[int] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    torch.compiler.reset()
    compiled_calls: list[int] = []
    compiled = sample(model, replace(PATHS["compiled"], compile=recording_backend), compiled_calls)
    assert graphs and sum(graphs) > 100  # the UNet and the ControlNet ran as captured graphs
    assert list(model.state_dict()) == keys
    assert (fast - compiled).abs().max() < 1e-4 and compiled_calls == [2]
    with pytest.raises(ValueError, match="compiled model cannot be switched"):
        use_path(model, "fast")


def test_paths_are_switches_of_the_same_model(model: torch.nn.Module) -> None:
    use_path(model, InferencePath(channels_last=True))
    use_path(model, "reference")
    assert model.model.diffusion_model.input_blocks[0][0].weight.is_contiguous()
    assert {m.attention_backend for m in model.modules() if hasattr(m, "attention_backend")} == {"math"}
    assert set(PATHS) == {"fast", "reference", "compiled"}
    with pytest.raises(ValueError, match="unknown inference path 'turbo'"):
        use_path(model, "turbo")


def test_half_precision_schedule_in_a_file_is_replaced(tiny_ckpt, tmp_path) -> None:
    from cldm.checkpoint import load_state_dict, save_checkpoint

    sd = load_state_dict(tiny_ckpt)
    path = tmp_path / "bf16_schedule.ckpt"
    save_checkpoint({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, path)
    model = load_model(TINY_CONFIG, path)
    assert model.alphas_cumprod.dtype == torch.float32 and model.alphas_cumprod[0] < 1
    assert torch.equal(model.alphas_cumprod, load_model(TINY_CONFIG, tiny_ckpt).alphas_cumprod)


@pytest.mark.slow
def test_low_memory_mode_loads_and_samples(tiny_ckpt, tmp_path) -> None:
    from cldm.pipeline import Canny2Image, CannyParams, read_image
    from tests.conftest import REPO
    from tools.convert_checkpoint import main as convert

    bf16 = tmp_path / "tiny_bf16.pth"
    assert convert([str(tiny_ckpt), str(bf16), "--config", str(TINY_CONFIG)]) == 0
    low = load_model(TINY_CONFIG, bf16, low_memory=True)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in low.buffers() if b.is_floating_point()} == {torch.float32}
    full = load_model(TINY_CONFIG, bf16)  # the same bf16-rounded weights, held in float32
    image = read_image(REPO / "test_imgs" / "astronaut.png")
    params = CannyParams(prompt="a house", image_resolution=128, ddim_steps=4, seed=3)
    a, _ = Canny2Image(full, torch.device("cpu"))(image, params, progress=False)
    b, _ = Canny2Image(low, torch.device("cpu"))(image, params, progress=False)
    kept = Canny2Image(low, torch.device("cpu"), path=replace(PATHS["fast"], page_out=False))
    c, _ = kept(image, params, progress=False)  # b: the fast path dropped each stage's weights, c: kept them
    b2, _ = Canny2Image(low, torch.device("cpu"))(image, params, progress=False)  # the weights read back
    assert np.array_equal(b[1], c[1]) and np.array_equal(b2[1], c[1])
    diff = abs(a[1].astype(int) - b[1].astype(int))
    assert a[1].shape == b[1].shape == (128, 128, 3) and b[1].std() > 5  # a real image, not NaN turned to 0
    assert low.alphas_cumprod.dtype == torch.float32 and torch.equal(low.alphas_cumprod, full.alphas_cumprod)
    assert low.alphas_cumprod[0] < 1  # the schedule was kept in float32
    assert diff.max() <= 1  # float32 compute: only the storage differs (the benchmark reports bf16 vs fp32 weights)


def test_benchmark_kernel_breakdown_counts_a_matmul() -> None:
    """``bench_canny2image.py --profile``: FLOPs and time per kernel, the rest as ``other``."""
    from benchmarks.bench_canny2image import kernel_breakdown

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    rows = kernel_breakdown(lambda: torch.nn.functional.silu(torch.mm(a, b)))
    by_name = {r["kernel"]: r for r in rows}
    assert set(by_name) == {"mm", "silu", "other"} and rows[-1]["kernel"] == "other"
    assert by_name["silu"]["calls"] == 1 and by_name["silu"]["tflop"] == 0.0
    assert by_name["mm"]["tflop"] == pytest.approx(2 * 256**3 / 1e12)
    assert by_name["mm"]["calls"] == 1 and by_name["mm"]["seconds"] > 0 and by_name["mm"]["gflops"] > 0
    assert 0 < by_name["mm"]["share"] <= 1.0
    mm, other = by_name["mm"], by_name["other"]
    wall = mm["seconds"] / mm["share"]
    assert mm["seconds"] + by_name["silu"]["seconds"] + other["seconds"] == pytest.approx(wall)



def test_benchmark_summary_rates_and_table(capsys: pytest.CaptureFixture) -> None:
    """One row of the table: median step, executed vs direct-convolution FLOP rates, first step and decode."""
    from benchmarks.bench_canny2image import print_table, summarize

    image = torch.zeros(4, 4, 3, dtype=torch.uint8)
    result = {"step_s": [3.0, 2.0, 2.0, 4.0], "decode_s": 1.5, "whole_s": 12.5, "flops_per_step": 2e12,
              "direct_flops_per_step": 4e12, "peak_rss_gb": 5.0, "load_s": 1.0, "load_peak_rss_gb": 0.4}  # fmt: skip
    row = summarize("fast", {"result": result, "image": image}, 100.0, image)
    assert row["step_s"] == 2.5 and row["steps_s"][0] == 3.0 and row["decode_s"] == 1.5
    assert row["gflops"] == pytest.approx(800.0) and row["gemm_fraction"] == pytest.approx(8.0)
    assert row["effective_gflops"] == pytest.approx(1600.0) and row["max_abs_diff_vs_fast"] == 0
    print_table([row], {"resolution": 64, "steps": 4, "threads": 2, "gemm_gflops": 100.0, "gemm_gflops_after": 90.0,
                        "background_load": True, "ckpt_gb": 1.0, "scale": 1.0})  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert "guidance 1 (one pass a step)" in lines[0]
    assert "GEMM 100 GFLOP/s before, 90 after; one core kept busy" in lines[0]
    assert lines[-1].split()[:5] == ["fast", "2.50", "3.0", "1.5", "12.5"] and "1600.0" in lines[-1]


def test_time_to_image_summary() -> None:
    """Preset rows: the median step from the step stamps, the project's speed-up and its image difference."""
    import numpy as np

    from benchmarks.presets import summarize

    image = np.zeros((4, 4, 3), dtype=np.uint8)
    common = {"load_s": 1.0, "load_peak_rss_gb": 0.4, "peak_rss_gb": 6.0}
    runs = {"project": {**common, "whole_s": 10.0, "stamps": [3.0, 5.0, 7.5, 9.0], "image": image},
            "diffusers": {**common, "whole_s": 15.0, "stamps": [4.0, 7.0, 10.0, 13.0], "image": image + 2}}  # fmt: skip
    ours, theirs = summarize("dpmpp", runs)
    assert (ours["step_s"], ours["steps"], theirs["step_s"]) == (2.0, 4, 3.0)
    assert ours["speedup_vs_diffusers"] == pytest.approx(1.5) and ours["max_diff_vs_diffusers"] == 2
    assert ours["whole_s_runs"] == [10.0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scale", "nan"], "--scale must be between 0.1 and 30"),
        (["--scale", "0"], "--scale must be between 0.1 and 30"),
        (["--control-end", "7"], "--control-end must be between 0 and 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--threads", "-1"], "--threads must be between 1 and"),
        (["--repeats", "3"], "--repeats: at least 1, and above 1 only with --presets"),
        (["--peers", "sdcpp"], "--peers: only with --presets"),
        (["--presets", "lcm", "--scale", "9", "--profile"], "--scale, --profile: per-step mode only"),
        (["--presets", "lcm", "--peers", "bogus"], "--peers: unknown peer 'bogus'"),
    ],
)
def test_benchmark_flags_are_checked_before_loading(
    argv: list[str], message: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """A flag the runs would only meet after minutes of loading is one line and exit 1 at once (no checkpoint is
    made at the ``--ckpt`` path)."""
    from benchmarks.bench_canny2image import main

    try:
        code, err = main([*argv, "--ckpt", str(tmp_path / "c.pth")]), capsys.readouterr().err
    except SystemExit as refusal:  # benchmarks.presets.available_peers exits with its line
        code, err = 1, str(refusal.code)
    assert code == 1 and err.strip().splitlines() == [err.strip()] and err.startswith("error: ") and message in err
    assert not (tmp_path / "c.pth").exists()


def test_time_to_image_repeats_take_the_median_run() -> None:
    """``--repeats``: an implementation's row is the median whole time (of an even count: the mean of the middle
    two), its other figures from the run nearest it (the faster of two as near); every run's time kept in order."""
    from benchmarks.presets import median_run

    runs = [{"whole_s": w, "stamps": [w / 2]} for w in (12.0, 10.0, 30.0)]
    assert median_run(runs) == {"whole_s": 12.0, "stamps": [6.0], "whole_s_runs": [12.0, 10.0, 30.0]}
    assert median_run(runs[:2]) == {"whole_s": 11.0, "stamps": [5.0], "whole_s_runs": [12.0, 10.0]}

@torch.no_grad()
def test_unconditional_pass_with_another_hint_gets_its_own_control(model: torch.nn.Module) -> None:
    """A reference conditioning whose unconditional ``c_concat`` holds other tensors: two passes, each with its
    own hint, as the reference computes them."""
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    text = model.get_learned_conditioning(["a house", ""])
    cond = {"c_concat": [torch.rand(1, 3, 128, 128, generator=g)], "c_crossattn": [text[:1]]}
    uncond = {"c_concat": [torch.zeros(1, 3, 128, 128)], "c_crossattn": [text[1:]]}
    denoise = DDIMSampler(model).denoiser(cond, uncond, 9.0)
    assert len(denoise.controls) == len(denoise.uncond_controls) == 1
    assert denoise.controls[0] is not denoise.uncond_controls[0]
    e_c, e_u = model.apply_model(x, t, cond), model.apply_model(x, t, uncond)
    assert (denoise(x, t) - (e_u + 9.0 * (e_c - e_u))).abs().max() < 1e-4


def test_vae_in_place_activations_only_without_grad(model: torch.nn.Module) -> None:
    """The VAE's SiLUs run in place under no_grad (the decode's memory peak) and give the same numbers."""
    # Winograd and channels-last run without grad only: compare like for like
    use_path(model, replace(PATHS["fast"], conv="direct", vae_channels_last=False))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    in_place = model.decode_first_stage(z)  # no_grad, as the reference's
    with torch.enable_grad():
        z_grad = z.clone().requires_grad_(True)
        recorded = model.first_stage_model.decode(z_grad / model.scale_factor)
        recorded.sum().backward()  # out of place while recording: the backward pass works
    assert torch.equal(in_place, recorded.detach()) and z_grad.grad is not None
