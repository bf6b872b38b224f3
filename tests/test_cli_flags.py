"""Issue 20 item 14: flags the scripts used to accept silently (or with a traceback) are one line, exit 1."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import cpu_canny2image
import gradio_canny2image
from cldm.checkpoint import CheckpointError, load_state_dict
from cldm.model import load_model, matching_configs
from cldm.pipeline import Canny2Image, CannyParams
from ldm.device import set_threads
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizer import EOS_ID, count_tokens, load_clip_tokenizer, tokenize
from share import DEMO_CKPT, TINY_CONFIG, choose_model
from tests.conftest import REPO


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("threads", [0, -3, (os.cpu_count() or 1) + 1, 1000])
def test_threads_outside_the_cpu_count_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, threads: int) -> None:
    before = torch.get_num_threads()
    code = cpu_canny2image.main(["--ckpt", str(DEMO_CKPT), "--config", str(TINY_CONFIG), "--threads", str(threads),
                                 "-o", str(tmp_path / "out")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert f"--threads must be between 1 and {os.cpu_count()}" in one_error_line(err)
    assert f"got {threads}" in err
    assert torch.get_num_threads() == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("threads", [1, os.cpu_count() or 1])
def test_threads_within_the_cpu_count_is_set(threads: int) -> None:
    before = torch.get_num_threads()
    try:
        set_threads(threads)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_set_threads_none_leaves_torch_alone() -> None:
    before = torch.get_num_threads()
    set_threads(None)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("main", [cpu_canny2image.main, gradio_canny2image.main], ids=["cli", "gradio"])
def test_demo_with_ckpt_is_refused(capsys: pytest.CaptureFixture, tmp_path: Path, main) -> None:
    ckpt = tmp_path / "mine.ckpt"
    code = main(["--demo", "--ckpt", str(ckpt)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert "--demo" in line and f"--ckpt {ckpt}" in line


def test_choose_model_modes() -> None:
    demo = choose_model(demo=True)
    assert (demo.ckpt, demo.config, demo.demo) == (DEMO_CKPT, TINY_CONFIG, True)
    mine = choose_model("x.ckpt", TINY_CONFIG)
    assert (mine.ckpt, mine.config, mine.demo) == (Path("x.ckpt"), TINY_CONFIG, False)
    with pytest.raises(ValueError, match="--demo and --ckpt x.ckpt cannot be combined"):
        choose_model("x.ckpt", None, demo=True)


@pytest.mark.parametrize("port", [0, -1, 65536, 99999])
def test_port_out_of_range_is_one_line(capsys: pytest.CaptureFixture, port: int) -> None:
    code = gradio_canny2image.main(["--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert one_error_line(err) == f"error: --port must be between 1 and 65535, got {port}"


@pytest.mark.parametrize("path,ignored", [("lightning_logs/version_0/metrics.csv", True), ("ldm/device.py", False)])
def test_lightning_logs_are_git_ignored(path: str, ignored: bool) -> None:
    done = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, check=False)
    assert done.returncode == (0 if ignored else 1)


LONG_PROMPT = " ".join(["red circle"] * 50)  # 100 words: 102 tokens with start and end


def test_count_tokens_matches_what_tokenize_keeps() -> None:
    tokenizer = load_clip_tokenizer()
    assert count_tokens(tokenizer, "") == 2
    assert count_tokens(tokenizer, "red circle") == 4
    assert count_tokens(tokenizer, LONG_PROMPT) == 102
    ids = tokenize(tokenizer, ["red circle with blue background"])[0]
    n = count_tokens(tokenizer, "red circle with blue background")
    assert ids[n - 1] == EOS_ID and ids[n - 2] != EOS_ID


def test_openclip_count_tokens() -> None:
    encoder = FrozenOpenCLIPEmbedder.__new__(FrozenOpenCLIPEmbedder)
    encoder.tokenizer = load_clip_tokenizer()
    assert encoder.count_tokens("Red  Circle") == 4
    assert encoder.count_tokens(LONG_PROMPT) == 102


@pytest.mark.parametrize(
    "prompt,a_prompt,n_prompt,said",
    [
        ("red circle", "", "", []),
        (LONG_PROMPT, "", "", ["the prompt is 102 tokens"]),
        (LONG_PROMPT, "best", "", ["the prompt with the added prompt is 104 tokens"]),
        ("red circle", "", LONG_PROMPT, ["the negative prompt is 102 tokens"]),
        (LONG_PROMPT, "", LONG_PROMPT, ["the prompt is 102 tokens and the negative prompt is 102 tokens"]),
    ],
)
def test_long_prompt_is_said_once(
    tiny_model: torch.nn.Module, prompt: str, a_prompt: str, n_prompt: str, said: list[str]
) -> None:
    pipe = Canny2Image(tiny_model, torch.device("cpu"))
    params = CannyParams(prompt=prompt, a_prompt=a_prompt, n_prompt=n_prompt, image_resolution=64, ddim_steps=1,
                         seed=1)  # fmt: skip
    messages: list[str] = []
    image = np.zeros((64, 64, 3), np.uint8)
    pipe(image, params, progress=False, notify=messages.append)
    assert [m.split(":")[0] for m in messages] == said
    assert all(m.endswith("reads the first 77 (start and end included), the rest is ignored") for m in messages)


def test_long_prompt_is_one_line_on_the_cli(capsys: pytest.CaptureFixture, tiny_ckpt: Path, tmp_path: Path) -> None:
    code = cpu_canny2image.main(["--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "-o", str(tmp_path),
                                 "--image-resolution", "64", "--ddim-steps", "1", "-p", LONG_PROMPT,
                                 "--a-prompt", "", "--n-prompt", ""])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 0, err
    assert [line for line in err.splitlines() if "tokens" in line] == [
        "the prompt is 102 tokens: the text encoder reads the first 77 (start and end included), the rest is ignored"
    ]


def test_tiny_checkpoint_without_config_names_the_tiny_config(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """Without --config the default (models/cldm_v15.yaml) is built: the tiny checkpoint does not fit it."""
    code = cpu_canny2image.main(["--ckpt", str(DEMO_CKPT), "-o", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert "does not match the model config" in line
    assert line.endswith("it matches models/cldm_tiny.yaml: pass --config models/cldm_tiny.yaml")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_matching_configs(tmp_path: Path) -> None:
    state_dict = load_state_dict(DEMO_CKPT)
    models = REPO / "models"
    assert matching_configs(state_dict, models / "cldm_v15.yaml") == [models / "cldm_tiny.yaml"]
    assert matching_configs(state_dict, models / "cldm_tiny.yaml") == []  # the config given is not a candidate
    assert matching_configs(state_dict, models / "cldm_v15.yaml", base=True) == []  # the ControlNet is extra there
    damaged = dict(state_dict)
    del damaged["control_model.input_hint_block.0.weight"]
    assert matching_configs(damaged, models / "cldm_v15.yaml") == []


def test_checkpoint_matching_no_config_gets_no_hint(tiny_ckpt: Path, tmp_path: Path) -> None:
    state_dict = load_state_dict(tiny_ckpt)
    del state_dict["control_model.input_hint_block.0.weight"]
    damaged = tmp_path / "damaged.ckpt"
    torch.save({"state_dict": state_dict}, damaged)
    with pytest.raises(CheckpointError) as caught:
        load_model(REPO / "models" / "cldm_v15.yaml", damaged)
    assert "does not match the model config" in str(caught.value)
    assert "pass --config" not in str(caught.value)


def test_long_prompt_is_a_page_warning(tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    gr = pytest.importorskip("gradio")
    warned: list[str] = []
    monkeypatch.setattr(gr, "Warning", warned.append)
    process = gradio_canny2image.make_process(Canny2Image(tiny_model, torch.device("cpu")))
    results = process(str(REPO / "test_imgs" / "disc.png"), LONG_PROMPT, "", "", 1, 64, 1, False, 1.0, 9.0, 3, 0.0,
                      100, 200, progress=lambda *args, **kwargs: None)  # fmt: skip
    assert len(results) == 2
    assert [w.split(":")[0] for w in warned] == ["the prompt is 102 tokens"]
