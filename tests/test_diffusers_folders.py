"""diffusers folders, read and written: a ControlNet folder, a Stable Diffusion (+ ControlNet) pipeline folder and
a hub-cache-shaped folder, all made by diffusers' and transformers' own code (single-file conversion utilities,
``save_pretrained``) from the tiny config's random weights, must load into exactly the reference's state dict;
``tools/convert_checkpoint.py`` writes a ControlNet folder that diffusers' ``ControlNetModel.from_pretrained``
reads to the same residuals, and the ControlNet 1.1 layout (ControlNet keys only). No hub access."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from cldm.checkpoint import (
    CheckpointError,
    check_folder_config,
    convert,
    diffusers_controlnet_config,
    diffusers_unet_config,
    diffusers_vae_config,
    load_state_dict,
)
from cldm.model import build_model, load_model, model_config
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from ldm.modules.encoders.modules import clip_text_config
from tests.conftest import TINY_CONFIG, random_tiny_model
from tests.diffusers_port import controlnet_config, convert_text_encoder, convert_to_diffusers
from tests.routes import assert_same_image, quiet, route_image
from tools import convert_checkpoint

diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils", reason="diffusers has no single_file_utils")
transformers = pytest.importorskip("transformers")

CONTROL = "control_model."
TOKENIZER = Path(__file__).resolve().parents[1] / "ldm" / "modules" / "encoders" / "clip_tokenizer"
TOL = 1e-5


def same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Exactly the keys of ``expected``, each tensor equal in value, shape and dtype."""
    assert sorted(loaded) == sorted(expected)
    wrong = [k for k in expected if loaded[k].dtype != expected[k].dtype or not torch.equal(loaded[k], expected[k])]
    assert not wrong, f"{len(wrong)} tensors differ, e.g. {wrong[:3]}"


def part(state_dict: dict[str, torch.Tensor], *prefixes: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k.startswith(prefixes)}


@pytest.fixture(scope="module")
def ldm() -> torch.nn.Module:
    """The tiny ControlLDM with random weights and no all-zero layer (every tensor matters)."""
    return random_tiny_model()


@pytest.fixture(scope="module")
def state_dict(ldm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return ldm.state_dict()


@pytest.fixture(scope="module")
def models(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers' UNet, ControlNet, VAE converted by diffusers' own functions, and transformers' CLIPTextModel with
    the weights diffusers' ``convert_ldm_clip_checkpoint`` gives."""
    original = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG), resolve=True)
    with torch.random.fork_rng():
        out = {name: model for name, (model, _) in convert_to_diffusers(original, state_dict).items()}
    text_config = model_config(TINY_CONFIG).params.cond_stage_config.params.text_config
    text_encoder = convert_text_encoder(state_dict, clip_text_config("openai/clip-vit-large-patch14", text_config))
    return {**out, "text_encoder": text_encoder}


@pytest.fixture(scope="module")
def folders(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders written by diffusers: ControlNet (fp32 safetensors, fp16 variant, .bin), a ControlNet pipeline."""
    root = tmp_path_factory.mktemp("diffusers")
    controlnet = models["controlnet"]
    controlnet.save_pretrained(root / "controlnet")
    controlnet.save_pretrained(root / "controlnet_bin", safe_serialization=False)
    copy.deepcopy(controlnet).half().save_pretrained(root / "controlnet_fp16", variant="fp16")
    tokenizer = transformers.CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"))
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipeline = diffusers.StableDiffusionControlNetPipeline(
        vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer, unet=models["unet"],
        controlnet=controlnet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(root / "pipeline")
    return {name: root / name for name in ("controlnet", "controlnet_bin", "controlnet_fp16", "pipeline")}


def hub_cache(source: Path, root: Path, revision: str = "0123abcd") -> Path:
    """``source``'s files as the hub cache holds them: ``models--org--name/blobs/<sha256>``, and
    ``snapshots/<revision>/...`` symlinks into blobs, ``refs/main`` naming the revision."""
    cache = root / "models--org--name"
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = cache / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = cache / "snapshots" / revision / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(revision)
    return cache


# --- reading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["controlnet", "controlnet_bin"])
def test_controlnet_folder_loads_the_reference_controlnet(folders: dict, state_dict: dict, name: str) -> None:
    same(load_state_dict(folders[name]), part(state_dict, CONTROL))


def test_fp16_variant_folder_loads_the_halved_controlnet(folders: dict, state_dict: dict) -> None:
    assert [p.name for p in folders["controlnet_fp16"].iterdir() if "safetensors" in p.name] == [
        "diffusion_pytorch_model.fp16.safetensors"
    ]
    same(load_state_dict(folders["controlnet_fp16"]), {k: v.half() for k, v in part(state_dict, CONTROL).items()})


def test_pipeline_folder_loads_unet_vae_text_encoder_and_controlnet(folders: dict, state_dict: dict) -> None:
    """Everything of the ControlLDM but the schedule buffers (which the model computes from its config)."""
    expected = {k: v for k, v in state_dict.items() if k not in SCHEDULE_BUFFERS and k != "logvar"}
    same(load_state_dict(folders["pipeline"]), expected)


def test_pipeline_folder_without_controlnet_is_a_base_model(folders: dict, state_dict: dict, tmp_path: Path) -> None:
    base = tmp_path / "sd15"
    base.mkdir()
    for item in ("model_index.json", "unet", "vae", "text_encoder"):
        (base / item).symlink_to(folders["pipeline"] / item)
    loaded = load_state_dict(base)
    same(loaded, part(state_dict, "model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
    assert {k.split(".")[0] for k in loaded} == {"model", "first_stage_model", "cond_stage_model"}


def test_pipeline_folder_gives_the_model_of_the_whole_file(folders: dict, whole_file: Path) -> None:
    """``load_model`` on the folder builds the model of the whole 1.0 file, tensor for tensor (hence the same
    image for the same seed)."""
    same(load_model(TINY_CONFIG, folders["pipeline"]).state_dict(), load_model(TINY_CONFIG, whole_file).state_dict())


def test_controlnet_folder_with_a_pipeline_folder_as_base_gives_the_whole_files_image(
    folders: dict, whole_file: Path, tmp_path: Path
) -> None:
    """The diffusers users' route: ``--ckpt`` a ControlNet folder (here in the hub cache layout) ``--base`` an SD
    pipeline folder without a ControlNet: the model of the whole 1.0 file, and its image for the same seed."""
    base = tmp_path / "sd15"
    base.mkdir()
    for item in ("model_index.json", "unet", "vae", "text_encoder"):
        (base / item).symlink_to(folders["pipeline"] / item)
    controlnet = hub_cache(folders["controlnet"], tmp_path)
    model = load_model(TINY_CONFIG, controlnet, base_ckpt=base, notify=quiet)
    same(model.state_dict(), load_model(TINY_CONFIG, whole_file).state_dict())
    assert_same_image(route_image(controlnet, base_ckpt=base), route_image(whole_file))


@pytest.mark.parametrize("name", ["controlnet", "pipeline"])
def test_hub_cache_folder_and_its_snapshot_load(folders: dict, name: str, tmp_path: Path) -> None:
    cache = hub_cache(folders[name], tmp_path)
    snapshot = cache / "snapshots" / "0123abcd"
    assert all(p.is_symlink() for p in snapshot.rglob("*") if not p.is_dir())
    expected = load_state_dict(folders[name])
    same(load_state_dict(cache), expected)
    same(load_state_dict(snapshot), expected)


def test_hub_cache_whose_ref_names_a_missing_snapshot_is_named(folders: dict, tmp_path: Path) -> None:
    cache = hub_cache(folders["controlnet"], tmp_path)
    (cache / "refs" / "main").write_text("feedbeef\n")
    with pytest.raises(CheckpointError, match=r"refs/main: names snapshot feedbeef, which is not in .*snapshots$"):
        load_state_dict(cache)


def test_hub_cache_without_refs_uses_its_only_snapshot_and_refuses_two(folders: dict, tmp_path: Path) -> None:
    cache = hub_cache(folders["controlnet"], tmp_path)
    (cache / "refs" / "main").unlink()
    same(load_state_dict(cache), load_state_dict(folders["controlnet"]))
    (cache / "snapshots" / "other").mkdir()
    with pytest.raises(CheckpointError, match=r"models--org--name: hub cache folder without refs/main and with 2 "):
        load_state_dict(cache)


def test_folder_that_is_neither_is_one_line_naming_it(tmp_path: Path, folders: dict) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}: not a checkpoint folder: expected a diffusers")
    assert "model_index.json" in message and "pass the file" not in message
    (tmp_path / "control_v11p_sd15_canny.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"; it holds control_v11p_sd15_canny\.pth: pass the file$"):
        load_state_dict(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNetSpatioTemporalConditionModel"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model class 'UNetSpatioTemporalConditionModel' is not"):
        load_state_dict(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with pytest.raises(CheckpointError, match=r"has config\.json but no weights \(expected diffusion_pytorch_model"):
        load_state_dict(tmp_path)
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "unet").symlink_to(folders["pipeline"] / "unet")
    with pytest.raises(CheckpointError, match=r"pipe: pipeline folder \(model_index\.json\) without weights in vae/, "):
        load_state_dict(pipeline)


def test_folder_config_that_disagrees_with_the_yaml_is_named(folders: dict, tmp_path: Path) -> None:
    """Head count and norm groups change no tensor shape: only config.json shows them."""
    config = model_config(TINY_CONFIG)
    check_folder_config(folders["controlnet"], config, "tiny.yaml")  # agrees
    check_folder_config(folders["pipeline"], config, "tiny.yaml")
    for field, value in (("attention_head_dim", 4), ("norm_num_groups", 32), ("cross_attention_dim", 768)):
        bad = tmp_path / field
        bad.mkdir()
        weights = "diffusion_pytorch_model.safetensors"
        (bad / weights).symlink_to(folders["controlnet"] / weights)
        found = json.loads((folders["controlnet"] / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**found, field: value}))
        with pytest.raises(CheckpointError, match=rf"{field}/config\.json: {field} is {value}, tiny\.yaml gives "):
            check_folder_config(bad, config, "tiny.yaml")
        with pytest.raises(CheckpointError, match=rf"config\.json: {field} is {value}, .*cldm_tiny\.yaml gives"):
            load_model(TINY_CONFIG, bad)


def test_vae_row_reads_the_legacy_attention_names(models: dict, state_dict: dict) -> None:
    """diffusers before 0.14 saved the VAE attention as query/key/value/proj_attn."""
    current = models["vae"].state_dict()
    legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
              .replace("to_out.0.", "proj_attn."): v for k, v in current.items()}  # fmt: skip
    assert legacy.keys() != current.keys()
    same(convert(legacy, "diffusers_vae", "ldm"), part(state_dict, "first_stage_model."))


# --- writing ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whole_file(state_dict: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("whole") / "tiny.ckpt"
    torch.save({"state_dict": state_dict}, path)
    return path


@pytest.fixture(scope="module")
def exported(whole_file: Path) -> Path:
    out = whole_file.parent / "controlnet-diffusers"
    assert convert_checkpoint.main([str(whole_file), str(out), "--to", "diffusers", "--config", str(TINY_CONFIG)]) == 0
    return out


def test_export_writes_a_folder_diffusers_reads_to_the_same_residuals(
    exported: Path, ldm: torch.nn.Module, state_dict: dict
) -> None:
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not [p for p in exported.parent.iterdir() if "partial" in p.name]
    theirs = diffusers.ControlNetModel.from_pretrained(exported, local_files_only=True).eval()
    assert theirs.config.norm_num_groups == 8 and theirs.config.attention_head_dim == 2
    g = torch.Generator().manual_seed(4)
    x, hint = torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, 3, 128, 128, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ours = ldm.control_model(x=x, hint=hint, timesteps=t, context=ctx)
        down, mid = theirs(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
    assert len(ours) == len([*down, mid]) == 13
    for i, (a, b) in enumerate(zip(ours, [*down, mid])):
        assert (a - b).abs().max().item() <= TOL, f"residual {i}"
        assert a.std().item() > 1e-3
    same(load_state_dict(exported), part(state_dict, CONTROL))  # and back
    same({k: v for k, v in theirs.state_dict().items()}, convert(state_dict, "ldm", "diffusers"))


def test_export_fp16_variant_and_read_back(whole_file: Path, state_dict: dict, tmp_path: Path) -> None:
    out = tmp_path / "cn16"
    args = [str(whole_file), str(out), "--to", "diffusers", "--dtype", "fp16", "--config", str(TINY_CONFIG)]
    assert convert_checkpoint.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    theirs = diffusers.ControlNetModel.from_pretrained(out, variant="fp16", torch_dtype=torch.float16,
                                                     local_files_only=True)
    halved = {k: v.half() for k, v in part(state_dict, CONTROL).items()}
    same(theirs.state_dict(), convert(halved, "ldm", "diffusers"))
    same(load_state_dict(out), halved)


@pytest.mark.parametrize(("suffix", "dtype"), [(".pth", "fp32"), (".safetensors", "fp16")])
def test_export_controlnet_only_file_in_the_11_layout(
    whole_file: Path, exported: Path, state_dict: dict, tmp_path: Path, suffix: str, dtype: str
) -> None:
    """Only control_model.* keys, flat (no state_dict nesting, as the 1.1 release files), from a file or from a
    diffusers folder."""
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    expected = {k: v.to(torch_dtype) for k, v in part(state_dict, CONTROL).items()}
    for source in (whole_file, exported):
        out = tmp_path / f"{source.stem}_control{suffix}"
        args = [str(source), str(out), "--to", "controlnet", "--dtype", dtype, "--config", str(TINY_CONFIG)]
        assert convert_checkpoint.main(args) == 0
        raw = safetensors.torch.load_file(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
        same(raw, expected)


def test_export_errors_are_one_line(whole_file: Path, exported: Path, tmp_path: Path, capsys: Any) -> None:
    tiny = ["--config", str(TINY_CONFIG)]
    cases = [
        ([str(whole_file), str(exported), "--to", "diffusers", *tiny], "output already exists"),
        ([str(whole_file), str(tmp_path / "x.safetensors"), "--to", "diffusers", *tiny], "writes a folder"),
        ([str(whole_file), str(tmp_path / "folder"), "--to", "controlnet", *tiny], "pass --to diffusers"),
        ([str(whole_file), str(tmp_path / "v15"), "--to", "diffusers"], "does not match the model config"),
        ([str(whole_file), str(whole_file / "x" / "out"), "--to", "diffusers", *tiny], "output folder"),
    ]
    for args, message in cases:
        assert convert_checkpoint.main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "v15").exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]
    sd_only = tmp_path / "sd.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, sd_only)
    assert convert_checkpoint.main([str(sd_only), str(tmp_path / "c.pth"), "--to", "controlnet", *tiny]) == 1
    assert "holds no control_model.* tensors" in capsys.readouterr().err


def test_help_lists_the_flags(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        convert_checkpoint.main(["--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--to", "whole", "controlnet", "diffusers", "--dtype", "--config"))


@pytest.mark.parametrize("name", ["cldm_tiny.yaml", "cldm_v15.yaml", "cldm_v21.yaml"])
def test_configs_build_diffusers_models_with_the_converted_shapes(name: str) -> None:
    """The config.json fields built from a yaml make diffusers' ControlNetModel, UNet2DConditionModel and
    AutoencoderKL (on the meta device) with exactly the keys and shapes of the converted reference weights, and
    agree with diffusers' own ``create_*_diffusers_config_from_ldm`` on every field both set."""
    path = TINY_CONFIG.parent / name
    config = model_config(path)
    with torch.device("meta"):
        reference = build_model(config, path).state_dict()
    params = config.params
    built = {"diffusers": (diffusers.ControlNetModel, diffusers_controlnet_config(params.control_stage_config.params)),
             "diffusers_unet": (diffusers.UNet2DConditionModel, diffusers_unet_config(params.unet_config.params)),
             "diffusers_vae": (diffusers.AutoencoderKL,
                               diffusers_vae_config(params.first_stage_config.params.ddconfig))}  # fmt: skip
    original = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    theirs = {"diffusers": controlnet_config(original, {}),
              "diffusers_unet": sfu.create_unet_diffusers_config_from_ldm(original, {}),
              "diffusers_vae": sfu.create_vae_diffusers_config_from_ldm(original, {})}  # fmt: skip
    for row, (cls, fields) in built.items():
        assert fields["_class_name"] == cls.__name__
        with torch.device("meta"):
            model = cls(**{k: v for k, v in fields.items() if not k.startswith("_")})
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in convert(reference, "ldm", row).items()}, row
        shared = fields.keys() & theirs[row].keys()
        assert {"block_out_channels", "layers_per_block"} <= shared
        assert {k: fields[k] for k in shared} == {k: theirs[row][k] for k in shared}, row


def test_failed_export_leaves_no_folder(
    whole_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """A write that fails half way (here: the disk fills while the weights are written) leaves neither the
    output folder nor the temporary one."""

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "cn"
    assert convert_checkpoint.main([str(whole_file), str(out), "--to", "diffusers", "--config", str(TINY_CONFIG)]) == 1
    assert capsys.readouterr().err == f"error: {out}: cannot write the diffusers folder (No space left on device)\n"
    assert list(tmp_path.iterdir()) == []


# --- folder faults (issue 17 review) -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet", "text_encoder", "controlnet"])
def test_pipeline_part_without_config_json_is_refused(folders: dict, tmp_path: Path, name: str, capsys: Any) -> None:
    """A part with weights but no config.json was skipped: the output had no UNet and the tool exited 0."""
    pipe = tmp_path / "pipe"
    (pipe / name).mkdir(parents=True)
    for item in folders["pipeline"].iterdir():
        if item.name != name:
            (pipe / item.name).symlink_to(item)
    for file in (folders["pipeline"] / name).iterdir():
        if file.name != "config.json":
            (pipe / name / file.name).symlink_to(file)
    with pytest.raises(CheckpointError, match=rf"^{pipe}: pipeline folder without {name}/config\.json$"):
        load_state_dict(pipe)
    out = tmp_path / "out.safetensors"
    assert convert_checkpoint.main([str(pipe), str(out), "--config", str(TINY_CONFIG)]) == 1
    assert capsys.readouterr().err == f"error: {pipe}: pipeline folder without {name}/config.json\n"
    assert not out.exists()


def test_sharded_folder_reads_every_shard(models: dict, state_dict: dict, tmp_path: Path) -> None:
    models["controlnet"].save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 2 and (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    same(load_state_dict(tmp_path / "sharded"), part(state_dict, CONTROL))
    (tmp_path / "sharded" / shards[0]).unlink()
    with pytest.raises(CheckpointError, match=rf"sharded/{shards[0]}: checkpoint file not found"):
        load_state_dict(tmp_path / "sharded")


def test_hub_cache_with_a_missing_blob_names_it(folders: dict, tmp_path: Path) -> None:
    cache = hub_cache(folders["controlnet"], tmp_path)
    link = cache / "snapshots" / "0123abcd" / "diffusion_pytorch_model.safetensors"
    link.resolve().unlink()
    with pytest.raises(CheckpointError) as err:
        load_state_dict(cache)
    assert str(err.value).startswith(f"{link}: the file it links to (../../blobs/")
    assert "is missing: an incomplete download" in str(err.value)


def test_model_index_json_given_as_checkpoint_says_pass_the_folder(folders: dict) -> None:
    index = folders["pipeline"] / "model_index.json"
    with pytest.raises(CheckpointError, match=rf"^{index}: a JSON file, not a checkpoint: .* pass the folder"):
        load_state_dict(index)


def test_export_whole_from_a_controlnet_alone_names_what_is_missing(
    exported: Path, tmp_path: Path, capsys: Any
) -> None:
    """--to whole from a ControlNet-only input wrote a partial "whole" file and exited 0."""
    out = tmp_path / "whole.safetensors"
    assert convert_checkpoint.main([str(exported), str(out), "--config", str(TINY_CONFIG)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {exported} (model of {TINY_CONFIG}): does not match")
    assert "missing keys (model.diffusion_model." in err and not out.exists()


def test_export_checks_the_folder_config_against_the_yaml(exported: Path, tmp_path: Path, capsys: Any) -> None:
    """attention_head_dim changes no shape: only config.json shows it (as load_model refuses it)."""
    bad = tmp_path / "heads1"
    bad.mkdir()
    (bad / "diffusion_pytorch_model.safetensors").symlink_to(exported / "diffusion_pytorch_model.safetensors")
    (bad / "config.json").write_text(json.dumps({**json.loads((exported / "config.json").read_text()),
                                                 "attention_head_dim": 1}))  # fmt: skip
    out = tmp_path / "c.pth"
    assert convert_checkpoint.main([str(bad), str(out), "--to", "controlnet", "--config", str(TINY_CONFIG)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {bad / 'config.json'}: attention_head_dim is 1, {TINY_CONFIG} gives 2 (a config.json " \
        "for another model?)\n"
    assert convert_checkpoint.main([str(bad), str(out), "--to", "controlnet"]) == 1  # the default config
    err = capsys.readouterr().err
    assert f"{convert_checkpoint.DEFAULT_CONFIG} gives" in err and err.count("\n") == 1
    assert err.endswith("no --config was given: pass --config for another model]\n") and not out.exists()


def test_export_with_the_wrong_config_names_the_matching_one(whole_file: Path, tmp_path: Path, capsys: Any) -> None:
    tiny_copy = tmp_path / "models" / "cldm_tiny.yaml"
    tiny_copy.parent.mkdir()
    tiny_copy.write_text(Path(TINY_CONFIG).read_text())
    v15 = tmp_path / "models" / "cldm_v15.yaml"
    v15.write_text((Path(TINY_CONFIG).parent / "cldm_v15.yaml").read_text())
    assert convert_checkpoint.main([str(whole_file), str(tmp_path / "o.safetensors"), "--config", str(v15)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match the model config" in err
    assert err.rstrip().endswith("cldm_tiny.yaml") and "it matches " in err
