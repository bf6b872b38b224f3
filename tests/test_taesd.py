"""Issue 18 item 3: TAESD as the VAE decoder, equal to diffusers' ``AutoencoderTiny`` in both file layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import cpu_canny2image
import gradio_canny2image
from cldm.checkpoint import CheckpointError
from cldm.pipeline import Canny2Image, CannyParams, read_image
from ldm.models.taesd import TAESDDecoder, decoder_from_spec, diffusers_to_taesd, load_taesd_decoder
from share import DEMO_CKPT, DEMO_IMAGE, TINY_CONFIG
from tests.diffusers_port import random_autoencoder_tiny

diffusers = pytest.importorskip("diffusers")

# The public taesd.py's Decoder is an nn.Sequential: 0 Clamp, 1 conv (bias), 2 ReLU, then three times
# [3 Blocks, Upsample, conv without bias] (Blocks at 3-5, 8-10, 13-15; convs at 7, 12, 17), a Block at 18 and the
# output conv (bias) at 19. A Block's parameters are conv.0, conv.2 and conv.4 (its 1x1 skip is an Identity at
# 64 -> 64 channels). These are the keys of the public taesd_decoder.pth, written down from that structure.
PUBLIC_BLOCKS = (3, 4, 5, 8, 9, 10, 13, 14, 15, 18)
PUBLIC_KEYS = (
    {"1.weight", "1.bias", "7.weight", "12.weight", "17.weight", "19.weight", "19.bias"}
    | {f"{b}.conv.{i}.{p}" for b in PUBLIC_BLOCKS for i in (0, 2, 4) for p in ("weight", "bias")}
)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """diffusers' AutoencoderTiny built from its default config (no hub), all parameters random normal: weights
    std 0.045, biases 0.1 (torch's default initialisation decodes to a near-constant image)."""
    return random_autoencoder_tiny(0)


@pytest.fixture(scope="module")
def files(reference: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference's weights in each layout: the public decoder files, a diffusers folder, its weights file."""
    root = tmp_path_factory.mktemp("taesd")
    public = {k: v.detach().clone() for k, v in diffusers_to_taesd(reference.state_dict()).items()}
    torch.save(public, root / "taesd_decoder.pth")
    safetensors.torch.save_file(public, str(root / "taesd_decoder.safetensors"))
    reference.save_pretrained(root / "taesd-diffusers")  # config.json + diffusion_pytorch_model.safetensors
    return {
        "pth": root / "taesd_decoder.pth",
        "safetensors": root / "taesd_decoder.safetensors",
        "diffusers-folder": root / "taesd-diffusers",
        "diffusers-file": root / "taesd-diffusers" / "diffusion_pytorch_model.safetensors",
    }


def latents(seed: int = 1) -> torch.Tensor:
    """SD-like latents as the UNet samples them (std ~1), a non-square shape."""
    return torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.mark.parametrize("layout", ["pth", "safetensors", "diffusers-folder", "diffusers-file"])
@torch.no_grad()
def test_decode_equals_diffusers(reference, files, layout: str) -> None:
    decoder = load_taesd_decoder(files[layout])
    z = latents()
    ours = decoder.decode(z)
    theirs = reference.decode(z).sample
    assert ours.shape == theirs.shape == (2, 3, 64, 96)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert theirs.std() > 0.3  # a varied image, not a constant


def test_public_keys_follow_the_public_structure(files) -> None:
    """The mapping, checked against two independent sources: the public Decoder's structure (PUBLIC_KEYS) and
    diffusers' scripts/convert_tiny_autoencoder_to_diffusers.py (diffusers index = public index - 1)."""
    written = torch.load(files["pth"], weights_only=True)
    assert set(written) == PUBLIC_KEYS
    assert set(TAESDDecoder().state_dict()) == PUBLIC_KEYS
    assert sum(v.numel() for v in written.values()) == 1_222_531

    fresh = diffusers.AutoencoderTiny().eval()
    their_rule = {f"{int(k.split('.')[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in written.items()}
    fresh.decoder.layers.load_state_dict(their_rule, strict=True)
    ours = load_taesd_decoder(files["pth"])
    z = latents(2)
    with torch.no_grad():
        assert torch.equal(fresh.decode(z).sample, ours.decode(z))


def test_decoder_takes_the_sampled_latent_unscaled(reference, files) -> None:
    """diffusers pipelines decode ``latents / vae.config.scaling_factor``; for TAESD that factor is 1.0, so the
    UNet's latent goes in as is (the full VAE decodes ``z / 0.18215``)."""
    assert reference.config.scaling_factor == 1.0
    assert json.loads((files["diffusers-folder"] / "config.json").read_text())["scaling_factor"] == 1.0


def _write(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


def odd_files(reference: torch.nn.Module, files: dict[str, Path], tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, words the one-line error must contain)."""
    public = torch.load(files["pth"], weights_only=True)
    encoder = {k.removeprefix("encoder.layers."): v for k, v in reference.state_dict().items()
               if k.startswith("encoder.")}  # fmt: skip
    wrong_config = tmp / "silu-folder"
    wrong_config.mkdir()
    (wrong_config / "config.json").write_text(json.dumps({**reference.config, "act_fn": "silu"}))
    empty = tmp / "empty-folder"
    empty.mkdir()
    return {
        "neither": (_write(tmp / "vae.pth", {"decoder.conv_in.weight": torch.zeros(1)}), "not a TAESD decoder"),
        "encoder": (_write(tmp / "taesd_encoder.pth", encoder), "TAESD encoder"),
        "missing": (_write(tmp / "cut.pth", {k: v for k, v in public.items() if k != "19.bias"}), "1 missing keys"),
        "shape": (_write(tmp / "wide.pth", {**public, "1.bias": torch.zeros(65)}), "wrong shape"),
        "extra": (_write(tmp / "extra.pth", {**public, "20.weight": torch.zeros(1)}), "unexpected keys"),
        "unindexed": (_write(tmp / "odd.pth", {"decoder.layers.x.weight": torch.zeros(1)}), "decoder.layers.x.weight"),
        "config": (wrong_config / "config.json", "act_fn='silu'"),
        "folder": (empty, "diffusion_pytorch_model"),
        "absent": (tmp / "nothing.pth", "not found"),
        "garbage": (tmp / "garbage.safetensors", "not a readable checkpoint"),
    }


@pytest.mark.parametrize("case", ["neither", "encoder", "missing", "shape", "extra", "unindexed", "config", "folder",
                                  "absent", "garbage"])  # fmt: skip
def test_odd_files_are_one_line_errors(reference, files, tmp_path, case: str) -> None:
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 40)
    path, words = odd_files(reference, files, tmp_path)[case]
    target = path.parent if case == "config" else path
    with pytest.raises(CheckpointError) as err:
        load_taesd_decoder(target)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and words in message


@pytest.mark.parametrize("spec", ["taesd", "taesd:", "vae:model.pth", "Full"])
def test_bad_spec_names_the_flag(spec: str) -> None:
    with pytest.raises(ValueError, match="--vae-decoder: expected full .* or taesd:PATH"):
        decoder_from_spec(spec)
    assert decoder_from_spec("full") is None and decoder_from_spec(None) is None


@pytest.mark.parametrize("main", [cpu_canny2image.main, gradio_canny2image.main], ids=["cli", "gradio"])
def test_scripts_refuse_a_bad_decoder_file(capsys, tmp_path, main) -> None:
    bad = _write(tmp_path / "taesd_encoder.pth", {"0.weight": torch.zeros(64, 3, 3, 3)})
    out_dir = ["-o", str(tmp_path / "out")] if main is cpu_canny2image.main else []
    code = main(["--demo", "--vae-decoder", f"taesd:{bad}", *out_dir])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err
    assert lines[-1] == f"error: {bad}: a TAESD encoder (key 0.weight), not the decoder (taesd_decoder.*)"


def test_canny2image_with_taesd(tiny_model, files) -> None:
    image = read_image(DEMO_IMAGE)
    params = CannyParams(prompt="a red circle", image_resolution=64, ddim_steps=1, seed=5)
    full = Canny2Image(tiny_model, torch.device("cpu"))
    tiny = Canny2Image(tiny_model, torch.device("cpu"), vae_decoder=f"taesd:{files['pth']}")
    (edges_a, image_a), seed_a = full(image, params, progress=False)
    (edges_b, image_b), seed_b = tiny(image, params, progress=False)
    assert seed_a == seed_b == 5 and np.array_equal(edges_a, edges_b)
    assert image_a.shape == image_b.shape == (64, 64, 3) and image_b.dtype == np.uint8
    assert np.abs(image_a.astype(int) - image_b.astype(int)).mean() > 10
    z = latents(3)[:1]
    with torch.no_grad():
        decoder = load_taesd_decoder(files["pth"])
        assert torch.equal(tiny.decode(z), decoder.decode(z))
        assert torch.equal(full.decode(z), tiny_model.decode_first_stage(z))  # the reference API keeps the VAE
        assert torch.equal(tiny.model.decode_first_stage(z), tiny_model.decode_first_stage(z))


def test_canny2image_refuses_other_latent_channels(tiny_model) -> None:
    with pytest.raises(ValueError, match="--vae-decoder: a TAESD decoder for 16-channel latents, the model's have 4"):
        Canny2Image(tiny_model, torch.device("cpu"), vae_decoder=TAESDDecoder(16))


@pytest.mark.slow
def test_cli_image_is_the_api_image_with_taesd(files, tmp_path, capsys) -> None:
    argv = ["--demo", "--ddim-steps", "2", "--seed", "1", "--vae-decoder", f"taesd:{files['safetensors']}",
            "-o", str(tmp_path)]  # fmt: skip
    assert cpu_canny2image.main(argv) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    params, input_path = cpu_canny2image.settings(cpu_canny2image.build_parser().parse_args(argv), demo=True)
    pipe = Canny2Image.from_checkpoint(TINY_CONFIG, DEMO_CKPT, torch.device("cpu"),
                                       vae_decoder=f"taesd:{files['pth']}")  # fmt: skip
    (_, expected), _ = pipe(read_image(input_path), params, progress=False)
    assert np.array_equal(np.array(Image.open(written[1])), expected)
    (_, with_vae), _ = Canny2Image(pipe.model, torch.device("cpu"))(read_image(input_path), params, progress=False)
    assert not np.array_equal(with_vae, expected)
