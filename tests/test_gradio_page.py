"""``gradio_canny2image.py``: the page's process function, and the real page driven in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio")

import gradio_canny2image  # noqa: E402
from cldm.pipeline import Canny2Image  # noqa: E402
from share import DEFAULT_CKPT, DEMO_IMAGE, DEMO_PROMPT  # noqa: E402
from tests.conftest import REPO  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
# Chromium flags for a closed network (no background fetches, no sandbox as root in CI).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
IMAGE = REPO / "test_imgs" / "astronaut.png"  # 512 x 512


class RecordingProgress:
    """Stands in for ``gr.Progress``: records every ``(done, total)`` it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, progress: tuple[int, int], desc: str | None = None, unit: str = "steps") -> None:
        self.calls.append(progress)


def page_args(**overrides: object) -> list:
    """The page's inputs, in its order (INPUTS), with small values for the tiny model."""
    values = dict(input_image=str(IMAGE), prompt="a cat", a_prompt="best quality", n_prompt="lowres",
                  num_samples=2, image_resolution=128, ddim_steps=3, guess_mode=False, strength=1.0, scale=9.0,
                  seed=7, eta=0.0, low_threshold=100, high_threshold=200, sampler="ddim", denoise=1.0,
                  init_image=None, mask=None, annotator="canny", control_start=0.0, control_end=1.0, image2=None,
                  annotator2="none", controlnet2="main", strength2=1.0, start2=0.0, end2=1.0,
                  drawing2=None)  # fmt: skip
    values.update(overrides)
    return [values[name] for name in gradio_canny2image.INPUTS]


@pytest.fixture(scope="module")
def process(tiny_model: torch.nn.Module):
    return gradio_canny2image.make_process(Canny2Image(tiny_model, torch.device("cpu")))


def test_process_returns_edges_then_samples_and_reports_each_step(process) -> None:
    progress = RecordingProgress()
    results = process(*page_args(), progress=progress)
    assert len(results) == 3
    assert all(r.shape == (128, 128, 3) and r.dtype == np.uint8 for r in results)
    assert set(np.unique(results[0])) <= {0, 255}  # the inverted edge map comes first
    # 3 steps: the reference's schedule visits 4 timesteps (1, 334, 667, 999)
    assert progress.calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]


def test_process_with_a_second_unit_shows_both_maps(process) -> None:
    from cldm.pipeline import read_image
    from cldm.units import ControlUnit, control_maps

    results = process(*page_args(num_samples=1, image2=str(DEMO_IMAGE), annotator2="scribble", strength2=0.5),
                      progress=RecordingProgress())  # fmt: skip
    assert len(results) == 3  # two maps, one sample
    _, scribble = control_maps([ControlUnit(), ControlUnit(image=read_image(DEMO_IMAGE), annotator="scribble")],
                               read_image(IMAGE), 128, lambda message: None)  # fmt: skip
    assert np.array_equal(results[1], 255 - scribble)
    alone = process(*page_args(num_samples=1), progress=RecordingProgress())
    assert np.array_equal(results[0], alone[0]) and not np.array_equal(results[2], alone[1])


@pytest.mark.parametrize("blank", [False, True])
def test_drawing_is_a_scribble_unit(tiny_model: torch.nn.Module, tmp_path: Path, blank: bool) -> None:
    """The canvas's value (as the page sends it: strokes on a transparent layer) is read as a scribble; a blank
    canvas adds no unit."""
    from PIL import Image

    from cldm.pipeline import read_image
    from cldm.units import ControlUnit, control_maps

    strokes = np.zeros((512, 512, 4), np.uint8)
    if not blank:
        strokes[200:210, 50:450, 3] = 255  # a black line
    Image.fromarray(strokes).save(tmp_path / "composite.png")
    sent = {"background": None, "layers": [], "composite": {"path": str(tmp_path / "composite.png"),
            "orig_name": "composite.png", "meta": {"_type": "gradio.FileData"}}, "id": None}  # fmt: skip
    from share import demo_params

    page = gradio_canny2image.build_page(Canny2Image(tiny_model, torch.device("cpu")), defaults=demo_params())
    (run,) = [fn for fn in page.fns.values() if fn.name == "process"]
    results = run.fn(*page_args(num_samples=1, drawing2=sent), progress=RecordingProgress())
    assert len(results) == (2 if blank else 3)
    if not blank:
        _, scribble = control_maps([ControlUnit(), ControlUnit(image=read_image(tmp_path / "composite.png"),
                                                               annotator="scribble")], read_image(IMAGE), 128,
                                   lambda message: None)  # fmt: skip
        assert scribble.any() and np.array_equal(results[1], 255 - scribble)


def test_second_unit_controlnet_choices(tmp_path: Path) -> None:
    from share import DEMO_CKPT

    extra = tmp_path / "depth.pth"
    extra.write_bytes(b"")
    choices = gradio_canny2image.page_controlnets([str(extra)], DEMO_CKPT)
    assert choices == {str(extra): extra}  # models/ holds only the loaded model's checkpoint
    assert gradio_canny2image.page_controlnets([], tmp_path / "other.ckpt") == {DEMO_CKPT.name: DEMO_CKPT}
    with pytest.raises(ValueError, match="--control-net .*nope.pth: file or folder not found"):
        gradio_canny2image.page_controlnets([str(tmp_path / "nope.pth")])


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"input_image": None}, "No input image"),
        ({"image_resolution": 4096}, "image_resolution (--image-resolution) must be between 64 and 2048, got 4096"),
        ({"low_threshold": 250}, "low_threshold (250) must not exceed high_threshold (200)"),
    ],
)
def test_bad_input_is_a_page_error(process, overrides: dict, message: str) -> None:
    with pytest.raises(gr.Error) as err:
        process(*page_args(**overrides), progress=RecordingProgress())
    assert message in err.value.message


def test_unreadable_upload_is_a_page_error(process, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(gr.Error) as err:
        process(*page_args(input_image=str(bad)), progress=RecordingProgress())
    assert err.value.message == "broken.png: cannot read image (UnidentifiedImageError)"  # the name, not the folder


def test_requests_are_queued_one_at_a_time() -> None:
    page = gradio_canny2image.build_page(pipe=None)
    (run,) = [fn for fn in page.fns.values() if fn.name == "process"]
    assert run.queue and run.concurrency_limit == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"server did not answer on {url} within {timeout} s")


@pytest.fixture()
def server(tmp_path: Path):
    """``gradio_canny2image.py`` with no real checkpoint (so on the tiny demo) on a free loopback port."""
    if DEFAULT_CKPT.is_file():
        pytest.skip("the real checkpoint is present; this test is about the page without it")
    port = free_port()
    log_path = tmp_path / "server.log"  # a file, not a pipe: nobody reads a pipe, and a full one stalls the server
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "gradio_canny2image.py"), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, proc, log_path)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        print(log_path.read_text()[-3000:])  # shown by pytest when the test fails


def browser_missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    return None


def set_number(page, label: str, value: int) -> None:
    """Type into a slider's number box until its range input shows the value (an edit can race the page)."""
    box, slider = page.get_by_label(f"number input for {label}"), page.get_by_label(f"range slider for {label}")
    for _ in range(5):
        box.fill(str(value))
        box.press("Tab")
        page.wait_for_timeout(200)
        if slider.input_value() == str(value) and box.input_value() == str(value):
            return
    raise AssertionError(f"could not set {label} to {value}")


@pytest.mark.slow
def test_page_in_headless_chromium(server: str, tmp_path: Path) -> None:
    missing = browser_missing()
    if missing:
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail(missing)
        pytest.skip(missing)
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server, wait_until="networkidle")
            notice = page.locator("#notice")
            expect(notice).to_contain_text("Demo model.")
            expect(notice).to_contain_text("control_sd15_canny.pth not found")
            expect(page.get_by_label("Prompt", exact=True)).to_have_value(DEMO_PROMPT)  # the demo's own settings
            page.get_by_label("Remove Image").first.click()  # the demo's circle image is pre-filled: remove it

            page.get_by_role("button", name="Run").click()  # no image now: refused before queueing, said on the page
            error = page.get_by_text("No input image").first
            expect(error).to_be_visible(timeout=30_000)

            page.locator("input[type=file]").first.set_input_files(str(DEMO_IMAGE))  # the demo's own circle again
            page.get_by_text("Advanced options").click()
            expect(page.get_by_label("number input for Images")).to_be_visible()
            set_number(page, "Images", 2)
            set_number(page, "Image Resolution", 64)
            set_number(page, "Steps", 60)  # long enough at 64 px for the progress bar to be seen
            page.get_by_role("button", name="Run").click()
            expect(page.get_by_text("DDIM sampling").first).to_be_visible(timeout=60_000)  # the progress bar

            images = page.locator("#gallery img")
            expect(images).to_have_count(3, timeout=180_000)  # the server survived the error, then answered
            expect(error).to_be_hidden()  # the refusal's message is gone with the accepted request
            page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].every(i => i.complete)")
            sizes = images.evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
            assert sizes == [[64, 64]] * 3

            page.get_by_text("Control 2", exact=True).click()  # a two-unit run: the circle again, as a scribble
            page.locator("input[type=file]").nth(1).set_input_files(str(DEMO_IMAGE))
            expect(page.get_by_label("Remove Image")).to_have_count(2)
            page.get_by_role("button", name="Run").click()
            expect(images).to_have_count(4, timeout=180_000)  # two maps, two samples
            page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].every(i => i.complete)")
            assert images.evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])") == [[64, 64]] * 4
            shot = tmp_path / "gradio_canny2image.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("SCREENSHOT_DIR"):  # how the README's screenshot is made
                shutil.copy(shot, Path(os.environ["SCREENSHOT_DIR"]) / shot.name)
        finally:
            browser.close()
