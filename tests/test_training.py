"""Training: tool_add_control, tutorial_train with Lightning (locked SD, resume, DDP, WebDataset, image logs)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

import tool_add_control
import tutorial_train
from cldm.checkpoint import load_state_dict, save_checkpoint
from cldm.data import write_webdataset
from cldm.model import create_model
from ldm.modules.diffusionmodules.util import set_activation_checkpointing
from tests.conftest import REPO, TINY_CONFIG, with_flags
from tests.test_training_data import corrupt_idat_png
from tools.make_fill50k import make_fill50k
from tools.make_random_checkpoint import fill_zero_parameters, make_random_checkpoint

LOCKED_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD checkpoint in the ldm layout (no control_model.*), every layer random."""
    tmp = tmp_path_factory.mktemp("base")
    make_random_checkpoint(TINY_CONFIG, tmp / "full.ckpt", seed=3, fill_zeros_std=0.05)
    sd = {k: v for k, v in load_state_dict(tmp / "full.ckpt").items() if not k.startswith("control_model.")}
    save_checkpoint(sd, tmp / "tiny_sd.ckpt")
    return tmp / "tiny_sd.ckpt"


@pytest.fixture(scope="module")
def ini_ckpt(base_ckpt: Path) -> Path:
    out = base_ckpt.with_name("control_tiny_ini.ckpt")
    assert tool_add_control.main([str(base_ckpt), str(out), "--config", str(TINY_CONFIG)]) == 0
    return out


@pytest.fixture(scope="module")
def fill50k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fill50k")
    make_fill50k(root, n=8, resolution=64, seed=0)
    return root


def train_args(ini_ckpt: Path, fill50k: Path, log_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--init-ckpt", str(ini_ckpt), "--data", str(fill50k),
            "--log-dir", str(log_dir), "--batch-size", "2", "--logger-freq", "1000", "--log-ddim-steps", "2",
            "--ckpt-every", "2", "--lr", "1e-3", *extra]  # fmt: skip


class Snapshot(pl.Callback):
    """Records the weights at the start and end of training, and the optimizer's parameters."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.steps.append(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.module = pl_module
        self.after = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.global_step = trainer.global_step


# --- tool_add_control ---------------------------------------------------------------------------------


def test_add_control_copies_the_encoder_and_zeroes_the_zero_convs(base_ckpt: Path, ini_ckpt: Path) -> None:
    base, ini = load_state_dict(base_ckpt), load_state_dict(ini_ckpt)
    copied = [k for k in ini if k.startswith("control_model.") and "model.diffusion_model." + k[14:] in base]
    assert len(copied) > 100
    for key in copied:
        assert torch.equal(ini[key], base["model.diffusion_model." + key[14:]]), key
    zero = [k for k in ini if k.startswith(("control_model.zero_convs.", "control_model.middle_block_out."))]
    assert zero and all(not ini[k].any() for k in zero)
    assert ini["control_model.input_hint_block.0.weight"].abs().sum() > 0  # freshly initialised, not copied
    assert all(torch.equal(ini[k], v) for k, v in base.items() if k in ini)


@torch.no_grad()
def test_kaiming_hint_init_keeps_the_hint_signal(base_ckpt: Path, ini_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "kaiming_ini.ckpt"
    args = [str(base_ckpt), str(out), "--config", str(TINY_CONFIG), "--hint-init", "kaiming"]
    assert tool_add_control.main(args) == 0
    ini, kaiming = load_state_dict(ini_ckpt), load_state_dict(out)
    hint_keys = [k for k in kaiming if k.startswith("control_model.input_hint_block.")]
    assert len(hint_keys) == 16  # 8 convs, the same keys and shapes as the reference init
    assert all(kaiming[k].shape == ini[k].shape for k in hint_keys)
    assert not kaiming["control_model.input_hint_block.14.weight"].any()  # the last conv is still zero
    assert all(not kaiming[f"control_model.input_hint_block.{2 * i}.bias"].any() for i in range(7))
    assert all(torch.equal(kaiming[k], ini[k]) for k in kaiming if not k.startswith("control_model.input_hint"))

    outline = torch.zeros(4, 3, 64, 64)
    for i, r in enumerate((8, 12, 16, 20)):
        ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
        outline[i, :, ((xs - 32) ** 2 + (ys - 32) ** 2 - r * r).abs() < r] = 1.0

    def varying_signal(state: dict[str, torch.Tensor]) -> float:
        model = create_model(TINY_CONFIG)
        model.load_state_dict(state)
        features = outline
        for layer in list(model.control_model.input_hint_block)[:-1]:
            features = layer(features)
        return (features - features.mean(0)).std().item()  # the part that tells the hints apart

    ratio = varying_signal(kaiming) / varying_signal(ini)
    assert ratio > 100, ratio


@torch.no_grad()
def test_first_prediction_equals_the_base_unet(ini_ckpt: Path) -> None:
    model = create_model(TINY_CONFIG).eval()
    model.load_state_dict(load_state_dict(ini_ckpt))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    context = torch.randn(2, 77, 32, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    controlled = model.apply_model(x, t, {"c_concat": [hint], "c_crossattn": [context]})
    base = model.model.diffusion_model(x=x, timesteps=t, context=context, control=None)
    assert torch.equal(controlled, base) and base.abs().max() > 0


def test_add_control_names_a_tensor_of_the_wrong_shape() -> None:
    scratch = {"control_model.input_blocks.0.0.weight": torch.zeros(2),
               "control_model.zero_convs.0.0.bias": torch.ones(2)}  # fmt: skip
    pretrained = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"^model\.diffusion_model\.input_blocks\.0\.0\.weight: shape \(3,\) in the SD "
                                         r"checkpoint, \(2,\) expected for control_model\.input_blocks\.0\.0\.weight"):
        tool_add_control.add_control(scratch, pretrained)
    pretrained["model.diffusion_model.input_blocks.0.0.weight"] = torch.full((2,), 3, dtype=torch.float64)
    target, new = tool_add_control.add_control(scratch, pretrained)
    assert new == ["control_model.zero_convs.0.0.bias"] and torch.equal(target[new[0]], scratch[new[0]])
    copied = target["control_model.input_blocks.0.0.weight"]
    assert copied.dtype == torch.float32 and copied.tolist() == [3.0, 3.0]


@pytest.mark.parametrize("problem", ["exists", "missing"])
def test_add_control_errors(base_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, problem: str) -> None:
    out = tmp_path / "out.ckpt"
    src = base_ckpt if problem == "exists" else tmp_path / "nope.ckpt"
    if problem == "exists":
        out.write_bytes(b"x")
    assert tool_add_control.main([str(src), str(out), "--config", str(TINY_CONFIG)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert ("already exists" if problem == "exists" else "not found") in err


# --- training -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_locked_training_changes_only_the_controlnet(
    ini_ckpt: Path, fill50k: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    snap = Snapshot()
    assert tutorial_train.main(train_args(ini_ckpt, fill50k, tmp_path, "--max-steps", "3"), callbacks=[snap]) == 0
    assert snap.global_step == 3
    for key, before in snap.before.items():
        if key.startswith(LOCKED_PREFIXES):
            assert torch.equal(snap.after[key], before), key
    zero_convs = [k for k in snap.after if k.startswith("control_model.zero_convs.")]
    assert any(snap.after[k].any() for k in zero_convs)
    model = snap.module
    assert snap.optimized == {id(p) for p in model.control_model.parameters()}
    for p in model.model.parameters():  # no gradient memory for the locked SD
        assert not p.requires_grad and p.grad is None
    assert all(p.requires_grad for p in model.control_model.parameters())
    out, err = capfd.readouterr()
    progress = out + err
    assert "train/loss" in progress and ("it/s" in progress or "s/it" in progress)


def test_unlocked_training_adds_the_decoder_half(ini_ckpt: Path, fill50k: Path, tmp_path: Path) -> None:
    snap = Snapshot()
    args = train_args(ini_ckpt, fill50k, tmp_path, "--max-steps", "1", "--no-sd-locked")
    assert tutorial_train.main(args, callbacks=[snap]) == 0
    unet = snap.module.model.diffusion_model
    decoder = [*unet.output_blocks.parameters(), *unet.out.parameters()]
    assert snap.optimized == {id(p) for p in [*snap.module.control_model.parameters(), *decoder]}
    assert not any(p.requires_grad for p in unet.input_blocks.parameters())
    changed = [k for k in snap.after if k.startswith("model.diffusion_model.output_blocks.")
               and not torch.equal(snap.after[k], snap.before[k])]  # fmt: skip
    assert changed


@torch.no_grad()
def test_only_mid_control_feeds_only_the_middle_block(tiny_model: torch.nn.Module) -> None:
    model = tiny_model
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    cond = {"c_concat": [torch.rand(1, 3, 64, 64, generator=g)], "c_crossattn": [torch.randn(1, 77, 32, generator=g)]}

    def eps(scales: list[float], only_mid: bool) -> torch.Tensor:
        model.control_scales, model.only_mid_control = scales, only_mid
        return model.apply_model(x, t, cond)

    try:
        assert torch.equal(eps([1.0] * 13, True), eps([0.0] * 12 + [1.0], True))
        assert not torch.equal(eps([1.0] * 13, True), eps([1.0] * 12 + [0.0], True))
        assert not torch.equal(eps([1.0] * 13, True), eps([1.0] * 13, False))
    finally:
        model.control_scales, model.only_mid_control = [1.0] * 13, False


def test_empty_prompt_drop(tiny_model: torch.nn.Module) -> None:
    model = tiny_model
    prompts = [f"prompt {i}" for i in range(2000)]
    try:
        model.ucg_prng = np.random.RandomState(0)
        model.ucg_training = {"txt": {"p": 0.5, "val": ""}}
        dropped = model.apply_ucg({"txt": prompts})["txt"]
        assert abs(sum(p == "" for p in dropped) / len(prompts) - 0.5) < 0.05
        assert all(d in ("", p) for d, p in zip(dropped, prompts))
        model.ucg_training = {"txt": {"p": 0.0, "val": ""}}
        assert model.apply_ucg({"txt": prompts})["txt"] == prompts
    finally:
        model.ucg_training = {}


def test_activation_checkpointing_gives_the_same_gradients(fresh_tiny_model: torch.nn.Module) -> None:
    model = fresh_tiny_model
    fill_zero_parameters(model, 0.05, torch.Generator().manual_seed(3))  # let gradients reach the hint encoder
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300])
    cond = {"c_concat": [torch.rand(1, 3, 64, 64, generator=g)], "c_crossattn": [torch.randn(1, 77, 32, generator=g)]}
    grads = []
    for enabled in (False, True):
        assert set_activation_checkpointing(model, enabled) > 0
        model.zero_grad()
        model.apply_model(x, t, cond).square().mean().backward()
        grads.append(model.control_model.input_hint_block[0].weight.grad.clone())
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_images_of_other_sizes_train_at_the_resolution(ini_ckpt: Path, tmp_path: Path) -> None:
    """80x48, 72x72 and 64x128 pairs (a traceback minutes into the run before) train at --resolution 64."""
    root = tmp_path / "data"
    make_fill50k(root, n=4, resolution=128, seed=0)
    for i, size in enumerate([(80, 48), (72, 72), (64, 128), (128, 128)]):
        for folder in ("source", "target"):
            with Image.open(root / folder / f"{i}.png") as image:
                image.resize(size).save(root / folder / f"{i}.png")

    class Shapes(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, ...]] = []

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict,
                                 *args: object) -> None:  # fmt: skip
            self.seen.append((*batch["jpg"].shape, *batch["hint"].shape))

    shapes = Shapes()
    args = train_args(ini_ckpt, root, tmp_path / "logs", "--max-steps", "2", "--resolution", "64")
    assert tutorial_train.main(args, callbacks=[shapes]) == 0
    assert shapes.seen == [(2, 64, 64, 3, 2, 64, 64, 3)] * 2


@pytest.mark.slow
def test_resume_restores_the_run_exactly(ini_ckpt: Path, fill50k: Path, tmp_path: Path) -> None:
    whole, first, second = Snapshot(), Snapshot(), Snapshot()
    assert tutorial_train.main(train_args(ini_ckpt, fill50k, tmp_path / "a", "--max-steps", "4"), [whole]) == 0
    assert tutorial_train.main(train_args(ini_ckpt, fill50k, tmp_path / "b", "--max-steps", "2"), [first]) == 0
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2

    class CheckRestored(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            assert trainer.global_step == saved["global_step"]
            state = pl_module.state_dict()
            assert all(torch.equal(state[k], v) for k, v in saved["state_dict"].items())
            restored = trainer.optimizers[0].state_dict()["state"]
            for idx, entry in saved["optimizer_states"][0]["state"].items():
                assert all(torch.equal(restored[idx][name], value) for name, value in entry.items())
            self.checked = True

    check = CheckRestored()
    resumed = train_args(ini_ckpt, fill50k, tmp_path / "b", "--max-steps", "4", "--resume", "last")
    assert tutorial_train.main(resumed, [check, second]) == 0
    assert check.checked
    assert first.steps + second.steps == whole.steps == [1, 2, 3, 4]  # no step lost or repeated
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step=*.ckpt"))
    assert names == sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step=*.ckpt"))
    # a Lightning checkpoint of the run loads through the scripts' loader
    assert "control_model.zero_convs.0.0.weight" in load_state_dict(tmp_path / "b" / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_image_logs_are_png_grids(ini_ckpt: Path, fill50k: Path, tmp_path: Path) -> None:
    args = train_args(ini_ckpt, fill50k, tmp_path, "--max-steps", "2", "--precision", "bf16-mixed")
    args[args.index("--logger-freq") + 1] = "2"
    assert tutorial_train.main(args) == 0
    logs = sorted(p.name for p in (tmp_path / "image_log" / "train").iterdir())
    expected = ["conditioning", "control", "reconstruction", "samples_cfg_scale_9.00"]
    assert logs == [f"{k}_gs-000002_e-000000_b-000001.png" for k in expected]
    with Image.open(tmp_path / "image_log" / "train" / logs[1]) as grid:
        assert grid.size == (2 * 66 + 2, 66 + 2)  # two 64 px images, 2 px padding


@pytest.mark.slow
def test_webdataset_shards_train(ini_ckpt: Path, fill50k: Path, tmp_path: Path) -> None:
    shards = write_webdataset(fill50k, str(tmp_path / "shards" / "shard-%06d.tar"), samples_per_shard=4)
    assert len(shards) == 2
    snap = Snapshot()
    args = train_args(ini_ckpt, fill50k, tmp_path / "logs", "--max-steps", "2",
                      "--webdataset", str(tmp_path / "shards" / "shard-{000000..000001}.tar"))  # fmt: skip
    assert tutorial_train.main(args, callbacks=[snap]) == 0
    assert snap.global_step == 2
    assert any(not torch.equal(snap.after[k], snap.before[k]) for k in snap.after if k.startswith("control_model."))


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_weights(ini_ckpt: Path, fill50k: Path, tmp_path: Path) -> None:
    args = train_args(ini_ckpt, fill50k, tmp_path, "--max-steps", "3", "--devices", "2", "--strategy", "ddp",
                      "--weights-digest")  # fmt: skip
    proc = subprocess.run([sys.executable, str(REPO / "tutorial_train.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(tmp_path / "checkpoints" / f"weights_digest_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert digests[0] == digests[1] and digests[0][0] == "3"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--init-ckpt", "nope.ckpt"], "nope.ckpt: initial checkpoint not found"),
        (["--data", "nowhere"], "nowhere/prompt.json: training data not found"),
        (["--resume", "last"], "last.ckpt: checkpoint to resume from not found"),
    ],
)
def test_bad_flags_are_one_line(
    ini_ckpt: Path, fill50k: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    args = with_flags(train_args(ini_ckpt, fill50k, tmp_path), extra)
    assert tutorial_train.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


# --- checkpoints and resume (issue 20 item 10) -----------------------------------------------------------


def saved_steps(ckpt_dir: Path, pattern: str = "*") -> dict[str, int]:
    """``{file name: global_step}`` of every file matching ``pattern`` in the checkpoint folder (a file that is
    not a whole checkpoint fails the test)."""
    return {p.name: int(torch.load(p, map_location="cpu", weights_only=False)["global_step"])
            for p in sorted(ckpt_dir.glob(pattern))}  # fmt: skip


def logged_steps(log_dir: Path) -> list[int]:
    """The ``step`` column of ``metrics.csv``, in file order (the header must appear once, as the first line)."""
    lines = (log_dir / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert "step" in header and all(line.split(",") != header for line in lines[1:])
    return [int(line.split(",")[header.index("step")]) for line in lines[1:]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop,every,expected",
    [
        (["--max-steps", "5"], 2, [2, 4, 5]),  # the final step lies between two saves
        (["--max-epochs", "1"], 3, [3, 4]),  # 8 samples / batch 2: the epoch ends at step 4
        (["--max-steps", "4"], 2, [2, 4]),  # the final step is a save step: saved once
        (["--max-steps", "1"], 1000, [1]),  # a run shorter than --ckpt-every
    ],
)
def test_the_final_step_is_always_saved(
    ini_ckpt: Path, fill50k: Path, tmp_path: Path, stop: list[str], every: int, expected: list[int]
) -> None:
    snap = Snapshot()
    args = with_flags(train_args(ini_ckpt, fill50k, tmp_path, *stop), ["--ckpt-every", str(every)])
    assert tutorial_train.main(args, callbacks=[snap]) == 0
    assert saved_steps(tmp_path / "checkpoints") == {"last.ckpt": expected[-1],
                                                      **{f"step={s:06d}.ckpt": s for s in expected}}  # fmt: skip
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.equal(last["state_dict"][k], v) for k, v in snap.after.items())  # the weights training ended with


def test_a_run_stopped_mid_epoch_resumes_in_that_epoch(ini_ckpt: Path, fill50k: Path, tmp_path: Path) -> None:
    """``--max-steps 3`` (4 batches an epoch) stops mid-epoch on a step that is no save step: its final save holds
    the batch's loop state, so ``--resume last --max-epochs 2`` runs the rest of epoch 0 and all of epoch 1 (step
    8), as it does from a periodic save (``--ckpt-every 1``)."""
    for every in (2, 1):
        log = tmp_path / f"every{every}"
        first = with_flags(train_args(ini_ckpt, fill50k, log, "--max-steps", "3"), ["--ckpt-every", str(every)])
        assert tutorial_train.main(first) == 0
        snap = Snapshot()
        assert tutorial_train.main(train_args(ini_ckpt, fill50k, log, "--max-epochs", "2", "--resume", "last"),
                                   callbacks=[snap]) == 0  # fmt: skip
        assert snap.global_step == 8, every


def test_a_resumed_log_keeps_its_earlier_rows(tmp_path: Path) -> None:
    """The CSV writer of a resumed run keeps the rows before the resume step (a ragged row's extra cells dropped),
    header sorted as Lightning appends; a new run's writer starts the file afresh and says so."""
    from cldm.training import appending_writer

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss,epoch\n0,1.5,0\n1,1.25,0\n2,1.0,0,EXTRA\n3,0.5,0\n")
    writer = appending_writer(str(tmp_path), keep_before_step=3)
    assert writer.metrics_keys == ["epoch", "loss", "step"]
    assert metrics.read_text().splitlines() == ["epoch,loss,step", "0,1.5,0", "0,1.25,1", "0,1.0,2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # nothing left aside
    metrics.rename(tmp_path / "metrics.csv.resuming")  # as a run killed between its renames leaves it
    assert appending_writer(str(tmp_path), keep_before_step=3).metrics_keys == ["epoch", "loss", "step"]
    assert len(metrics.read_text().splitlines()) == 4
    with pytest.warns(UserWarning, match="Previous log files in this directory will be deleted"):
        appending_writer(str(tmp_path), keep_before_step=0)
    assert not metrics.exists()


@pytest.mark.slow
def test_resumed_runs_keep_last_ckpt_newest_and_append_to_the_logs(
    ini_ckpt: Path, fill50k: Path, tmp_path: Path
) -> None:
    ckpts = tmp_path / "checkpoints"

    def run(max_steps: int, every: int, *resume: str) -> None:
        args = with_flags(train_args(ini_ckpt, fill50k, tmp_path, "--max-steps", str(max_steps), *resume),
                          ["--ckpt-every", str(every)])  # fmt: skip
        assert tutorial_train.main(args) == 0

    run(2, 2)
    run(3, 1, "--resume", "last")  # another --ckpt-every: Lightning no longer knows last.ckpt as its own
    assert saved_steps(ckpts) == {"last.ckpt": 3, "step=000002.ckpt": 2, "step=000003.ckpt": 3}
    run(5, 2, "--resume", "last")
    assert saved_steps(ckpts) == {"last.ckpt": 5, **{f"step={s:06d}.ckpt": s for s in (2, 3, 4, 5)}}
    assert logged_steps(tmp_path) == [0, 1, 2, 3, 4]  # one row per step of the three runs, in order
    # back to an older state: last.ckpt is the newest state again; the rows of the abandoned steps 3-5 go
    run(3, 2, "--resume", str(ckpts / "step=000002.ckpt"))
    assert saved_steps(ckpts)["last.ckpt"] == 3
    assert logged_steps(tmp_path) == [0, 1, 2]


KILL_DURING_SAVE = """
import builtins, os, shutil, signal, sys
from pathlib import Path
import tutorial_train

ckpt_dir, kill_at = Path({ckpt_dir!r}).resolve(), {kill_at}
shutil._USE_CP_SENDFILE = False  # copies across filesystems go through file.write as well
real_open, opened = builtins.open, []

class KilledOnWrite:
    def __init__(self, f):
        self.f = f
    def write(self, data):  # the file exists, empty: the process dies here
        os.kill(os.getpid(), signal.SIGKILL)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)
    def __getattr__(self, name):
        return getattr(self.f, name)

def open_(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if isinstance(file, (str, os.PathLike)) and "w" in mode and Path(file).resolve().parent == ckpt_dir:
        opened.append(file)
        if len(opened) == kill_at:
            return KilledOnWrite(f)
    return f

builtins.open = open_
sys.exit(tutorial_train.main({args!r}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3, 4], ids=["killed-saving-step-4", "killed-saving-last"])
def test_kill_during_a_save_keeps_the_last_whole_checkpoint(
    ini_ckpt: Path, fill50k: Path, tmp_path: Path, kill_at: int
) -> None:
    """``--ckpt-every 2 --max-steps 4`` writes step 2, last, step 4, last; the process is SIGKILLed as the
    ``kill_at``-th of these files is first written, with the temp folder on another filesystem where there is one
    (a tmpfs), as users' machines have. ``last.ckpt`` must still be step 2's whole state, and resume from it."""
    log_dir, ckpts = tmp_path / "logs", tmp_path / "logs" / "checkpoints"
    other_fs = Path("/dev/shm")
    temp = other_fs if other_fs.is_dir() and other_fs.stat().st_dev != tmp_path.stat().st_dev else tmp_path
    temp = Path(tempfile.mkdtemp(dir=temp))
    try:
        args = train_args(ini_ckpt, fill50k, log_dir, "--max-steps", "4")
        script = KILL_DURING_SAVE.format(ckpt_dir=str(ckpts), kill_at=kill_at, args=args)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                              cwd=REPO, env={**os.environ, "TMPDIR": str(temp)})  # fmt: skip
    finally:
        shutil.rmtree(temp)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    steps = saved_steps(ckpts, "*.ckpt")  # every file by a checkpoint's name is whole
    assert steps["last.ckpt"] == 2 and steps["step=000002.ckpt"] == 2

    resumed = train_args(ini_ckpt, fill50k, log_dir, "--max-steps", "4", "--resume", "last")
    assert tutorial_train.main(resumed) == 0
    assert saved_steps(ckpts) == {"last.ckpt": 4, "step=000002.ckpt": 2, "step=000004.ckpt": 4}  # no .partial left


def lightning_like(ini_ckpt: Path, path: Path, drop: str | None = None) -> Path:
    """A checkpoint with the entries Lightning resumes from (weights of ``ini_ckpt``, less ``drop``)."""
    state = {k: v for k, v in load_state_dict(ini_ckpt).items() if k != drop}
    torch.save({"pytorch-lightning_version": pl.__version__, "global_step": 2, "epoch": 0, "state_dict": state,
                "optimizer_states": [{}], "lr_schedulers": [], "loops": {}, "callbacks": {}}, path)  # fmt: skip
    return path


def unusable(kind: str, ini_ckpt: Path, tmp: Path) -> Path:
    path = tmp / f"{kind}.ckpt"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    elif kind == "truncated":
        whole = lightning_like(ini_ckpt, tmp / "whole.ckpt").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "text":
        path.write_text("step 2\n")
    elif kind == "weights":  # what tool_add_control and save_checkpoint write
        save_checkpoint(load_state_dict(ini_ckpt), path)
    elif kind == "bare-state-dict":
        torch.save(load_state_dict(ini_ckpt), path)
    elif kind == "safetensors":
        path = tmp / "weights.safetensors"
        save_checkpoint(load_state_dict(ini_ckpt), path)
    return path


@pytest.mark.parametrize(
    "kind,message",
    [
        ("missing", "checkpoint to resume from not found"),
        ("folder", "is a folder, not a checkpoint file"),
        ("empty", "is empty (0 bytes)"),
        ("truncated", "not a readable checkpoint (truncated or corrupt?)"),
        ("text", "not a readable checkpoint (truncated or corrupt?)"),
        ("weights", "not a Lightning training checkpoint (it has no pytorch-lightning_version, optimizer_states"),
        ("bare-state-dict", "not a Lightning training checkpoint"),
        ("safetensors", "not a Lightning training checkpoint"),
    ],
)
def test_an_unusable_resume_file_is_one_line_before_the_model_is_built(
    ini_ckpt: Path, fill50k: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    kind: str, message: str,
) -> None:  # fmt: skip
    def never(args: object) -> None:
        raise AssertionError("the model was built")

    monkeypatch.setattr(tutorial_train, "build_model", never)
    path = unusable(kind, ini_ckpt, tmp_path)
    assert tutorial_train.main(train_args(ini_ckpt, fill50k, tmp_path / "logs", "--resume", str(path))) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --resume {path}: {message}"), err
    assert not (tmp_path / "logs" / "checkpoints" / "last.ckpt").exists()


def test_a_resume_file_of_another_model_is_one_line(
    ini_ckpt: Path, fill50k: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = lightning_like(ini_ckpt, tmp_path / "other.ckpt", drop="control_model.zero_convs.0.0.weight")
    assert tutorial_train.main(train_args(ini_ckpt, fill50k, tmp_path / "logs", "--resume", str(path))) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: --resume {path}: does not match the model config: 1 missing keys " \
                  "(control_model.zero_convs.0.0.weight)"


def test_checkpoint_writes_replace_the_file_from_a_partial_file_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cldm.training import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((Path(a), Path(b))), real_replace(a, b))[1])
    io.save_checkpoint({"global_step": 2}, path)
    assert renames == [(path.with_name("last.ckpt.partial"), path)]  # same folder: never a copy across filesystems
    assert torch.load(path)["global_step"] == 2

    def disk_full(obj: object, f: object) -> None:
        f.write(b"PK half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0\nmore")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as info:
        io.save_checkpoint({"global_step": 3}, path)
    assert str(info.value) == f"{path}: cannot write the checkpoint ([enforce fail at inline_container.cc:595] . " \
                              "unexpected pos 64 vs 0)"
    monkeypatch.undo()
    assert torch.load(path)["global_step"] == 2 and os.listdir(path.parent) == ["last.ckpt"]


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_one_line(
    ini_ckpt: Path, fill50k: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(obj: object, f: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", disk_full)
    args = with_flags(train_args(ini_ckpt, fill50k, tmp_path, "--max-steps", "2"), ["--ckpt-every", "1"])
    assert tutorial_train.main(args) == 1
    err = capsys.readouterr().err  # the progress bar's lines, then the error
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(
        f"error: {tmp_path / 'checkpoints' / 'step=000001.ckpt'}: cannot write the checkpoint "
        "([enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0)")
    assert not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("kind,workers", [("jpeg", 0), ("png", 1)])
def test_an_image_that_cannot_be_decoded_mid_run_is_one_line(
    ini_ckpt: Path, fill50k: Path, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, workers: int
) -> None:
    data = tmp_path / "data"
    shutil.copytree(fill50k, data)
    bad = data / "target" / ("1.jpg" if kind == "jpeg" else "1.png")
    if kind == "jpeg":  # a download cut at 60%: the header is whole, the pixels are not
        jpeg = tmp_path / "whole.jpg"
        Image.open(fill50k / "target" / "1.png").save(jpeg)
        bad.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size * 6 // 10])
        (data / "target" / "1.png").unlink()
        prompt = data / "prompt.json"
        prompt.write_text(prompt.read_text().replace('"target/1.png"', '"target/1.jpg"'))
    else:  # pixel data that does not inflate, every chunk CRC right
        bad.write_bytes(corrupt_idat_png())
    args = with_flags(train_args(ini_ckpt, data, tmp_path / "logs", "--max-steps", "4"),
                      ["--num-workers", str(workers), "--ckpt-every", "1000"])  # fmt: skip
    assert tutorial_train.main(args) == 1  # 8 pairs in batches of 2: the first epoch draws target/1.jpg
    err = capsys.readouterr().err  # the progress bar's lines, then the error
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"error: {bad}: unreadable image "
                                                 "(the pixel data cannot be decoded: truncated or corrupt)")


def test_a_first_run_in_a_new_log_dir_gives_no_leftover_warning(tmp_path: Path) -> None:
    from cldm.checkpoint import check_writable_dir
    from cldm.training import AppendingCSVLogger

    check_writable_dir(tmp_path / "logs" / "checkpoints")  # what tutorial_train does before the logger starts
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's "Experiment logs directory ... exists and is not empty"
        AppendingCSVLogger(tmp_path / "logs").experiment.log_metrics({"loss": 1.0}, step=0)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["checkpoints"]  # metrics are written at save
