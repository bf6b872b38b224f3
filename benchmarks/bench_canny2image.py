"""Speed and memory of full-size SD1.5 + ControlNet sampling on this machine, side by side.

    python -m benchmarks.bench_canny2image                       # 512x512, 20 steps, all paths
    python -m benchmarks.bench_canny2image --resolution 256 --steps 4 --paths fast,reference

Paths, on the same random weights (models/cldm_v15.yaml, seeded; no download), seed, hint and
prompt embeddings: ``fast`` (this project's default), ``reference`` (the same code switched to the
reference's behaviour: plain attention, hint re-encoded every step, separate CFG passes) and
``diffusers`` (ControlNetModel + UNet2DConditionModel + DDIM in diffusers, weights converted with
diffusers' utilities; skipped when diffusers is missing). Each path runs in its own process so its
load time and peak RSS are its own. Prints a table and writes it as JSON.

Columns: ``s/step`` the median step (a CFG step, both passes; with ``--scale 1`` one pass, as the ``lcm``
preset), ``1st s`` the first one, ``decode s`` the VAE decode, ``image s`` all steps and the decode;
``TFLOP/st`` the FLOPs one step executes (``torch.utils.flop_counter``), ``GFLOP/s`` and ``of GEMM`` those per
second and as a fraction of the machine's fp32 GEMM rate; ``eff GF/s`` the FLOPs the same step has with direct
convolutions, per second (the fast path's Winograd convolutions execute fewer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import presets

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "models" / "cldm_v15.yaml"
DEFAULT_CKPT = Path(tempfile.gettempdir()) / "controlnet_bench" / "control_sd15_random.pth"
PROMPT, N_PROMPT = "an astronaut, best quality, extremely detailed", "lowres, bad anatomy, worst quality"
SCALE = 9.0  # the reference demo's guidance scale, the per-step mode's default
PATHS = ("fast", "reference", "diffusers", "low-memory", "compiled", "reference-api")


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (GB): VmHWM, which, unlike ``ru_maxrss``, does not
    inherit the parent's peak across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # not Linux


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 matrix-multiply rate of this machine (best of ``repeats``)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def start_background_load() -> subprocess.Popen:
    """A process keeping one core busy with one-thread fp32 matrix multiplies (a shared machine's other work)."""
    code = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"
    return subprocess.Popen([sys.executable, "-c", code])


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ensure_checkpoint(path: Path) -> None:
    """Write the seeded full-size random checkpoint once (every layer random, so every path matters)."""
    if path.is_file():
        return
    from tools.make_random_checkpoint import make_random_checkpoint

    print(f"writing the full-size random checkpoint {path} (once) ...", file=sys.stderr)
    make_random_checkpoint(CONFIG, path, seed=0, fill_zeros_std=0.02)


def ensure_bf16_copy(ckpt: Path, out: Path) -> None:
    """The bfloat16 checkpoint the low-memory path maps (written once)."""
    if out.is_file():
        return
    import torch

    from tools.convert_checkpoint import convert_checkpoint

    print(f"writing the bfloat16 copy {out} (once) ...", file=sys.stderr)
    convert_checkpoint(ckpt, out, torch.bfloat16)


def make_inputs(ckpt: Path, resolution: int, out: Path) -> None:
    """Hint (Canny of test_imgs/astronaut.png), prompt embeddings and start noise, shared by all paths."""
    import numpy as np
    import torch

    from annotator.canny import CannyDetector
    from annotator.util import HWC3, resize_image
    from cldm.checkpoint import load_state_dict
    from cldm.pipeline import read_image
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    image = resize_image(HWC3(read_image(REPO / "test_imgs" / "astronaut.png")), resolution)
    edges = HWC3(CannyDetector()(image, 100, 200))
    hint = torch.from_numpy(np.ascontiguousarray(edges)).float().permute(2, 0, 1)[None] / 255.0
    prefix = "cond_stage_model."
    clip_sd = {k.removeprefix(prefix): v for k, v in load_state_dict(ckpt).items() if k.startswith(prefix)}
    clip = FrozenCLIPEmbedder()
    clip.load_state_dict(clip_sd, strict=False)
    with torch.no_grad():
        c, uc = clip.encode([PROMPT]), clip.encode([N_PROMPT])
    h, w = hint.shape[2:]
    x_t = torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
    torch.save({"hint": hint, "c": c, "uc": uc, "x_T": x_t}, out)


def count_flops(step: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


# Timed without FLOPs: torch's FLOP counter has no formula for the CPU flash-attention kernel; the rest are
# the norms and activations between the matrix multiplies. None of them nests inside another or a FLOP op.
TIMED_ONLY = ("scaled_dot_product_attention", "group_norm", "layer_norm", "silu", "gelu")


def kernel_breakdown(step: Any) -> list[dict]:
    """Where one call of ``step`` spends its time: per FLOP-counted aten op (convolution, mm, ...) its calls,
    seconds (profiler time including its own callees), share of the call's wall time, TFLOP and GFLOP/s; the
    ``TIMED_ONLY`` ops with their time only; then ``other`` (copies, elementwise ops, Python). Largest first."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = _timed(step)
    events = {e.key.removeprefix("aten::"): e for e in prof.key_averages() if e.key.startswith("aten::")}
    rows = []
    for op, n in flops.items():
        event = events.get(op)
        seconds = event.cpu_time_total / 1e6 if event is not None else float("nan")
        calls = event.count if event is not None else 0
        rows.append({"kernel": op, "calls": calls, "seconds": seconds, "share": seconds / wall, "tflop": n / 1e12,
                     "gflops": n / seconds / 1e9 if seconds > 0 else float("nan")})  # fmt: skip
    for op in TIMED_ONLY:  # top-level ops the FLOP counter does not count (CPU SDPA) or that have no FLOPs
        if op in events and op not in flops:
            event = events[op]
            rows.append({"kernel": op, "calls": event.count, "seconds": event.cpu_time_total / 1e6,
                         "share": event.cpu_time_total / 1e6 / wall, "tflop": 0.0, "gflops": float("nan")})  # fmt: skip
    timed = [r for r in rows if not math.isnan(r["seconds"])]  # a FLOP op the profiler did not name: no time
    rows.sort(key=lambda r: 0.0 if math.isnan(r["seconds"]) else -r["seconds"])
    other = wall - sum(r["seconds"] for r in timed)
    rows.append({"kernel": "other", "calls": 0, "seconds": other, "share": other / wall, "tflop": 0.0, "gflops": 0.0})
    return rows


def run_reference_api(ckpt: Path, inputs: dict, steps: int, scale: float = SCALE) -> dict:
    """The README's reference-API script: ``create_model`` + ``load_state_dict`` + ``DDIMSampler(model).sample`` with
    the reference's ``c_concat``/``c_crossattn`` dicts and ``model.control_scales``, then ``decode_first_stage``."""
    import torch

    from cldm.ddim_hacked import DDIMSampler
    from cldm.model import create_model, load_state_dict

    start = time.perf_counter()
    model = create_model(CONFIG).cpu()
    model.load_state_dict(load_state_dict(ckpt, location="cpu"))
    result = {"load_s": time.perf_counter() - start, "load_peak_rss_gb": peak_rss_gb()}
    model.control_scales = [1.0] * 13
    hint, (_, _, h, w) = inputs["hint"], inputs["x_T"].shape
    cond = {"c_concat": [hint], "c_crossattn": [inputs["c"]]}
    uncond = {"c_concat": [hint], "c_crossattn": [inputs["uc"]]}
    stamps: list[float] = []
    start = time.perf_counter()
    with torch.no_grad():
        samples, _ = DDIMSampler(model).sample(steps, 1, (4, h, w), cond, verbose=False, eta=0.0,
                                               x_T=inputs["x_T"].clone(), unconditional_guidance_scale=scale,
                                               unconditional_conditioning=uncond, progress=False,
                                               callback=lambda i: stamps.append(time.perf_counter()))  # fmt: skip
        decode_start = time.perf_counter()
        image = model.decode_first_stage(samples)
    result |= {"decode_s": time.perf_counter() - decode_start, "whole_s": time.perf_counter() - start,
               "peak_rss_gb": peak_rss_gb(), "step_s": _step_times(start, stamps)}  # fmt: skip
    with torch.no_grad():
        result["flops_per_step"] = count_flops(lambda: DDIMSampler(model).sample(
            1, 1, (4, h, w), cond, verbose=False, x_T=inputs["x_T"].clone(), unconditional_guidance_scale=scale,
            unconditional_conditioning=uncond, progress=False))  # fmt: skip
    result["image"] = image
    return result


def run_project(path_name: str, ckpt: Path, inputs: dict, steps: int, profile: bool = False,
                control_end: float = 1.0, scale: float = SCALE) -> dict:  # fmt: skip
    import torch

    from cldm.control import Control
    from cldm.guidance import CFGDenoiser
    from cldm.inference import use_path
    from cldm.model import load_model
    from ldm.memory import release_mapped_weights
    from ldm.models.diffusion.sampling import sample_ddim
    from ldm.modules.winograd import set_conv_algorithm

    start = time.perf_counter()
    # the allocator as load_model sets it (freed memory kept), except for the reference schedule: glibc's default
    model = load_model(CONFIG, ckpt, low_memory=path_name == "low-memory", tune_allocator=path_name != "reference")
    result = {"load_s": time.perf_counter() - start, "load_peak_rss_gb": peak_rss_gb()}
    path = use_path(model, "fast" if path_name == "low-memory" else path_name)
    control = Control(model.control_model, inputs["hint"], cache=path.reuse_hint, end=control_end)
    denoise = CFGDenoiser(model, inputs["c"], inputs["uc"], scale, [control], batch_cfg=path.batch_cfg)  # 1: one pass
    stamps: list[float] = []

    def sample(n: int) -> torch.Tensor:
        return sample_ddim(denoise, inputs["x_T"].clone(), model.alphas_cumprod, n, progress=False,
                           callback=lambda i, x, x0: stamps.append(time.perf_counter()))  # fmt: skip

    if path.compile:  # compiled on a one-step run of the same shapes, outside the timings
        start = time.perf_counter()
        with torch.no_grad():
            sample(1)
        result["compile_s"] = time.perf_counter() - start
        stamps.clear()
    start = time.perf_counter()
    with torch.no_grad():
        samples = sample(steps)
        decode_start = time.perf_counter()
        if path.page_out:  # as Canny2Image: only the VAE's weights are held while decoding
            release_mapped_weights(model.model, model.control_model)
        image = model.decode_first_stage(samples)
    result["decode_s"] = time.perf_counter() - decode_start
    result["whole_s"] = time.perf_counter() - start
    result["peak_rss_gb"] = peak_rss_gb()  # load, sampling and decode; not the FLOP count below
    result["step_s"] = _step_times(start, stamps)
    t = torch.full((1,), 501, dtype=torch.long)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # FLOPs of the same operations, run eagerly
        one_step = lambda: denoise(inputs["x_T"], t)  # noqa: E731
        result["flops_per_step"] = count_flops(one_step)
        if profile:
            result["kernels"] = kernel_breakdown(one_step)
        set_conv_algorithm(model, "direct")  # the same step's FLOPs with direct convolutions
        result["direct_flops_per_step"] = count_flops(one_step)
    result["image"] = image
    return result


def run_diffusers(ckpt: Path, inputs: dict, steps: int, profile: bool = False, scale: float = SCALE) -> dict:
    import torch
    from omegaconf import OmegaConf

    from cldm.checkpoint import load_state_dict
    from tests.diffusers_port import convert_to_diffusers, diffusers_scheduler

    start = time.perf_counter()
    original = OmegaConf.to_container(OmegaConf.load(CONFIG), resolve=True)
    models = convert_to_diffusers(original, load_state_dict(ckpt))
    unet, controlnet, vae = (models[k][0] for k in ("unet", "controlnet", "vae"))
    del models
    result = {"load_s": time.perf_counter() - start, "load_peak_rss_gb": peak_rss_gb()}
    scheduler = diffusers_scheduler("ddim")  # SD1.5's config: the reference's DDIM grid at 20 steps
    scheduler.set_timesteps(steps)
    guided = scale != 1.0  # guidance 1: the conditional pass alone (as diffusers' pipeline)
    context = torch.cat([inputs["uc"], inputs["c"]]) if guided else inputs["c"]
    hint = torch.cat([inputs["hint"], inputs["hint"]]) if guided else inputs["hint"]

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xx = torch.cat([x, x]) if guided else x
        down, mid = controlnet(xx, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        out = unet(xx, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample  # fmt: skip
        if not guided:
            return out
        e_uncond, e_cond = out.chunk(2)
        return e_uncond + scale * (e_cond - e_uncond)

    x = inputs["x_T"].clone()
    stamps: list[float] = []
    start = time.perf_counter()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(eps(x, t), t, x, eta=0.0).prev_sample
            stamps.append(time.perf_counter())
        decode_start = time.perf_counter()
        image = vae.decode(x / 0.18215).sample
    result["decode_s"] = time.perf_counter() - decode_start
    result["whole_s"] = time.perf_counter() - start
    result["peak_rss_gb"] = peak_rss_gb()  # load, sampling and decode; not the FLOP count below
    result["step_s"] = _step_times(start, stamps)
    with torch.no_grad():
        result["flops_per_step"] = count_flops(lambda: eps(inputs["x_T"], torch.tensor(501)))
        if profile:
            result["kernels"] = kernel_breakdown(lambda: eps(inputs["x_T"], torch.tensor(501)))
    result["image"] = image
    return result


def _step_times(start: float, stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip([start, *stamps[:-1]], stamps)]


def worker(args: argparse.Namespace) -> int:
    """One path in this process; writes its figures (and the decoded image) to ``args.worker_out``."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = torch.load(args.inputs, weights_only=True)
    if args.worker == "diffusers":
        result = run_diffusers(args.ckpt, inputs, args.steps, args.profile, args.scale)
    elif args.worker == "reference-api":
        result = run_reference_api(args.ckpt, inputs, args.steps, args.scale)
    else:
        result = run_project(args.worker, args.ckpt, inputs, args.steps, args.profile, args.control_end, args.scale)
    image = ((result.pop("image")[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    torch.save({"result": result, "image": image}, args.worker_out)
    return 0


def run_worker(path: str, args: argparse.Namespace, inputs: Path, tmp: Path) -> dict:
    out = tmp / f"{path}.pt"
    ckpt = args.low_memory_ckpt if path == "low-memory" else args.ckpt
    cmd = [sys.executable, "-m", "benchmarks.bench_canny2image", "--worker", path, "--worker-out", str(out),
           "--inputs", str(inputs), "--ckpt", str(ckpt), "--steps", str(args.steps),
           "--threads", str(args.threads or 0), "--control-end", str(args.control_end), "--scale", str(args.scale),
           *(["--profile"] if args.profile else [])]  # fmt: skip
    print(f"running {path} ...", file=sys.stderr)
    proc = subprocess.run(cmd, cwd=REPO)  # -m from the repo root: the packages import without an install
    if proc.returncode != 0:
        raise RuntimeError(f"path {path} failed with exit code {proc.returncode}")
    import torch

    return torch.load(out, weights_only=True)


def summarize(name: str, data: dict, gemm: float, base_image: Any) -> dict:
    r = data["result"]
    step = statistics.median(r["step_s"])
    gflops = r["flops_per_step"] / step / 1e9
    direct_flops = r.get("direct_flops_per_step", r["flops_per_step"])  # diffusers: direct convolutions
    row = {"path": name, "step_s": step, "steps_s": r["step_s"], "decode_s": r["decode_s"], "whole_s": r["whole_s"],
           "tflop_per_step": r["flops_per_step"] / 1e12, "direct_tflop_per_step": direct_flops / 1e12,
           "effective_gflops": direct_flops / step / 1e9,
           "gflops": gflops, "gemm_fraction": gflops / gemm, "peak_rss_gb": r["peak_rss_gb"], "load_s": r["load_s"],
           "load_peak_rss_gb": r["load_peak_rss_gb"]}  # fmt: skip
    row["max_abs_diff_vs_fast"] = (
        None if base_image is None else (data["image"].int() - base_image.int()).abs().max().item()
    )
    if "compile_s" in r:
        row["compile_s"] = r["compile_s"]
    if "kernels" in r:
        row["kernels"] = [{**k, "gemm_fraction": k["gflops"] / gemm} for k in r["kernels"]]
    return row


def print_table(rows: list[dict], meta: dict) -> None:
    guidance = f"CFG {meta['scale']:g}" if meta["scale"] != 1.0 else "guidance 1 (one pass a step)"
    print(f"\n{meta['resolution']}x{meta['resolution']}, {meta['steps']} DDIM steps, {guidance}, "
          f"{meta['threads']} threads; fp32 GEMM {meta['gemm_gflops']:.0f} GFLOP/s before, "
          f"{meta['gemm_gflops_after']:.0f} after{'; one core kept busy' if meta['background_load'] else ''}; "
          f"checkpoint {meta['ckpt_gb']:.2f} GB")  # fmt: skip
    head = (f"{'path':<10} {'s/step':>7} {'1st s':>6} {'decode s':>8} {'image s':>8} {'TFLOP/st':>8} {'GFLOP/s':>8} "
            f"{'of GEMM':>7} {'eff GF/s':>8} "
            f"{'peak GB':>7} {'load s':>6} {'load GB':>7} {'max diff':>8}")  # fmt: skip
    print(head)
    for r in rows:
        diff = "-" if r["max_abs_diff_vs_fast"] is None else f"{r['max_abs_diff_vs_fast']}/255"
        print(f"{r['path']:<10} {r['step_s']:7.2f} {r['steps_s'][0]:6.1f} {r['decode_s']:8.1f} {r['whole_s']:8.1f} "
              f"{r['tflop_per_step']:8.2f} {r['gflops']:8.1f} "
              f"{r['gemm_fraction']:7.0%} {r['effective_gflops']:8.1f} {r['peak_rss_gb']:7.2f} {r['load_s']:6.1f} "
              f"{r['load_peak_rss_gb']:7.2f} "
              f"{diff:>8}")  # fmt: skip
    for r in rows:
        if "compile_s" in r:
            print(f"{r['path']}: torch.compile took {r['compile_s']:.0f} s (first run; not in the times above)")


def print_kernels(rows: list[dict]) -> None:
    """One profiled step per path, by kernel (``--profile``)."""
    for row in rows:
        if "kernels" not in row:
            continue
        print(f"\n{row['path']}: one step by kernel (profiled, so a little slower than the table)")
        print(f"{'kernel':<46} {'calls':>5} {'s':>6} {'share':>6} {'TFLOP':>6} {'GFLOP/s':>7} {'of GEMM':>7}")
        for k in row["kernels"]:
            rate = f"{k['gflops']:7.1f} {k['gemm_fraction']:7.0%}" if k["tflop"] > 0 else ""
            print(f"{k['kernel']:<46} {k['calls']:5d} {k['seconds']:6.2f} {k['share']:6.0%} {k['tflop']:6.3f} {rate}")


def flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags that the runs would only meet after minutes of loading (one line), or None."""
    from cldm.pipeline import CannyParams

    if args.threads < 0 or args.threads > (os.cpu_count() or 1):
        return f"--threads must be between 1 and {os.cpu_count()} (0: torch's choice), got {args.threads}"
    if args.repeats < 1 or (args.repeats > 1 and args.presets is None):
        return f"--repeats: at least 1, and above 1 only with --presets; got {args.repeats}"
    if args.presets is not None:
        per_step = [flag for flag, value in (("--steps", args.steps), ("--scale", args.scale),
                                             ("--control-end", args.control_end), ("--profile", args.profile or None))
                    if value is not None]  # fmt: skip
        if per_step:
            return f"{', '.join(per_step)}: per-step mode only; each of --presets has its own settings"
        return None
    if args.peers:
        return "--peers: only with --presets"
    if args.steps is not None and args.steps < 1:
        return f"--steps must be at least 1, got {args.steps}"
    if args.control_end is not None and not 0.0 <= args.control_end <= 1.0:  # NaN fails too
        return f"--control-end must be between 0 and 1 (a fraction of the steps), got {args.control_end}"
    if args.scale is not None:
        lo, hi = CannyParams.RANGES["scale"]
        if not (math.isfinite(args.scale) and lo <= args.scale <= hi):
            return f"--scale must be between {lo:g} and {hi:g} (the pipeline's range), got {args.scale}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=512, help="image side (default 512; 256 for a quick run)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps of the per-step mode (default 20)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--paths", default="fast,reference,diffusers,low-memory",
                   help="comma-separated: fast, reference, diffusers, low-memory, compiled (opt-in), reference-api "
                        "(opt-in: the README's create_model + DDIMSampler script)")  # fmt: skip
    p.add_argument("--low-memory-ckpt", type=Path, default=None,
                   help="bfloat16 copy of --ckpt for the low-memory path (default: made next to it)")
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="random full-size checkpoint (made if missing)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results.json", help="where to write the table")
    p.add_argument("--profile", action="store_true", help="also profile one step per path, by kernel")
    p.add_argument("--scale", type=float, default=None,
                   help=f"guidance scale of the per-step mode, in the pipeline's range (default {SCALE:g}, the "
                        "reference demo's: a CFG step, two passes; 1: one pass a step, the lcm preset's regime)")
    p.add_argument("--presets", default=None,
                   help="time to an image instead: comma-separated presets from reference, dpmpp, lcm, each run by "
                        "this project and by diffusers (benchmarks/presets.py)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1,
                   help="with --presets: rounds of runs, alternating the order; each row: the median whole time, "
                        "the other figures from the run nearest it (default 1)")  # fmt: skip
    p.add_argument("--peers", default="",
                   help="with --presets, also run: openvino, openvino-int8 (the openvino and nncf packages), "
                        "sdcpp, sdcpp-q8_0 (stable-diffusion-cpp-python); each skipped, saying so, when not "
                        "installed")  # fmt: skip
    p.add_argument("--background-load", action="store_true",
                   help="keep one core busy (a one-thread matrix multiply loop) during the runs: a shared machine")
    p.add_argument("--control-end", type=float, default=None,
                   help="the project paths' ControlNet window end (fraction of the steps; default 1): the steps "
                        "after it run the UNet alone")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.worker.startswith("preset:"):
            return presets.worker(args.worker.removeprefix("preset:"), args)
        return worker(args)
    problem = flag_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    args.steps = 20 if args.steps is None else args.steps  # the per-step mode's defaults
    args.scale = SCALE if args.scale is None else args.scale
    args.control_end = 1.0 if args.control_end is None else args.control_end
    if args.presets is not None:
        names = [x.strip() for x in args.presets.split(",") if x.strip()]
        if not names or set(names) - set(presets.PRESETS):
            print(f"error: --presets: choose from {', '.join(presets.PRESETS)}, got {args.presets!r}", file=sys.stderr)
            return 1
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    unknown = set(paths) - set(PATHS)
    if unknown or not paths:
        print(f"error: --paths: unknown path(s) {sorted(unknown)} (choose from {', '.join(PATHS)})",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.resolution % 64 or not 64 <= args.resolution <= 1024:
        print(f"error: --resolution must be a multiple of 64 in [64, 1024], got {args.resolution}", file=sys.stderr)
        return 1
    if "diffusers" in paths:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not installed: skipping the diffusers path (pip install diffusers)", file=sys.stderr)
            paths.remove("diffusers")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    peers = presets.available_peers(args.peers) if args.presets is not None else []
    ensure_checkpoint(args.ckpt)
    if "low-memory" in paths and args.presets is None:
        args.low_memory_ckpt = args.low_memory_ckpt or args.ckpt.with_name(args.ckpt.stem + "_bf16.pth")
        ensure_bf16_copy(args.ckpt, args.low_memory_ckpt)
    background = start_background_load() if args.background_load else None
    try:
        gemm = gemm_gflops()
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            if args.presets is not None:
                implementations = ["project", *(["diffusers"] if "diffusers" in paths else []),
                                   *peers]  # fmt: skip
                rows = presets.run_presets(names, implementations, args, tmp)
            else:
                make_inputs(args.ckpt, args.resolution, tmp / "inputs.pt")
                results = {path: run_worker(path, args, tmp / "inputs.pt", tmp) for path in paths}
        gemm_after = gemm_gflops()
    finally:
        if background is not None:
            background.kill()
    meta = {"resolution": args.resolution, "threads": args.threads or torch.get_num_threads(),
            "gemm_gflops": gemm, "gemm_gflops_after": gemm_after, "background_load": args.background_load,
            "ckpt_gb": args.ckpt.stat().st_size / 1e9, "torch": torch.__version__}  # fmt: skip
    # what the mode ran: each preset has its own steps and guidance
    meta |= {"repeats": args.repeats} if args.presets is not None else {
        "steps": args.steps, "scale": args.scale, "control_end": args.control_end}
    if args.presets is not None:
        presets.print_rows(rows, meta)
    else:
        base = results["fast"]["image"] if "fast" in results else None
        rows = [summarize(name, data, max(gemm, gemm_after), base) for name, data in results.items()]
        print_table(rows, meta)
        print_kernels(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
