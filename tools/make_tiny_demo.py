"""Train the built-in demo from scratch on the CPU: a tiny Stable-Diffusion-style model that draws colored
circles, then a ControlNet on it that makes the circle follow an outline.

    python -m tools.make_tiny_demo            # the shipped recipe (seeded; docs/tiny-demo.md gives its time)
    python -m tools.make_tiny_demo --quick    # a few steps of every stage, to check the plumbing

Stages, each writing into ``--work`` (default ``training/tiny_demo``):

1. data: fill50k-style circles at 64 px whose prompts name the colors (train: seed 0, held-out: seed 1);
2. vae: the config's ``AutoencoderKL`` trained as an autoencoder, made deterministic and scaled so its
   latents have the spread SD's ``scale_factor`` expects;
3. base: the config's base ``LatentDiffusion`` (UNet, the VAE, a frozen random CLIP-style text encoder)
   trained on targets + prompts, 10% empty prompts; EMA weights -> ``tiny_sd.ckpt`` (SD layout);
4. control: ``tool_add_control.py --hint-init kaiming``, then ``tutorial_train.py`` with the base locked (their
   functions, with the flags a user would give; with the reference's hint-encoder init no control emerged within
   2000 steps at lr 1e-4 to 1e-3);
5. checks: the locked weights are bit-identical after training; IoU / color accuracy of the base, the
   ControlNet at init (must equal the base) and every saved training step (``tools/measure_control.py``);
6. ship: the last checkpoint as float16 to ``--ship`` (default ``models/control_tiny_circles.ckpt``), the
   results JSON (with the minutes each stage took) beside it and the IoU-vs-step plot to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from share import DEMO_SCALE, DEMO_UNCOND_HINT

REPO = Path(__file__).resolve().parents[1]

RADIUS_RANGE = (10 / 64, 20 / 64)  # of the 64 px side: radius 10..20 px
RESOLUTION = 64


@dataclass(frozen=True)
class Stage:
    """Optimizer steps, batch size and (peak) learning rate of one training stage."""

    steps: int
    batch: int
    lr: float


@dataclass(frozen=True)
class Recipe:
    """Sizes and steps of every stage (``quick``: a plumbing check that trains for a few steps)."""

    n_train: int = 20000
    n_heldout: int = 100
    vae: Stage = Stage(steps=1500, batch=8, lr=1e-3)
    base: Stage = Stage(steps=4500, batch=32, lr=8e-4)
    base_empty_prompt_prob: float = 0.1
    ema_decay: float = 0.999
    control: Stage = Stage(steps=2750, batch=16, lr=3e-4)
    control_hint_init: str = "kaiming"  # tool_add_control.py --hint-init (the reference init learns far slower)
    control_ckpt_every: int = 250
    curve_heldout: int = 50  # held-out conditions scored per saved step (the final model: all)
    measure_ddim_steps: int = 20
    measure_scale: float = DEMO_SCALE  # the demo's sampling (share.py): the hint in the conditional pass only
    measure_strength: float = 1.0
    measure_uncond_hint: bool = DEMO_UNCOND_HINT

    @classmethod
    def quick(cls) -> Recipe:
        return cls(n_train=64, n_heldout=8, vae=Stage(3, 4, 1e-3), base=Stage(3, 8, 8e-4), control=Stage(4, 4, 3e-4),
                   control_ckpt_every=2, curve_heldout=4, measure_ddim_steps=2)  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def timed(work: Path, stage: str, resumable: bool = False) -> Iterator[None]:
    """Record the wall time of the block, in minutes, as ``stage`` in ``work/minutes.json``: summed over runs for
    a ``resumable`` stage (ControlNet training picks up where it stopped), else the latest run's (stages that
    are skipped once done are not timed again; the measurement is redone every run)."""
    start = time.time()
    yield
    path = work / "minutes.json"
    minutes = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    before = minutes.get(stage, 0.0) if resumable else 0.0
    minutes[stage] = round(before + (time.time() - start) / 60, 2)
    path.write_text(json.dumps(minutes, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ stages


def make_data(work: Path, recipe: Recipe) -> tuple[Path, Path]:
    """Training and held-out folders (fill50k layout), made once."""
    from share import DEMO_COLORS
    from tools.make_fill50k import make_fill50k

    sets = {work / "train": (recipe.n_train, 0), work / "heldout": (recipe.n_heldout, 1)}
    missing = {folder: spec for folder, spec in sets.items() if not (folder / "prompt.json").is_file()}
    if missing:
        with timed(work, "data"):
            for folder, (n, seed) in missing.items():
                make_fill50k(folder, n, RESOLUTION, seed, colors=DEMO_COLORS, radius_range=RADIUS_RANGE)
    return work / "train", work / "heldout"


def load_targets(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """Targets [N, 3, H, W] in [-1, 1] and prompts of a fill50k-style folder."""
    from cldm.data import read_prompt_lines, read_rgb

    entries = read_prompt_lines(folder / "prompt.json")
    images = np.stack([read_rgb(folder / e["target"]) for e in entries])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, [e["prompt"] for e in entries]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_autoencoder(vae: torch.nn.Module, images: torch.Tensor, recipe: Recipe, seed: int) -> float:
    """Train ``vae`` (AutoencoderKL) on images [N, 3, H, W] with L1 + L2 on its posterior mean; returns the
    final L1 (0..2 scale)."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=recipe.vae.lr)
    l1 = torch.tensor(0.0)
    bar = tqdm(range(recipe.vae.steps), desc="vae", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.vae.steps, recipe.vae.lr, warmup=30)
        x = images[torch.randint(0, len(images), (recipe.vae.batch,), generator=gen)]
        rec = vae.decode(vae.encode(x).mode())
        l1 = (rec - x).abs().mean()
        loss = l1 + (rec - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(l1=f"{l1.item():.4f}")
    vae.eval()
    return l1.item()


@torch.no_grad()
def calibrate_autoencoder(vae: torch.nn.Module, images: torch.Tensor, scale_factor: float) -> float:
    """Make the posterior deterministic and its mean spread 1 / ``scale_factor`` (as SD's VAE latents),
    by rescaling ``quant_conv``'s mean rows and ``post_quant_conv``'s inputs: decode(encode(x)) is
    unchanged. Returns the rescaling factor."""
    z_channels = vae.post_quant_conv.in_channels
    means = torch.cat([vae.encode(images[i : i + 256]).mean for i in range(0, len(images), 256)])
    factor = (1.0 / scale_factor) / float(means.std())
    vae.quant_conv.weight[:z_channels] *= factor
    vae.quant_conv.bias[:z_channels] *= factor
    vae.quant_conv.weight[z_channels:] = 0.0
    vae.quant_conv.bias[z_channels:] = -30.0  # log-variance: the posterior's std is e^-15
    vae.post_quant_conv.weight /= factor
    return factor


def train_base(model: Any, images: torch.Tensor, prompts: list[str], recipe: Recipe, seed: int) -> dict:
    """Train the base LatentDiffusion's UNet on (images, prompts) with the reference's loss; returns the EMA
    weights of ``model.model``. Latents and text embeddings are computed once (the VAE and text encoder
    are frozen)."""
    import copy

    from tqdm import tqdm

    with torch.no_grad():
        latents = torch.cat([model.get_first_stage_encoding(model.encode_first_stage(images[i:i + 256]))
                             for i in range(0, len(images), 256)])  # fmt: skip
        vocabulary = sorted(set(prompts)) + [""]
        embeddings = model.get_learned_conditioning(vocabulary)
    index = torch.tensor([vocabulary.index(p) for p in prompts])
    empty = len(vocabulary) - 1
    gen = torch.Generator().manual_seed(seed)
    unet = model.model
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.base.lr, weight_decay=0.0, foreach=True)
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    model.train()
    bar = tqdm(range(recipe.base.steps), desc="base", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.base.steps, recipe.base.lr, warmup=100)
        rows = torch.randint(0, len(latents), (recipe.base.batch,), generator=gen)
        text = index[rows].clone()
        text[torch.rand(len(rows), generator=gen) < recipe.base_empty_prompt_prob] = empty
        t = torch.randint(0, model.num_timesteps, (len(rows),), generator=gen)
        noise = torch.randn(latents[rows].shape, generator=gen)
        loss, _ = model.p_losses(latents[rows], {"c_crossattn": [embeddings[text]]}, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return ema.state_dict()


def make_base(config: Path, work: Path, train: Path, recipe: Recipe, seed: int) -> Path:
    """Stages 2 and 3: the trained VAE and base model as an SD-layout checkpoint ``work/tiny_sd.ckpt``."""
    from cldm.checkpoint import save_checkpoint
    from cldm.model import create_model
    from ldm.modules.diffusionmodules.util import set_activation_checkpointing

    out = work / "tiny_sd.ckpt"
    if out.is_file():
        log(f"{out} exists, skipping the VAE and base model")
        return out
    torch.manual_seed(seed)
    model = create_model(config, base=True)
    set_activation_checkpointing(model, False)  # recomputing activations only saves memory we do not need
    images, prompts = load_targets(train)
    log(f"training the VAE ({recipe.vae.steps} steps) on {len(images)} images")
    vae = model.first_stage_model
    with timed(work, "vae"):
        vae.requires_grad_(True)
        l1 = train_autoencoder(vae, images, recipe, seed)
        vae.requires_grad_(False)
        factor = calibrate_autoencoder(vae, images, model.scale_factor)
    log(f"VAE: final L1 {l1 * 127.5:.1f}/255, latents rescaled by {factor:.3f}")
    log(f"training the base model ({recipe.base.steps} steps)")
    with timed(work, "base"):
        model.model.load_state_dict(train_base(model, images, prompts, recipe, seed))
        save_checkpoint(model.state_dict(), out)
    log(f"wrote {out}")
    return out


def train_control(config: Path, work: Path, base: Path, train: Path, recipe: Recipe, seed: int) -> tuple[Path, Path]:
    """Stage 4: the initial ControlNet from the base (tool_add_control.py's function), then training with
    tutorial_train.py's flags; returns (initial checkpoint, checkpoint folder)."""
    import tutorial_train
    from tool_add_control import make_control_checkpoint

    init = work / "control_ini.ckpt"
    ckpt_dir = work / "control_run" / "checkpoints"
    with timed(work, "control", resumable=True):
        if not init.is_file():
            log(f"initial ControlNet from {base} (hint init {recipe.control_hint_init}) -> {init}")
            make_control_checkpoint(base, init, config, seed, recipe.control_hint_init)
        flags = ["--config", str(config), "--init-ckpt", str(init), "--data", str(train),
                 "--batch-size", str(recipe.control.batch), "--lr", str(recipe.control.lr),
                 "--max-steps", str(recipe.control.steps), "--ckpt-every", str(recipe.control_ckpt_every),
                 "--logger-freq", str(recipe.control.steps), "--log-ddim-steps", str(recipe.measure_ddim_steps),
                 "--log-dir", str(work / "control_run"), "--seed", str(seed), "--no-activation-checkpointing",
                 *(["--resume", "last"] if (ckpt_dir / "last.ckpt").is_file() else [])]  # fmt: skip
        log("training the ControlNet: tutorial_train.py " + " ".join(flags))
        tutorial_train.train(tutorial_train.build_parser().parse_args(flags))
    return init, ckpt_dir


def check_locked(init: Path, trained: Path) -> int:
    """Number of locked (non-ControlNet) tensors, all bit-identical between ``init`` and ``trained``;
    ``RuntimeError`` naming the first that changed."""
    from cldm.checkpoint import load_state_dict

    before, after = load_state_dict(init), load_state_dict(trained)
    locked = [k for k in before if not k.startswith("control_model.")]
    changed = [k for k in locked if not torch.equal(before[k], after[k])]
    if changed:
        raise RuntimeError(f"locked weights changed during ControlNet training: {changed[:3]}")
    return len(locked)


def main(argv: list[str] | None = None) -> int:
    from cldm.cldm import HINT_INITS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "models" / "cldm_tiny.yaml"), help="ControlLDM config")
    p.add_argument("--work", default=str(REPO / "training" / "tiny_demo"), help="working folder (default: %(default)s)")
    p.add_argument("--ship", default=None,
                   help="demo checkpoint out (default: models/control_tiny_circles.ckpt; with --quick: in --work)")
    p.add_argument("--plot", default=None,
                   help="IoU-vs-step plot out (default: docs/tiny_demo_iou.png; with --quick: in --work)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (checks the plumbing, no quality)")
    p.add_argument("--hint-init", choices=HINT_INITS, default=Recipe.control_hint_init,
                   help="tool_add_control.py --hint-init (default: %(default)s)")  # fmt: skip
    args = p.parse_args(argv)
    recipe = replace(Recipe.quick() if args.quick else Recipe(), control_hint_init=args.hint_init)
    config, work = Path(args.config), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:  # a plumbing check never replaces the shipped demo
        ship, plot = work / "control_tiny_circles.ckpt", work / "tiny_demo_iou.png"
    else:
        ship, plot = REPO / "models" / "control_tiny_circles.ckpt", REPO / "docs" / "tiny_demo_iou.png"
    ship, plot = Path(args.ship or ship), Path(args.plot or plot)
    start = time.time()
    log(f"data: {recipe.n_train} training and {recipe.n_heldout} held-out circles in {work}")
    train, heldout = make_data(work, recipe)
    base = make_base(config, work, train, recipe, args.seed)
    init, ckpt_dir = train_control(config, work, base, train, recipe, args.seed)
    trained = ckpt_dir / "last.ckpt"
    log(f"locked weights bit-identical after training: {check_locked(init, trained)} tensors")
    from tools.convert_checkpoint import convert_checkpoint
    from tools.measure_control import load_conditions, measure, plot_curve

    conditions = load_conditions(heldout)
    with timed(work, "measure"):
        sampling = {"steps": recipe.measure_ddim_steps, "scale": recipe.measure_scale,
                    "strength": recipe.measure_strength, "uncond_hint": recipe.measure_uncond_hint}  # fmt: skip
        results = measure(config, conditions, base=str(base), ckpts=(str(init), str(trained)), **sampling)
        results["curve"] = measure(config, conditions[:recipe.curve_heldout], curve=str(ckpt_dir), curve_init=str(init),
                                   **sampling)["curve"]  # fmt: skip
    results["curve_n"] = recipe.curve_heldout
    if results["controlnet"][0]["max_abs_diff_to_base"] != 0:
        raise RuntimeError("the ControlNet at init does not reproduce the base model exactly")
    minutes = json.loads((work / "minutes.json").read_text(encoding="utf-8"))
    results["minutes"] = {**minutes, "total": round(sum(minutes.values()), 1)}
    convert_checkpoint(trained, ship, torch.float16, config)  # schedule buffers stay float32
    ship.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot_curve([(e["step"], e["iou"]) for e in results["curve"]], plot, "tiny ControlNet: held-out IoU vs step")
    total = results["minutes"]["total"]
    log(f"done in {(time.time() - start) / 60:.1f} min ({total} min over all runs in {work}): {ship}, {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
