"""LoRA files (kohya/A1111 and diffusers/PEFT layouts) fused into the tiny model, against diffusers.

The diffusers side is built from the same ldm weights with diffusers' own single-file conversion
(``tests/diffusers_port.py``, ``convert_ldm_clip_checkpoint``), then ``pipe.load_lora_weights`` + ``fuse_lora``
(diffusers' PEFT backend). UNet noise predictions and text-encoder hidden states must agree within 1e-5.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cldm.lora import LoraError, apply_lora, fusable_layers, lora_targets, parse_lora_arg, unet_diffusers_names
from cldm.model import load_model
from tests.conftest import TINY_CONFIG, random_tiny_model

diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
pytest.importorskip("peft", reason="peft (diffusers' LoRA backend, test-only) is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-5
MIN_EFFECT = 1e-3  # a LoRA must change the outputs by more than this (else the comparison proves nothing)
PROMPTS = ["a red circle on a blue background", "green"]


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    """The tiny ControlLDM with random weights and no all-zero layers (eval mode); tests fuse into copies."""
    return random_tiny_model()


@pytest.fixture(scope="module")
def names(base: torch.nn.Module) -> dict[str, str]:
    return unet_diffusers_names(base.model.diffusion_model)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"x": torch.randn(2, 4, 16, 16, generator=g), "context": torch.randn(2, 77, 32, generator=g),
            "t": torch.tensor([10, 900])}  # fmt: skip


def diffusers_pipe(base: torch.nn.Module) -> Any:
    """A diffusers StableDiffusionPipeline holding copies of ``base``'s UNet, VAE and text encoder weights."""
    from tests.diffusers_port import convert_text_encoder, convert_to_diffusers

    state_dict = {k: v.clone() for k, v in base.state_dict().items()}  # diffusers fuses in place
    original = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG), resolve=True)
    with torch.random.fork_rng():
        converted = convert_to_diffusers(original, state_dict)
    text = convert_text_encoder(state_dict, base.cond_stage_model.transformer.text_model.config)
    scheduler = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1)
    return diffusers.StableDiffusionPipeline(
        vae=converted["vae"][0], text_encoder=text, tokenizer=None, unet=converted["unet"][0],
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


@torch.no_grad()
def project_outputs(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet eps without control, text-encoder last hidden states) of the project's model."""
    eps = model.apply_model(inputs["x"], inputs["t"], {"c_crossattn": [inputs["context"]]}, controls=[])
    return eps, model.cond_stage_model(PROMPTS)


@torch.no_grad()
def diffusers_outputs(pipe: Any, model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    eps = pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
    return eps, pipe.text_encoder(input_ids=model.cond_stage_model.tokenize(PROMPTS)).last_hidden_state


def lora_shapes(weight: torch.Tensor, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) shapes of a LoRA for ``weight``: conv-shaped for convs (3x3 down, 1x1 up), else 2-D."""
    if weight.dim() == 4:
        return (rank, *weight.shape[1:]), (weight.shape[0], rank, 1, 1)
    return (rank, weight.shape[1]), (weight.shape[0], rank)


Layers = list[tuple[str, str, torch.Tensor, torch.Tensor]]


def random_layers(model: torch.nn.Module, names: dict[str, str], seed: int, text: bool = True,
                  only: Callable[[str], bool] = lambda path: True) -> Layers:  # fmt: skip
    """(component, module path, down, up) for every UNet layer (diffusers path; those ``only`` keeps) and every
    text-encoder layer (transformers path), random, ranks 2 and 4 alternating."""
    g = torch.Generator().manual_seed(seed)
    out = []
    modules = [("unet", names[p], layer) for p, layer in fusable_layers(model.model.diffusion_model) if only(p)]
    if text:
        modules += [("text", p, layer) for p, layer in fusable_layers(model.cond_stage_model.transformer)]
    for i, (component, path, layer) in enumerate(modules):
        down, up = lora_shapes(layer.weight, 2 + 2 * (i % 2))
        out.append((component, path, torch.randn(down, generator=g) * 0.1, torch.randn(up, generator=g) * 0.1))
    return out


def write_kohya(path: Path, layers: list, alphas: dict[str, float] | None = None,
                unet_names: Callable[[str], str] | None = None) -> Path:  # fmt: skip
    """A kohya/A1111 file; ``alphas``: one alpha per component ("unet", "text"), else per layer 1, 2, 3, 4, 5, 1, ...
    (diffusers 0.42 drops per-layer alphas of attention and text layers: PEFT warns that the alpha_pattern keys
    it builds match no module); ``unet_names`` renames the UNet paths."""
    tensors = {}
    for i, (component, module, down, up) in enumerate(layers):
        if component == "unet":
            name = "lora_unet_" + (unet_names(module) if unet_names else module).replace(".", "_")
        else:
            name = "lora_te_" + module.replace(".", "_")
        alpha = alphas[component] if alphas else float(1 + i % 5)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(alpha)}  # fmt: skip
    safetensors_torch.save_file(tensors, str(path))
    return path


def write_peft(path: Path, layers: list, metadata: dict | None = None) -> Path:
    """A diffusers/PEFT file: ``unet.<path>.lora_A/B.weight``, ``text_encoder.<path>.lora_A/B.weight``."""
    tensors = {}
    for component, module, down, up in layers:
        prefix = "unet." if component == "unet" else "text_encoder."
        tensors |= {f"{prefix}{module}.lora_A.weight": down, f"{prefix}{module}.lora_B.weight": up}
    extra = {"format": "pt"} | ({"lora_adapter_metadata": json.dumps(metadata)} if metadata else {})
    safetensors_torch.save_file(tensors, str(path), metadata=extra)
    return path


def assert_matches_diffusers(base: torch.nn.Module, inputs: dict, lora: Path, scale: float, controlnet: bool = False
                             ) -> torch.nn.Module:  # fmt: skip
    """Fuse ``lora`` into a copy of ``base`` and into diffusers; outputs within TOL and changed by the LoRA."""
    model = copy.deepcopy(base)
    before = project_outputs(model, inputs)
    apply_lora(model, lora, scale, controlnet=controlnet)
    pipe = diffusers_pipe(base)
    pipe.load_lora_weights(str(lora), local_files_only=True)  # a missing file never becomes a hub name
    pipe.fuse_lora(lora_scale=scale)
    ours, theirs = project_outputs(model, inputs), diffusers_outputs(pipe, model, inputs)
    for what, a, b, was in zip(("UNet eps", "text hidden states"), ours, theirs, before):
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"{what}: max abs diff {diff:.3g} > {TOL}"
        assert (a - was).abs().max().item() > MIN_EFFECT, f"{what}: the LoRA changed nothing"
    return model


def test_unet_names_are_diffusers_modules(base: torch.nn.Module, names: dict[str, str]) -> None:
    """Every UNet linear/conv layer has a diffusers module of the same weight shape."""
    unet = diffusers_pipe(base).unet
    assert len(names) == len(list(fusable_layers(base.model.diffusion_model))) > 200
    for ldm, module in names.items():
        assert unet.get_submodule(module).weight.shape == base.model.diffusion_model.get_submodule(ldm).weight.shape


def test_kohya_layout_matches_diffusers(base: torch.nn.Module, names: dict, inputs: dict, tmp_path: Path) -> None:
    """Every UNet layer (attention, feed-forward, proj_in/out 1x1 convs, ResBlock 3x3 convs (LoCon), time
    embedding, up/downsamplers, conv_in/out) and every text-encoder layer; per-layer ranks."""
    lora = write_kohya(tmp_path / "kohya.safetensors", random_layers(base, names, seed=3), {"unet": 8.0, "text": 1.0})
    assert_matches_diffusers(base, inputs, lora, 0.7)


def test_peft_layout_matches_diffusers(base: torch.nn.Module, names: dict, inputs: dict, tmp_path: Path) -> None:
    """diffusers' own layout, alphas from its metadata (lora_alpha and an alpha_pattern entry), rank 4."""
    layers = [(c, m, d, u) for c, m, d, u in random_layers(base, names, seed=4) if d.shape[0] == 4]
    unet_modules = [m for c, m, _, _ in layers if c == "unet"]
    text_modules = [m.removeprefix("text_model.") for c, m, _, _ in layers if c == "text"]  # transformers 5 names
    metadata = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {unet_modules[0]: 2},
                "unet.target_modules": unet_modules, "text_encoder.r": 4, "text_encoder.lora_alpha": 2,
                "text_encoder.target_modules": text_modules}  # fmt: skip
    lora = write_peft(tmp_path / "peft.safetensors", layers, metadata)
    assert_matches_diffusers(base, inputs, lora, 1.0)


def test_peft_layout_without_metadata_matches_diffusers(
    base: torch.nn.Module, names: dict, inputs: dict, tmp_path: Path
) -> None:
    """Without alphas the scale is 1 per layer (alpha = rank); attention layers only, mixed ranks."""
    layers = random_layers(base, names, seed=5, only=lambda p: ".transformer_blocks." in p)
    assert_matches_diffusers(base, inputs, write_peft(tmp_path / "peft.safetensors", layers), 0.5)


def test_attention_processor_layout_matches_diffusers(
    base: torch.nn.Module, names: dict, inputs: dict, tmp_path: Path
) -> None:
    """diffusers' layout before PEFT: ``unet.<attn>.processor.to_q_lora.down.weight``,
    ``text_encoder.<self_attn>.to_q_lora.down.weight`` (attention projections only)."""
    unet = {".to_q": "to_q", ".to_k": "to_k", ".to_v": "to_v", ".to_out.0": "to_out"}
    text = {".q_proj": "to_q", ".k_proj": "to_k", ".v_proj": "to_v", ".out_proj": "to_out"}
    tensors = {}
    for component, module, down, up in random_layers(base, names, seed=14):
        table, prefix = (unet, "unet.") if component == "unet" else (text, "text_encoder.")
        end = next((e for e in table if module.endswith(e)), None)
        if end is None:
            continue
        attn = module[: -len(end)] + (".processor" if component == "unet" else "")
        for part, tensor in (("down", down), ("up", up)):
            tensors[f"{prefix}{attn}.{table[end]}_lora.{part}.weight"] = tensor
    assert len(tensors) > 100
    safetensors_torch.save_file(tensors, str(tmp_path / "processor.safetensors"))
    assert_matches_diffusers(base, inputs, tmp_path / "processor.safetensors", 0.9)


def test_per_layer_alphas_follow_the_kohya_formula(base: torch.nn.Module, names: dict, tmp_path: Path) -> None:
    """W + scale * alpha / rank * up @ down with each layer's own alpha and rank (conv layers included)."""
    layers = random_layers(base, names, seed=12)
    model = copy.deepcopy(base)
    report = apply_lora(model, write_kohya(tmp_path / "alphas.safetensors", layers), 0.6)
    assert len(report.parameters) == len(layers)
    to_ldm = {d: ldm for ldm, d in names.items()}
    for i, (component, module, down, up) in enumerate(layers):
        key = (f"model.diffusion_model.{to_ldm[module]}" if component == "unet" else
               f"cond_stage_model.transformer.{module}") + ".weight"  # fmt: skip
        w = base.get_parameter(key)
        expected = w + 0.6 * (1 + i % 5) / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        assert (model.get_parameter(key) - expected).abs().max() < 1e-6, key


def test_ldm_names_equal_diffusers_names(base: torch.nn.Module, names: dict, tmp_path: Path) -> None:
    """A kohya file naming the UNet by ldm paths fuses the same weights as one naming diffusers paths."""
    layers = random_layers(base, names, seed=6, text=False)
    to_ldm = {d: ldm for ldm, d in names.items()}
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(a, write_kohya(tmp_path / "diffusers_names.safetensors", layers), 0.9)
    apply_lora(b, write_kohya(tmp_path / "ldm_names.safetensors", layers, unet_names=to_ldm.get), 0.9)
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key


def test_linear_shaped_lora_on_a_1x1_conv(base: torch.nn.Module, names: dict, tmp_path: Path) -> None:
    """proj_in / proj_out are 1x1 convs here; a LoRA written linear-shaped (as for SD2's linear proj_in)
    fuses the same weights as the conv-shaped one."""
    layers = random_layers(base, names, seed=7, text=False, only=lambda p: p.endswith(("proj_in", "proj_out")))
    assert layers and all(d.dim() == 4 for _, _, d, _ in layers)
    flat = [(c, m, d.flatten(1), u.flatten(1)) for c, m, d, u in layers]
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(a, write_kohya(tmp_path / "conv.safetensors", layers))
    apply_lora(b, write_kohya(tmp_path / "linear.safetensors", flat))
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key


@pytest.fixture()
def mapped_model(tiny_ckpt: Path) -> torch.nn.Module:
    """The tiny model loaded memory-mapped, as the scripts load it."""
    return load_model(TINY_CONFIG, tiny_ckpt)


def test_only_touched_parameters_are_replaced(mapped_model: torch.nn.Module, names: dict, tmp_path: Path) -> None:
    """Attention-only LoRA: the other parameters stay the same tensor objects; the touched ones are new
    tensors (the mapped originals keep their values); the new bytes are the touched layers' bytes."""
    model = mapped_model
    layers = random_layers(model, names, seed=8, only=lambda p: ".attn" in p)
    before = dict(model.named_parameters())
    values = {k: v.clone() for k, v in before.items()}
    report = apply_lora(model, write_kohya(tmp_path / "attn.safetensors", layers))
    after = dict(model.named_parameters())
    touched = {k for k in after if after[k] is not before[k]}
    assert touched == set(report.parameters) and len(touched) == len(layers)
    assert all(k.endswith(".weight") and ".attn" in k or "text_model" in k for k in touched)
    assert report.bytes == sum(after[k].nbytes for k in touched)
    for key in touched:
        assert torch.equal(before[key], values[key]), f"{key}: the original tensor was written"
        assert not torch.equal(after[key], values[key])
    text = sum(1 for k in touched if k.startswith("cond_stage_model."))
    assert report.summary() == (f"attn.safetensors x1: {len(layers)} LoRA layers fused ({text} in the text encoder, "
                                f"{len(touched) - text} in the UNet)")  # fmt: skip


def copied_layers(model: torch.nn.Module) -> set[str]:
    """Paths of the linear/conv layers the ControlNet copies from the UNet."""
    unet = {p for p, _ in fusable_layers(model.model.diffusion_model)}
    return {p for p, _ in fusable_layers(model.control_model)} & unet


def test_controlnet_copies_change_only_when_asked(
    base: torch.nn.Module, names: dict, inputs: dict, tmp_path: Path
) -> None:
    """Without the flag the ControlNet is untouched; with it each copied layer gets the UNet layer's change."""
    lora = write_kohya(tmp_path / "kohya.safetensors", random_layers(base, names, seed=9), {"unet": 3.0, "text": 2.0})
    plain = copy.deepcopy(base)
    control = dict(plain.control_model.named_parameters())
    apply_lora(plain, lora)
    assert all(p is control[k] for k, p in plain.control_model.named_parameters())
    model = assert_matches_diffusers(base, inputs, lora, 0.8, controlnet=True)
    before, after = dict(base.control_model.named_parameters()), dict(model.control_model.named_parameters())
    unet_before = dict(base.model.diffusion_model.named_parameters())
    unet_after = dict(model.model.diffusion_model.named_parameters())
    shared = [k for k in before if k in unet_before]
    for key in shared:
        assert (after[key] - before[key] - (unet_after[key] - unet_before[key])).abs().max() < 1e-6, key
    assert all(torch.equal(after[k], before[k]) for k in before if k not in unet_before)  # hint encoder, zero convs
    assert sum(not torch.equal(after[k], before[k]) for k in shared) == len(copied_layers(base)) > 50


def test_low_memory_weights_stay_bfloat16(tiny_ckpt: Path, names: dict, tmp_path: Path) -> None:
    """bfloat16 storage: fused in float32, stored as bfloat16; the model still runs (float32 compute hooks)."""
    model = load_model(TINY_CONFIG, tiny_ckpt, low_memory=True)
    layers = random_layers(model, names, seed=10)
    lora = write_kohya(tmp_path / "kohya.safetensors", layers)
    before = {k: v for k, v in model.state_dict().items()}
    report = apply_lora(model, lora, 0.5)
    assert report.parameters
    fp32 = copy.deepcopy(model).float()
    for key in report.parameters:
        now = model.get_parameter(key)
        assert now.dtype == torch.bfloat16
        fp32.get_parameter(key).data.copy_(before[key].float())  # the float32 copy restarts from the bf16 base
    apply_lora(fp32, lora, 0.5)
    for key in report.parameters:
        assert torch.equal(model.get_parameter(key), fp32.get_parameter(key).to(torch.bfloat16)), key
    with torch.no_grad():
        assert torch.isfinite(model.cond_stage_model(PROMPTS)).all()


def test_unmatched_keys_raise_and_change_nothing(base: torch.nn.Module, names: dict, tmp_path: Path) -> None:
    layers = random_layers(base, names, seed=11, text=False, only=lambda p: ".attn1." in p)
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    down, up = (t.clone() for t in layers[0][2:])
    foreign = [("unet", "down_blocks.0.attentions.0.transformer_blocks.7.attn1.to_q", down, up)]  # no block 7
    partly = write_kohya(tmp_path / "partly.safetensors", layers + foreign)
    with pytest.raises(LoraError, match=rf"partly\.safetensors: 1 of its {len(layers) + 1} LoRA layers match no "):
        apply_lora(model, partly)
    with pytest.raises(LoraError, match=r"none\.safetensors: none of its 1 LoRA layers matches"):
        apply_lora(model, write_kohya(tmp_path / "none.safetensors", foreign))
    tensors = safetensors_torch.load_file(str(partly))
    loha = tensors | {"lora_unet_x.hada_w1_a": torch.ones(2, 2)}
    safetensors_torch.save_file(loha, str(tmp_path / "loha.safetensors"))
    with pytest.raises(LoraError, match=r"loha\.safetensors: 1 keys are not LoRA"):
        apply_lora(model, tmp_path / "loha.safetensors")
    bad = [(c, m, torch.randn(4, 7), u) for c, m, _, u in layers[:1]]
    with pytest.raises(LoraError, match=r"shape\.safetensors: 1 LoRA layers do not fit"):
        apply_lora(model, write_kohya(tmp_path / "shape.safetensors", bad))
    with pytest.raises(LoraError, match=r"missing\.safetensors: LoRA file not found"):
        apply_lora(model, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match=r"junk\.safetensors: "):
        apply_lora(model, tmp_path / "junk.safetensors")
    assert all(p is params[k] for k, p in model.named_parameters())


def test_lora_targets_cover_unet_and_text_encoder(base: torch.nn.Module) -> None:
    table = lora_targets(base)
    unet = len(list(fusable_layers(base.model.diffusion_model)))
    text = len(list(fusable_layers(base.cond_stage_model.transformer)))
    assert len({id(t[0][1]) for t in table.values()}) == unet + text
    assert all(len(t) == 1 for t in table.values())
    with_copies = lora_targets(base, controlnet=True)
    assert len({id(t) for t in with_copies.values() if len(t) == 2}) == len(copied_layers(base)) > 50


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a.safetensors", ("a.safetensors", 1.0)), ("a.safetensors:0.5", ("a.safetensors", 0.5)),
     ("dir/x:y.safetensors", ("dir/x:y.safetensors", 1.0)), ("C:\\l.safetensors:-1", ("C:\\l.safetensors", -1.0)),
     ("a.safetensors:nan", ("a.safetensors:nan", 1.0))],
)  # fmt: skip
def test_parse_lora_arg(text: str, expected: tuple[str, float]) -> None:
    assert parse_lora_arg(text) == expected


@pytest.mark.parametrize("tail", ["abc", "", "nan", "inf"])
def test_parse_lora_arg_names_a_bad_scale_of_an_existing_file(tmp_path: Path, tail: str) -> None:
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(argparse.ArgumentTypeError, match=f"the scale '{tail}' is not a finite number"):
        parse_lora_arg(f"{lora}:{tail}")


@pytest.mark.parametrize("text", [":", "::", ""])
def test_parse_lora_arg_without_a_path(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected PATH"):
        parse_lora_arg(text)


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    import cpu_canny2image

    code = cpu_canny2image.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def cli_args(ckpt: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "-o", str(out_dir), "--image-resolution", "64",
            "--ddim-steps", "2", "--seed", "5", *extra]  # fmt: skip


def test_cli_bad_lora_is_one_line(capsys: pytest.CaptureFixture, tiny_ckpt: Path, tmp_path: Path) -> None:
    foreign = write_kohya(tmp_path / "sdxl.safetensors", [("unet", "down_blocks.9.conv", torch.ones(4, 8),
                                                            torch.ones(8, 4))])  # fmt: skip
    for lora, message in ((tmp_path / "nope.safetensors", "nope.safetensors: LoRA file not found"),
                          (foreign, "sdxl.safetensors: none of its 1 LoRA layers matches")):  # fmt: skip
        code, out, err = run_cli(capsys, *cli_args(tiny_ckpt, tmp_path / "out", "--lora", f"{lora}:0.5"))
        assert code == 1 and out == ""
        assert err.strip().splitlines() == [err.strip()] and err.startswith("error: ") and message in err


@pytest.mark.slow
def test_cli_lora_changes_the_image_and_scale_0_does_not(
    capsys: pytest.CaptureFixture, tiny_ckpt: Path, base: torch.nn.Module, names: dict, tmp_path: Path
) -> None:
    lora = write_kohya(tmp_path / "l.safetensors", random_layers(base, names, seed=13), {"unet": 4.0, "text": 4.0})
    layers = len(names) + len(list(fusable_layers(base.cond_stage_model.transformer)))
    images = {}
    for label, extra in (("none", []), ("zero", ["--lora", f"{lora}:0"]), ("half", ["--lora", f"{lora}:0.5"])):
        code, out, err = run_cli(capsys, *cli_args(tiny_ckpt, tmp_path / label, *extra))
        assert code == 0, err
        images[label] = np.array(Image.open(out.split()[1]))
        if extra:
            assert f"lora: l.safetensors x{extra[1].rsplit(':', 1)[1]}: {layers} LoRA layers fused" in err
    assert np.array_equal(images["none"], images["zero"])
    assert np.abs(images["none"].astype(int) - images["half"]).max() > 10
