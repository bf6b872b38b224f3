"""Fine-tune a ControlNet on fill50k-style data with PyTorch Lightning (the reference's tutorial, CPU-first).

    python tutorial_train.py                                   # the reference's defaults
    python tutorial_train.py --config models/cldm_tiny.yaml --init-ckpt tiny_ini.ckpt --max-steps 100
    python tutorial_train.py --devices 2 --strategy ddp        # two processes (gloo on CPU)
    python tutorial_train.py --resume last                     # continue from <ckpt-dir>/last.ckpt

The initial checkpoint comes from ``tool_add_control.py``. The locked SD model gets no gradients;
only the ControlNet (plus the UNet's decoder half with ``--no-sd-locked``) is trained. Half of the
prompts are replaced by "" during training (``--empty-prompt-prob``), as in the paper.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a ControlNet (the reference's tutorial_train.py, with flags).")
    p.add_argument("--config", default=str(REPO / "models" / "cldm_v15.yaml"),
                   help="model config (default: the repo's models/cldm_v15.yaml)")
    p.add_argument("--init-ckpt", "--resume-path", dest="init_ckpt", default="./models/control_sd15_ini.ckpt",
                   help="initial weights from tool_add_control.py (default: %(default)s)")
    p.add_argument("--data", default="./training/fill50k", help="fill50k folder with prompt.json (%(default)s)")
    p.add_argument("--webdataset", default=None, metavar="SHARDS",
                   help="train on WebDataset tar shards instead (glob or brace pattern: 'shards/{000000..000009}.tar')")
    p.add_argument("--resolution", type=int, default=None,
                   help="training size in pixels, a multiple of 64 (default: the images' own size, as the reference)")
    p.add_argument("--resize", choices=["none", "center-crop", "stretch"], default=None,
                   help="with --resolution, what happens to images of another size: center-crop (the default "
                        "once --resolution is given; shorter side scaled, as diffusers), stretch (both sides scaled) "
                        "or none (refused before training); without --resolution images keep their own size")
    p.add_argument("--batch-size", type=int, default=4, help="batch size per process (default: %(default)s)")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=1e-5, help="AdamW learning rate")
    p.add_argument("--sd-locked", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the whole SD UNet locked (default); --no-sd-locked also trains its decoder half")
    p.add_argument("--only-mid-control", action="store_true", help="feed only the middle-block control to the UNet")
    p.add_argument("--empty-prompt-prob", type=float, default=0.5, help="share of prompts replaced by '' (paper: 0.5)")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps to train (default: unlimited)")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs to train (default: unlimited)")
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"], help="default: 32")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (default: as the config's use_checkpoint)")
    p.add_argument("--accumulate-grad-batches", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--devices", type=int, default=1, help="processes (CPU) or GPUs per node")
    p.add_argument("--num-nodes", type=int, default=1, help="machines taking part")
    p.add_argument("--strategy", default="auto", help="Lightning strategy: auto, ddp, ... (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, mps or auto")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--logger-freq", type=int, default=300, help="save image logs every N steps (default: %(default)s)")
    p.add_argument("--log-ddim-steps", type=int, default=20, help="DDIM steps for the logged samples")
    p.add_argument("--log-dir", default="./lightning_logs", help="logs and image_log/ (default: %(default)s)")
    p.add_argument("--ckpt-dir", default=None, help="checkpoints (default: <log-dir>/checkpoints)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="save a checkpoint every N steps (%(default)s)")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="resume a run from a Lightning checkpoint, or 'last' for <ckpt-dir>/last.ckpt")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--weights-digest", action="store_true",
                   help="each process writes a digest of its weights at the end (to check DDP replicas agree)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the first bad flag or missing file."""
    for name in ("batch_size", "accumulate_grad_batches", "devices", "num_nodes", "logger_freq", "ckpt_every",
                 "log_ddim_steps"):  # fmt: skip
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 <= args.empty_prompt_prob <= 1.0:
        raise ValueError(f"--empty-prompt-prob must be between 0 and 1, got {args.empty_prompt_prob}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be at least 0, got {args.num_workers}")
    from cldm.data import SIZE_MULTIPLE, check_resolution

    check_resolution(args.resolution, SIZE_MULTIPLE, "--resolution")
    if args.resize not in (None, "none") and args.resolution is None:
        raise ValueError(f"--resize {args.resize} needs --resolution (the size to resize to); without "
                         "--resolution images are used at their own size")
    if args.resume is None and not Path(args.init_ckpt).exists():  # a file or a diffusers folder
        raise ValueError(f"{args.init_ckpt}: initial checkpoint not found (make it with tool_add_control.py)")
    if args.webdataset is None and not (Path(args.data) / "prompt.json").is_file():
        raise ValueError(f"{Path(args.data) / 'prompt.json'}: training data not found "
                         "(make it with python -m tools.make_fill50k, or pass --webdataset)")  # fmt: skip


def resume_checkpoint(args: argparse.Namespace, ckpt_dir: Path) -> tuple[str | None, Mapping[str, Any]]:
    """``(path, contents)`` of the ``--resume`` checkpoint (``last``: ``<ckpt-dir>/last.ckpt``; tensors
    memory-mapped), ``(None, {})`` without ``--resume``. Raises ``CheckpointError`` naming the flag and the
    file when a run cannot continue from it."""
    if args.resume is None:
        return None, {}
    from cldm.training import read_resume_checkpoint

    path = ckpt_dir / "last.ckpt" if args.resume == "last" else Path(args.resume)
    return str(path), read_resume_checkpoint(path)


def build_model(args: argparse.Namespace) -> Any:
    """The ControlLDM with the initial weights and the reference's training attributes set."""
    from cldm.checkpoint import CONTROL_PREFIX, CheckpointError, check_state_dict, load_state_dict
    from cldm.model import create_model
    from ldm.modules.diffusionmodules.util import set_activation_checkpointing

    model = create_model(args.config).cpu()
    if args.resume is None:  # a resumed run takes every weight from its checkpoint
        state_dict = load_state_dict(args.init_ckpt, location="cpu")
        if not any(key.startswith(CONTROL_PREFIX) for key in state_dict):
            raise CheckpointError(f"{args.init_ckpt}: no ControlNet weights ({CONTROL_PREFIX}*): make the initial "
                                  "checkpoint from an SD one with tool_add_control.py")
        check_state_dict(model, state_dict, f"{args.init_ckpt} (--init-ckpt) with {args.config}")
        model.load_state_dict(state_dict, strict=False)  # only OPTIONAL_KEYS may be absent after the check
    model.learning_rate = args.lr
    model.sd_locked = args.sd_locked
    model.only_mid_control = args.only_mid_control
    model.ucg_training = {model.cond_stage_key: {"p": args.empty_prompt_prob, "val": ""}}
    model.ucg_seed = args.seed
    if args.activation_checkpointing is not None:
        set_activation_checkpointing(model, args.activation_checkpointing)
    return model


def build_dataloader(args: argparse.Namespace) -> Any:
    from torch.utils.data import DataLoader

    from cldm.data import SIZE_MULTIPLE, Fill50kDataset, ImageSizeError, WebDatasetShards, shown_size

    resize = args.resize or "center-crop"
    if args.webdataset is not None:
        dataset = WebDatasetShards(args.webdataset, resolution=args.resolution, seed=args.seed, resize=resize)
    else:
        dataset = Fill50kDataset(args.data, resolution=args.resolution, resize=resize)
    try:  # every file's header (shards: each one's first sample) before the model is built
        size = dataset.check(args.batch_size, SIZE_MULTIPLE)
    except ImageSizeError as err:
        if args.resolution is None:
            raise ImageSizeError(f"{err} (--resolution N resizes every image to NxN)") from None
        if resize == "none":
            raise ImageSizeError(f"{err} (--resize center-crop or stretch resizes it)") from None
        raise
    what = f"{len(dataset)} pairs" if args.webdataset is None else f"{len(dataset.shards)} shards (first samples)"
    print(f"training data: {what} checked, {shown_size(size) if size else 'sizes vary'}")
    if args.webdataset is not None:
        return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)


def build_trainer(args: argparse.Namespace, ckpt_dir: Path, callbacks: list | None = None, resume_step: int = 0) -> Any:
    """The Trainer: checkpoints every ``--ckpt-every`` steps and at the end (written atomically), image logs,
    and ``metrics.csv`` in ``--log-dir`` continued from ``resume_step`` (the resumed checkpoint's step)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import TQDMProgressBar

    from cldm.logger import ImageLogger, WeightsDigest
    from cldm.training import AppendingCSVLogger, AtomicCheckpointIO, StepCheckpoint
    from ldm.device import lightning_accelerator, resolve_device

    accelerator = lightning_accelerator(resolve_device(args.device))
    strategy = args.strategy
    if strategy == "ddp" and args.only_mid_control:  # the unused zero convs would stop plain DDP
        strategy = "ddp_find_unused_parameters_true"
    checkpoints = StepCheckpoint(ckpt_dir, every=args.ckpt_every, resuming=resume_step > 0)
    images = ImageLogger(batch_frequency=args.logger_freq, save_dir=args.log_dir,
                         log_images_kwargs={"ddim_steps": args.log_ddim_steps})  # fmt: skip
    callbacks = [checkpoints, images, TQDMProgressBar(refresh_rate=1), *(callbacks or [])]
    if args.weights_digest:
        callbacks.append(WeightsDigest(ckpt_dir))
    return pl.Trainer(
        accelerator=accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=strategy,
        precision=args.precision, max_steps=args.max_steps, max_epochs=args.max_epochs,
        accumulate_grad_batches=args.accumulate_grad_batches, callbacks=callbacks,
        logger=AppendingCSVLogger(args.log_dir, resume_step=resume_step), plugins=[AtomicCheckpointIO()],
        default_root_dir=args.log_dir, log_every_n_steps=1, enable_model_summary=False,
    )  # fmt: skip


def prepare_training(args: argparse.Namespace, callbacks: list | None = None) -> tuple[Any, Any, Any, str | None]:
    """``(trainer, model, dataloader, checkpoint to resume from or None)`` for the flags of :func:`build_parser`,
    seeded by ``--seed``; ``callbacks`` are added to the trainer's. Raises ``ValueError`` naming the first bad
    flag or missing file, ``CheckpointError`` (a ``ValueError``) or ``OSError`` for an unreadable checkpoint or a
    log/checkpoint folder that cannot be written."""
    check_args(args)
    ckpt_dir = Path(args.ckpt_dir or Path(args.log_dir) / "checkpoints")
    ckpt_path, resumed = resume_checkpoint(args, ckpt_dir)
    from cldm.checkpoint import check_writable_dir

    for folder in (args.log_dir, ckpt_dir):  # before the model is built, not at the first save
        check_writable_dir(folder)
    import warnings

    import pytorch_lightning as pl

    # the frozen VAE and text encoder stay in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    pl.seed_everything(args.seed, workers=True, verbose=False)
    dataloader = build_dataloader(args)  # the data check is faster than loading the model
    model = build_model(args)
    if ckpt_path is not None:
        from cldm.checkpoint import check_state_dict

        check_state_dict(model, resumed["state_dict"], name=f"--resume {ckpt_path}")
    trainer = build_trainer(args, ckpt_dir, callbacks, resume_step=int(resumed.get("global_step", 0)))
    return trainer, model, dataloader, ckpt_path


def train(args: argparse.Namespace, callbacks: list | None = None) -> None:
    """Train as the flags of :func:`build_parser` say (errors as :func:`prepare_training`; during training,
    ``cldm.data.DataError`` naming an image whose pixels cannot be decoded, ``OSError`` for a failed save)."""
    trainer, model, dataloader, ckpt_path = prepare_training(args, callbacks)
    trainer.fit(model, dataloader, ckpt_path=ckpt_path)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        trainer, model, dataloader, ckpt_path = prepare_training(args, callbacks)
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    from cldm.data import DataError

    try:
        trainer.fit(model, dataloader, ckpt_path=ckpt_path)
    except (DataError, OSError) as err:  # an image whose pixels cannot be decoded; a full disk at a save
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
