"""Turn a Stable Diffusion checkpoint into the initial ControlNet checkpoint, as the reference does.

    python tool_add_control.py ./models/v1-5-pruned.ckpt ./models/control_sd15_ini.ckpt
    python tool_add_control.py base.ckpt control_ini.ckpt --config models/cldm_tiny.yaml

Every key of the ControlLDM is taken from the SD checkpoint; the ControlNet's encoder copy
(``control_model.X``) is taken from the UNet's ``model.diffusion_model.X``. What the SD checkpoint
does not have (the hint encoder, the zero convolutions) keeps its fresh initialisation: random
hint convs, zero convs at exactly zero. ``--hint-init kaiming`` draws the hint convs so that the hint keeps
its scale through them (see ``cldm.cldm.kaiming_init_hint_encoder``); the default is the reference's init.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent


def add_control(
    scratch: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(state dict, keys kept from scratch)``: each key of the ``scratch`` ControlLDM state dict filled from the
    SD checkpoint ``pretrained`` (the ``"sd"`` layout of ``cldm.checkpoint.LAYOUTS``) when it has it, cast to the
    scratch dtype; tensors are copies. Raises ``ValueError`` for a tensor of the wrong shape."""
    from cldm.checkpoint import convert

    source = convert(pretrained, "sd", "ldm")
    wrong = wrong_shape(scratch, source)
    if wrong:
        raise ValueError(f"{wrong} (wrong --config?)")
    target, new = {}, []
    for key, value in scratch.items():
        found = source.get(key)
        if found is None:
            target[key] = value.clone()
            new.append(key)
        else:
            target[key] = found.to(value.dtype).clone()
    return target, new


def wrong_shape(expected: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]) -> str:
    """The first key of ``expected`` (a ControlLDM state dict; meta tensors do) whose tensor in ``source`` (the
    ``"ldm"`` layout of the SD checkpoint) has another shape, described as "<SD key>: shape X in the SD
    checkpoint, Y expected for <key>"; "" when every shared key fits."""
    from cldm.checkpoint import control_source_key

    for key, value in expected.items():
        found = source.get(key)
        if found is not None and found.shape != value.shape:
            return (f"{control_source_key(key)}: shape {tuple(found.shape)} in the SD checkpoint, "
                    f"{tuple(value.shape)} expected for {key}")  # fmt: skip
    return ""


def summarize(keys: list[str]) -> str:
    """``control_model.zero_convs (26), ...``: keys grouped by their first two name parts."""
    groups = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{name} ({n})" for name, n in groups.items())


def make_control_checkpoint(
    input_path: str | Path, output_path: str | Path, config: str | Path, seed: int = 0, hint_init: str = "reference"
) -> tuple[list[str], list[str]]:
    """Write the initial ControlNet checkpoint of SD checkpoint ``input_path`` to ``output_path`` (replaced if it
    exists): the ControlLDM of ``config`` with every weight the SD checkpoint has, the ControlNet's encoder copied
    from the UNet's; the rest freshly initialised from ``seed`` (hint convs by ``hint_init``, one of
    ``cldm.cldm.HINT_INITS``; zero convs at zero). Returns ``(copied ControlNet keys, newly initialised keys)``.
    The shapes are checked against the model built on the meta device before the real model is allocated.
    Raises ``CheckpointError`` for an unreadable input, ``ValueError`` when a shape differs (naming the file,
    the config and a config beside it of the file's model family, ``cldm.model.configs_like``) or the input
    has no UNet weights, ``OSError`` when the output cannot be written."""
    from cldm.checkpoint import check_writable_dir, convert, load_state_dict, save_checkpoint
    from cldm.cldm import kaiming_init_hint_encoder
    from cldm.model import build_model, configs_like, create_model, model_config

    check_writable_dir(Path(output_path).parent)  # before the (large) input is read
    pretrained = load_state_dict(input_path)
    with torch.device("meta"):  # shapes first: the real model is built only for a checkpoint that fits
        expected = build_model(model_config(config), config).state_dict()
    wrong = wrong_shape(expected, convert(pretrained, "sd", "ldm"))
    if wrong:
        fits = configs_like(pretrained, Path(config))
        hint = f"; pass --config {fits[0]}" if fits else " (wrong --config?)"
        raise ValueError(f"{input_path}: does not fit {config}: {wrong}{hint}")
    torch.manual_seed(seed)
    model = create_model(config)
    if hint_init == "kaiming":
        kaiming_init_hint_encoder(model.control_model)
    target, new = add_control(model.state_dict(), pretrained)
    copied = [k for k in target if k.startswith("control_model.") and k not in new]
    if not copied:
        raise ValueError(f"{input_path}: no model.diffusion_model.* weights to copy (not an SD checkpoint?)")
    model.load_state_dict(target, strict=True)
    save_checkpoint(model.state_dict(), output_path)
    return copied, new


def main(argv: list[str] | None = None) -> int:
    from cldm.cldm import HINT_INITS

    parser = argparse.ArgumentParser(description="SD checkpoint -> initial ControlNet checkpoint.")
    parser.add_argument("input_path", help="Stable Diffusion checkpoint (.ckpt/.pth/.safetensors, ldm layout)")
    parser.add_argument("output_path", help="ControlNet checkpoint to write (must not exist; its folder is created)")
    parser.add_argument("--config", default=str(REPO / "models" / "cldm_v15.yaml"),
                        help="ControlLDM config (default: the repo's models/cldm_v15.yaml)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the fresh hint-encoder weights")
    parser.add_argument("--hint-init", choices=HINT_INITS, default="reference",
                        help="hint-encoder init: the reference's (PyTorch default) or kaiming (scale-keeping; "
                             "control is learnt in far fewer steps)")  # fmt: skip
    args = parser.parse_args(argv)

    from cldm.checkpoint import CheckpointError

    out = Path(args.output_path)
    try:
        if out.exists():
            raise ValueError(f"{out}: output file already exists")
        copied, new = make_control_checkpoint(args.input_path, out, args.config, args.seed, args.hint_init)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"copied {len(copied)} ControlNet tensors from the UNet encoder; newly initialised: {summarize(new)}",
          file=sys.stderr)  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
