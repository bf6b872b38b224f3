"""Single-file checkpoint routes (issue 17): each layout, written from one set of tiny random weights, gives the
whole ControlNet 1.0 file's image for the same seed; files that cannot work are refused with one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cpu_canny2image
from cldm.checkpoint import CheckpointError, load_state_dict, save_checkpoint
from cldm.model import load_model
from ldm.memory import cast_releasing
from tests.routes import (
    PARAMS,
    REPO,
    SD_PREFIXES,
    TINY_CONFIG,
    Weights,
    assert_same_image,
    base_model,
    controlnet_only,
    difference_file,
    max_difference,
    perturbed,
    quiet,
    route_image,
    tiny_weights,
)
from tools.convert_checkpoint import convert_checkpoint

V15_CONFIG = REPO / "models" / "cldm_v15.yaml"
V21_CONFIG = REPO / "models" / "cldm_v21.yaml"
UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def weights() -> Weights:
    return tiny_weights()


@pytest.fixture(scope="module")
def files(weights: Weights, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every single-file layout of ``weights`` (and of variants whose other parts must not be used)."""
    folder = tmp_path_factory.mktemp("routes")
    unet = {k: v for k, v in weights.items() if k.startswith(UNET)}
    other_unet = {k: v for k, v in perturbed(weights, (UNET,)).items() if k.startswith(UNET)}
    layouts = {
        "whole.pth": weights,  # ControlNet 1.0: control_model.* + UNet + VAE + text encoder
        "whole_other_sd.pth": perturbed(weights, SD_PREFIXES),  # same ControlNet, another base model in it
        "control.pth": controlnet_only(weights),  # ControlNet 1.1
        "control_fp16.safetensors": {k: v.half() for k, v in controlnet_only(weights).items()},
        "difference.safetensors": difference_file(weights, unet),
        "base_emaonly.safetensors": base_model(weights),  # v1-5-pruned-emaonly: no model_ema.*
        # a community fine-tune's file: the UNet, VAE and text encoder only, no schedule buffers
        "base_community.safetensors": {k: v for k, v in base_model(weights).items() if k.startswith(SD_PREFIXES)},
        # v1-5-pruned.ckpt: non-EMA UNet under model.diffusion_model.*, EMA copy under model_ema.*
        "base_pruned.ckpt": base_model(weights, ema_unet=other_unet),
        "base_pruned_ema_is_ours.ckpt": base_model({**weights, **other_unet}, ema_unet=unet),
    }
    for name, state_dict in layouts.items():
        save_checkpoint(state_dict, folder / name)
    return {name: folder / name for name in layouts}


@pytest.fixture(scope="module")
def whole_image(files: dict[str, Path]) -> np.ndarray:
    return route_image(files["whole.pth"])


@pytest.mark.parametrize(
    ("ckpt", "base", "options"),
    [
        ("control.pth", "base_pruned.ckpt", {}),  # non-EMA, the default
        ("control.pth", "base_pruned_ema_is_ours.ckpt", {"base_ema": True}),
        ("control.pth", "base_emaonly.safetensors", {}),
        ("control.pth", "base_community.safetensors", {}),
        ("difference.safetensors", "base_emaonly.safetensors", {}),
        ("whole_other_sd.pth", "base_emaonly.safetensors", {}),  # the base replaces the file's UNet, VAE, CLIP
    ],
)
def test_route_gives_the_whole_files_image(
    files: dict[str, Path], whole_image: np.ndarray, ckpt: str, base: str, options: dict
) -> None:
    assert_same_image(route_image(files[ckpt], files[base], **options), whole_image)


def test_fp16_controlnet_within_one_level(files: dict[str, Path], whole_image: np.ndarray, weights: Weights) -> None:
    rounded = [k for k, v in controlnet_only(weights).items() if not torch.equal(v.half().float(), v)]
    assert rounded  # the fp16 file really holds other values
    image = route_image(files["control_fp16.safetensors"], files["base_emaonly.safetensors"])
    assert_same_image(image, whole_image, tolerance=1)


def test_fp16_controlnet_is_cast_per_tensor(files: dict[str, Path]) -> None:
    control = files["control_fp16.safetensors"]
    full = load_model(TINY_CONFIG, control, base_ckpt=files["base_emaonly.safetensors"], notify=quiet)
    low = load_model(TINY_CONFIG, control, base_ckpt=files["base_emaonly.safetensors"], notify=quiet, low_memory=True)
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}


def test_other_weights_give_other_images(files: dict[str, Path], whole_image: np.ndarray) -> None:
    """The routes above are tests with power: the wrong UNet, or the whole file's own base, changes the image by more
    than the fp16 tolerance."""
    assert max_difference(route_image(files["whole_other_sd.pth"]), whole_image) > 1
    wrong_ema = route_image(files["control.pth"], files["base_pruned_ema_is_ours.ckpt"])  # non-EMA: the other UNet
    assert max_difference(wrong_ema, whole_image) > 1


def test_the_load_says_which_unet_it_used(files: dict[str, Path], weights: Weights) -> None:
    said: list[str] = []
    key = UNET + "input_blocks.1.0.in_layers.2.weight"
    for base, ema in (("base_pruned.ckpt", False), ("base_pruned_ema_is_ours.ckpt", True)):
        model = load_model(TINY_CONFIG, files["control.pth"], base_ckpt=files[base], base_ema=ema, notify=said.append)
        assert torch.equal(model.state_dict()[key], weights[key])
    for ckpt in ("control.pth", "whole_other_sd.pth"):
        load_model(TINY_CONFIG, files[ckpt], base_ckpt=files["base_emaonly.safetensors"], notify=said.append)
    assert len(said) == 4
    assert "UNet from model.diffusion_model.* (non-EMA weights, the default" in said[0]
    assert "UNet from its EMA weights (model_ema.*" in said[1]
    assert "no separate EMA copy" in said[2]
    assert f"replacing those of {files['whole_other_sd.pth']}" in said[3]


def test_cli_with_base_gives_the_whole_files_image(
    files: dict[str, Path], whole_image: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["--ckpt", str(files["control.pth"]), "--base", str(files["base_pruned_ema_is_ours.ckpt"]), "--base-ema",
            "--config", str(TINY_CONFIG), "--input", str(REPO / "test_imgs" / "disc.png"), "-o", str(tmp_path),
            "--prompt", PARAMS.prompt, "--a-prompt", "", "--n-prompt", "", "--image-resolution", "64",
            "--ddim-steps", str(PARAMS.ddim_steps), "--scale", str(PARAMS.scale), "--seed",
            str(PARAMS.seed)]  # fmt: skip
    assert cpu_canny2image.main(args) == 0
    out, err = capsys.readouterr()
    assert "UNet from its EMA weights" in err
    sample = Path(out.splitlines()[1])
    assert_same_image(np.array(Image.open(sample)), whole_image)


# --- files that cannot work: one line naming the file ---------------------------------------------------------


def _renamed(weights: Weights, old: str, new: str) -> Weights:
    return {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in weights.items()}


def _inpainting(weights: Weights) -> Weights:
    key = UNET + "input_blocks.0.0.weight"
    out_channels, _, h, w = weights[key].shape
    return {**weights, key: torch.zeros(out_channels, 9, h, w)}


TEXT = "cond_stage_model.transformer."
REFUSED = {
    "sdxl_conditioner": (lambda w: _renamed(w, TEXT, "conditioner.embedders.0.transformer."), TINY_CONFIG,
                         r"an SDXL model \(keys conditioner\.embedders\.\*\)"),
    "sdxl_controlnet": (lambda w: {**controlnet_only(w), "control_model.label_emb.0.0.weight": torch.zeros(8, 2816)},
                        TINY_CONFIG, r"an SDXL model \(label_emb with 2816 inputs\)"),
    "sd2_for_sd1": (lambda w: _renamed(w, TEXT, "cond_stage_model.model."), TINY_CONFIG,
                    r"the keys show an SD2\.x model \(OpenCLIP text encoder cond_stage_model\.model\.\*\); "
                    r"models/cldm_tiny\.yaml is an SD1\.x config"),
    "sd2_controlnet_for_sd1": (
        lambda w: {"control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 1024)},
        V15_CONFIG, r"an SD2\.x model \(1024-dim cross-attention\); models/cldm_v15\.yaml is an SD1\.x config "
                    r".*: pass --config models/cldm_v21\.yaml$"),
    "sd1_for_sd2": (lambda w: w, V21_CONFIG, r"an SD1\.x model \(CLIP text encoder .*models/cldm_v21\.yaml is an "
                                             r"SD2\.x config .*: pass --config models/cldm_tiny\.yaml$"),
    "inpainting": (_inpainting, TINY_CONFIG, r"an inpainting UNet \(input_blocks\.0\.0 takes 9 channels"),
    "t2i_adapter": (lambda w: {"conv_in.weight": torch.zeros(4, 192, 3, 3), "body.0.block1.weight": torch.zeros(4, 4)},
                    TINY_CONFIG, r"a T2I-Adapter"),
    "control_lora": (lambda w: {"lora_controlnet": torch.tensor(1.0), "input_blocks.1.1.proj_in.up": torch.zeros(4, 2),
                                "input_blocks.1.1.proj_in.down": torch.zeros(2, 4)}, TINY_CONFIG, r"a Control-LoRA"),
    "lora_kohya": (lambda w: {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(2, 4),
                              "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(4, 2),
                              "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(2.0)},
                   TINY_CONFIG, r"a LoRA \(keys lora_unet_"),
    "lora_peft": (lambda w: {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 4),
                             "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(4, 2)},
                  TINY_CONFIG, r"a LoRA \("),
    "ip_adapter": (lambda w: {"image_proj.proj.weight": torch.ones(2), "ip_adapter.1.to_k_ip.weight": torch.ones(2)},
                   TINY_CONFIG, r"an IP-Adapter .*--ckpt takes a ControlNet file"),
    "diffusers_single_file": (lambda w: {"controlnet_cond_embedding.conv_in.weight": torch.zeros(4, 3, 3, 3),
                                         "conv_in.weight": torch.zeros(4, 4, 3, 3)},
                              TINY_CONFIG, r"a diffusers ControlNet's weights .*pass the folder"),
    "base_as_ckpt": (base_model, TINY_CONFIG, r"a Stable Diffusion model without a ControlNet .*pass it as --base"),
    "controlnet_without_base": (controlnet_only, TINY_CONFIG, r"a ControlNet alone .*pass it with --base$"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(REFUSED))
def test_unusable_file_is_one_line_naming_it(kind: str, weights: Weights, tmp_path: Path) -> None:
    make, config, message = REFUSED[kind]
    path = tmp_path / f"{kind}.pth"
    save_checkpoint(make(weights), path)
    with pytest.raises(CheckpointError, match=rf"^{path}: .*{message}") as caught:
        load_model(config, path)
    assert "\n" not in str(caught.value)


def test_base_without_a_unet_is_refused(files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match=rf"^{files['control.pth']}: no Stable Diffusion UNet in it"):
        load_model(TINY_CONFIG, files["control.pth"], base_ckpt=files["control.pth"])


def test_base_of_another_family_is_refused(files: dict[str, Path], weights: Weights, tmp_path: Path) -> None:
    sd2 = tmp_path / "sd2_base.safetensors"
    save_checkpoint(_renamed(base_model(weights), TEXT, "cond_stage_model.model."), sd2)
    with pytest.raises(CheckpointError, match=rf"^{sd2}: the keys show an SD2\.x model"):
        load_model(TINY_CONFIG, files["control.pth"], base_ckpt=sd2)


def test_cli_controlnet_without_base_names_the_flag(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    code = cpu_canny2image.main(["--ckpt", str(files["control.pth"]), "--config", str(TINY_CONFIG), "-o",
                                 str(tmp_path)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: {files['control.pth']}: a ControlNet alone (control_model.* only): it needs a Stable Diffusion 1.5 "
        "base model, e.g. v1-5-pruned.ckpt: pass it with --base"
    ]


def test_base_ema_without_base_is_one_line(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    """``--base-ema`` chooses a base's UNet: alone it would be ignored, so it is refused (API and CLI)."""
    with pytest.raises(ValueError, match="--base-ema .* give --base too"):
        load_model(TINY_CONFIG, files["whole.pth"], base_ema=True)
    code = cpu_canny2image.main(["--demo", "--base-ema", "-o", str(tmp_path)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and "Traceback" not in err
    assert lines[-1].startswith("error: --base-ema") and "give --base too" in lines[-1]


def test_converting_a_difference_file_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    """Converting would drop the ``difference`` mark and leave (ControlNet - UNet) as if it were a ControlNet."""
    src = files["difference.safetensors"]
    for to in ("controlnet", "diffusers", "whole"):
        with pytest.raises(CheckpointError, match='a "difference" ControlNet'):
            convert_checkpoint(src, tmp_path / f"out_{to}.pth", torch.float32, TINY_CONFIG, to)
    assert list(tmp_path.iterdir()) == []


def test_gradio_controlnet_without_base_names_the_flag(files: dict[str, Path], capsys) -> None:
    import gradio_canny2image

    assert gradio_canny2image.main(["--ckpt", str(files["control.pth"]), "--config", str(TINY_CONFIG)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {files['control.pth']}: ") and "--base" in lines[0]


def test_scripts_model_choice_with_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import share

    choice = share.choose_model("control.pth", None, base="v1-5-pruned.ckpt")
    assert (choice.ckpt, choice.base, choice.config) == (Path("control.pth"), Path("v1-5-pruned.ckpt"), V15_CONFIG)
    with pytest.raises(ValueError, match="--demo and --base b.ckpt cannot be combined"):
        share.choose_model(demo=True, base="b.ckpt")
    monkeypatch.setattr(share, "DEFAULT_CKPT", tmp_path / "control_sd15_canny.pth")  # not downloaded
    with pytest.raises(ValueError, match=r"^--base b\.ckpt .*pass the ControlNet file with --ckpt"):
        share.choose_model(base="b.ckpt")
    share.DEFAULT_CKPT.write_bytes(b"")  # downloaded: the whole 1.0 file with another base
    assert share.choose_model(base="b.ckpt").ckpt == share.DEFAULT_CKPT


@pytest.mark.parametrize("flag", ["--ckpt", "--base", "--config"])
def test_empty_path_flag_is_named(flag: str, tmp_path: Path, capsys) -> None:
    """An empty path (e.g. an unset shell variable) is named as such, not read as the current folder."""
    args = {"--ckpt": "x.pth", "--base": None, "--config": None, flag: ""}
    code = cpu_canny2image.main([a for f, v in args.items() if v is not None for a in (f, v)] + ["-o", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.strip().splitlines()[-1] == f"error: {flag} is empty: give a file or folder"


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_cast_releasing_pages_out_each_half_precision_source(tmp_path: Path, suffix: str) -> None:
    """A mapped 64 MiB float16 file cast to float32 adds 128 MiB of copies and drops the 64 MiB it read."""
    path = tmp_path / f"half{suffix}"
    halves = {f"w{i}": torch.randn(2**20, generator=torch.Generator().manual_seed(i)).half() for i in range(32)}
    save_checkpoint(halves, path)
    mapped = load_state_dict(path)
    assert sum(float(v.float().sum()) for v in mapped.values())  # every page read
    status = Path("/proc/self/status")
    resident = [int(line.split()[1]) / 1024 for line in status.read_text().splitlines() if line.startswith("VmRSS")]
    cast = cast_releasing(mapped, lambda key: torch.float32)
    grown = [int(line.split()[1]) / 1024 for line in status.read_text().splitlines() if line.startswith("VmRSS")]
    assert all(torch.equal(cast[k], v.float()) for k, v in halves.items())
    assert grown[0] - resident[0] < 128 - 48  # without paging out: +128 MiB
