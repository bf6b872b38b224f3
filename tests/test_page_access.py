"""The page beyond loopback (issue 20 item 13): ``--auth`` / ``--auth-file`` (Gradio's login), the upload limit
``--max-upload-mb``, and requests checked (size bound included) before they are queued; served in-process on a
free loopback port and driven over HTTP."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

import gradio_canny2image  # noqa: E402
from cldm.pipeline import Canny2Image  # noqa: E402
from gradio_canny2image import (  # noqa: E402
    INPUTS,
    build_page,
    build_parser,
    checked_request,
    launch_options,
    main,
    make_validator,
)

MB = 2**20
# The page's control-unit inputs after the sampler (annotator, window; the second unit, off without its image).
UNITS = ["canny", 0.0, 1.0, None, "none", "main", 1.0, 0.0, 1.0, None]


def options(*argv: str) -> dict:
    return launch_options(build_parser().parse_args(list(argv)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(path: Path, height: int, width: int) -> Path:
    Image.fromarray(np.full((height, width), 128, np.uint8)).save(path)
    return path


class StubPipe:
    """Stands in for :class:`Canny2Image`: records the images it is given, returns black images."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def steps_run(self, params: object) -> int:
        return params.ddim_steps  # type: ignore[attr-defined]

    def __call__(self, image: np.ndarray, params: object, **kwargs: object) -> tuple[list[np.ndarray], int]:
        self.calls.append(image.shape)
        return [np.zeros((64, 64, 3), np.uint8)] * 2, 1


def serve(*argv: str) -> Iterator[tuple[httpx.Client, StubPipe]]:
    pipe = StubPipe()
    page = build_page(pipe)  # type: ignore[arg-type]
    page.launch(**options("--port", str(free_port()), *argv), prevent_thread_lock=True, quiet=True)
    try:
        with httpx.Client(base_url=page.local_url, timeout=30) as client:
            yield client, pipe
    finally:
        page.close()


@pytest.fixture()
def open_page() -> Iterator[tuple[httpx.Client, StubPipe]]:
    """The page without a login, with a 1 MB upload limit."""
    yield from serve("--max-upload-mb", "1")


def upload(client: httpx.Client, path: Path) -> httpx.Response:
    return client.post("/gradio_api/upload", files={"files": (path.name, path.read_bytes())})


def join(client: httpx.Client, image: str, name: str, image_resolution: int = 512, **values: object) -> httpx.Response:
    """Submit a Run request (the page's inputs, INPUTS, small values, ``values`` by name) to the queue, as the
    page's client does."""
    deps = client.get("/config").json()["dependencies"]
    (fn_index,) = [i for i, d in enumerate(deps) if d.get("api_name") == "process"]
    data = [{"path": image, "orig_name": name, "meta": {"_type": "gradio.FileData"}}, "red circle", "", "", 1,
            image_resolution, 1, False, 1.0, 9.0, 1, 0.0, 100, 200, "ddim", 1.0, None, None, *UNITS]  # fmt: skip
    for input_name, value in values.items():
        data[INPUTS.index(input_name)] = value
    body = {"data": data, "fn_index": fn_index, "session_hash": "test", "event_data": None, "trigger_id": None}
    return client.post("/gradio_api/queue/join", json=body)


def test_oversized_request_is_refused_before_it_is_queued(open_page, tmp_path: Path) -> None:
    client, pipe = open_page
    wide = png(tmp_path / "wide.png", 64, 1024)  # 16:1: at 512 exactly the bound (512 x 8192), at 576 over it
    (path,) = upload(client, wide).json()
    refused = join(client, path, "wide.png", image_resolution=576)
    assert refused.status_code == 422  # Gradio's validator answered: no event, nothing queued
    verdicts = refused.json()["detail"]
    assert [v["parameter_name"] for v in verdicts] == list(INPUTS)
    assert [v["is_valid"] for v in verdicts] == [False] + [True] * (len(INPUTS) - 1)
    assert verdicts[0]["message"] == (
        "wide.png: 1024x64 at image_resolution (--image-resolution) 576 gives 9216x576 = 5308416 "
        "pixels, over the limit of 4194304 (2048x2048); use --image-resolution 512 or less, or crop the image"
    )
    accepted = join(client, path, "wide.png", image_resolution=512)
    assert accepted.status_code == 200 and accepted.json()["event_id"], accepted.text
    assert pipe.calls in ([], [(64, 1024)])  # only the accepted request may have reached the worker


@pytest.mark.parametrize("how", ["direct", "traversal", "symlink"])
def test_a_server_path_in_place_of_an_upload_is_refused(open_page, tmp_path: Path, how: str) -> None:
    """A request naming a server file (not one uploaded through the page) is refused by Gradio before our
    validator or the worker sees it, the file is not copied into Gradio's cache, and /gradio_api/file= does not
    serve it. (``gradio_client`` uploads a local file named in a FileData from the client's own machine: that
    is an upload, not a server path.)"""
    from gradio.utils import get_upload_folder

    client, pipe = open_page
    secret = png(tmp_path / f"secret-{tmp_path.name}.png", 8, 8)  # a name no other test uses
    named = {"direct": str(secret), "traversal": f"{get_upload_folder()}/x/../..{secret}", "symlink": None}[how]
    if how == "symlink":  # a link inside the upload folder pointing out of it
        link_dir = Path(get_upload_folder()) / f"link-{tmp_path.name}"
        link_dir.mkdir(parents=True)
        (link_dir / secret.name).symlink_to(secret)
        named = str(link_dir / secret.name)
    try:
        refused = join(client, named, secret.name)
        assert refused.status_code == 400
        assert refused.json()["detail"].endswith("to the gradio cache dir because it was not uploaded by a user.")
        assert pipe.calls == []
        copies = [p for p in Path(get_upload_folder()).glob(f"*/{secret.name}") if not p.is_symlink()]
        assert copies == []
        assert client.get(f"/gradio_api/file={secret}").status_code == 403
    finally:
        if how == "symlink":
            (link_dir / secret.name).unlink()
            link_dir.rmdir()


@pytest.mark.parametrize(
    "values,at,message",
    [
        (
            {"image_resolution": 4096},
            "image_resolution",
            "image_resolution must be between 256 and 768 on this page, got 4096",
        ),
        ({"num_samples": 100}, "num_samples", "num_samples must be between 1 and 12 on this page, got 100"),
        ({"ddim_steps": 101}, "ddim_steps", "ddim_steps must be between 1 and 100 on this page, got 101"),
        ({"ddim_steps": None}, "ddim_steps", "ddim_steps must be a number, got None"),
        ({"seed": "abc"}, "seed", "seed must be a number, got 'abc'"),
        ({"eta": "x"}, "eta", "eta must be a number, got 'x'"),
        ({"strength": None}, "strength", "strength must be a number, got None"),
        ({"prompt": 5}, "prompt", "prompt must be text, got 5"),
        ({"sampler": "nope"}, "sampler", "sampler (--sampler): "),
        ({"text": True}, "input_image", "notes.txt: cannot read image (UnidentifiedImageError)"),
    ],
)
def test_values_gradio_would_refuse_get_the_validators_message(
    open_page, tmp_path: Path, values: dict, at: str, message: str
) -> None:
    """Out of a slider's limits, not a number, not an image: refused with the message on the input at fault
    (HTTP 422), not by Gradio's component checks (HTTP 400, no message on the page)."""
    client, pipe = open_page
    image = tmp_path / "notes.txt" if values.pop("text", False) else png(tmp_path / "ok.png", 8, 8)
    if image.suffix == ".txt":
        image.write_text("not an image")
    (path,) = upload(client, image).json()
    refused = join(client, path, image.name, **values)
    assert refused.status_code == 422, refused.text
    said = [(v["parameter_name"], v["message"]) for v in refused.json()["detail"] if not v["is_valid"]]
    assert len(said) == 1 and said[0][0] == at and said[0][1].startswith(message), said
    assert pipe.calls == []


@pytest.mark.parametrize("size,status", [(MB, 200), (MB + 1, 413)])
def test_uploads_over_the_limit_are_refused(open_page, tmp_path: Path, size: int, status: int) -> None:
    client, _ = open_page
    blob = tmp_path / "blob.png"
    blob.write_bytes(b"\0" * size)
    response = upload(client, blob)
    assert response.status_code == status
    if status == 413:
        assert f"maximum allowed size of {MB} bytes" in response.text


def test_login_is_required_with_an_auth_file(tmp_path: Path) -> None:
    auth = tmp_path / "page.auth"
    auth.write_text("# who may use the page\nann:s3cret:with,colon\n\nbob:pw\n")
    for client, _ in serve("--auth-file", str(auth)):
        assert client.get("/config").status_code == 401
        assert upload(client, png(tmp_path / "a.png", 8, 8)).status_code == 401
        assert client.post("/login", data={"username": "ann", "password": "s3cret"}).status_code == 400
        assert client.post("/login", data={"username": "ann", "password": "s3cret:with,colon"}).status_code == 200
        assert client.get("/config").status_code == 200


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_auth_file_saved_with_a_bom_keeps_its_first_user(tmp_path: Path, newline: str) -> None:
    """Windows Notepad saves UTF-8 with a byte-order mark (and CRLF line ends): the first user is ``ann``, not
    ``\\ufeffann``."""
    auth = tmp_path / "page.auth"
    auth.write_bytes(newline.join(["ann:pw", "bob:x y"]).encode("utf-8-sig"))
    assert auth.read_bytes().startswith(b"\xef\xbb\xbfann:")
    assert options("--auth-file", str(auth))["auth"] == [("ann", "pw"), ("bob", "x y")]


def test_launch_options_defaults() -> None:
    assert options() == {"server_name": "127.0.0.1", "server_port": 7860, "share": False, "auth": None,
                         "max_file_size": 20 * MB}  # fmt: skip
    listen = options("--listen", "--auth", "ann:pw,bob:a:b", "--max-upload-mb", "5", "--port", "8080")
    assert listen == {"server_name": "0.0.0.0", "server_port": 8080, "share": False,
                      "auth": [("ann", "pw"), ("bob", "a:b")], "max_file_size": 5 * MB}  # fmt: skip


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-upload-mb", "0"], "error: --max-upload-mb must be at least 1, got 0"),
        (["--auth", "ann"], "error: --auth: entry 1 is not USER:PASSWORD (both non-empty)"),
        (["--auth", "ann:pw,:secret"], "error: --auth: entry 2 is not USER:PASSWORD (both non-empty)"),
        (["--auth", "ann:"], "error: --auth: entry 1 is not USER:PASSWORD (both non-empty)"),
        (["--auth", " , "], "error: --auth: no USER:PASSWORD entry"),
        (["--auth", "a:b", "--auth-file", "x"], "error: --auth and --auth-file cannot be combined: give one of them"),
        (["--auth-file", "{tmp}/missing.auth"], "error: --auth-file {tmp}/missing.auth: cannot read it"),
        (["--auth-file", "{tmp}/empty.auth"], "error: --auth-file {tmp}/empty.auth: no USER:PASSWORD entry"),
        (["--auth-file", "{tmp}/bad.auth"], "error: --auth-file {tmp}/bad.auth: entry 2 is not USER:PASSWORD"),
    ],
)
def test_bad_page_flags_are_one_line(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str], message: str
) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded despite a bad flag")

    monkeypatch.setattr(Canny2Image, "from_checkpoint", load)
    (tmp_path / "empty.auth").write_text("# nobody\n\n")
    (tmp_path / "bad.auth").write_text("ann:pw\nbob-secret\n")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.replace("{tmp}", str(tmp_path))), err
    assert "secret" not in err  # a password is never echoed


@pytest.mark.parametrize(
    "argv,warned",
    [
        (["--listen"], "warning: --listen without --auth or --auth-file: anyone who can reach the page can use it"),
        (["--share"], "warning: --share without --auth or --auth-file: anyone who can reach the page can use it"),
        (
            ["--listen", "--share"],
            "warning: --listen and --share without --auth or --auth-file: anyone who can reach the page can use it",
        ),  # fmt: skip
        (["--listen", "--auth", "ann:pw"], None),
        ([], None),
    ],
)
def test_exposed_page_without_login_is_warned(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, argv: list[str], warned: str | None
) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise ValueError("load reached")

    monkeypatch.setattr(Canny2Image, "from_checkpoint", load)
    assert main([*argv, "--demo"]) == 1
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ([] if warned is None else [warned])
    assert err.splitlines()[-1] == "error: load reached"


@pytest.mark.parametrize(
    "overrides,at,message",
    [
        ({}, None, ""),
        ({"input_image": None}, "input_image", gradio_canny2image.NO_IMAGE),
        ({"image_resolution": 4096}, "image_resolution", "image_resolution (--image-resolution) must be between"),
        ({"low_threshold": 250}, "low_threshold", "low_threshold (250) must not exceed high_threshold (200)"),
        ({"num_samples": 13}, "num_samples", "num_samples (--num-samples) must be between 1 and 12, got 13"),
        ({"image_resolution": 2048, "wide": True}, "input_image", "wide.png: 3000x4 at image_resolution"),
        ({"broken": True}, "input_image", "broken.png: cannot read image"),
        ({"sampler": "lcm", "ddim_steps": 60}, "ddim_steps", "ddim_steps (--ddim-steps): "),
        ({"sampler": "dpmpp_2m", "eta": 0.5}, "eta", "eta (--eta) applies to the ddim sampler only"),
        ({"annotator": "depth"}, "annotator", "annotator (--annotator) must be one of canny, none, scribble"),
        ({"control_start": 0.8, "control_end": 0.2}, "control_start", "must not exceed control_end"),
        ({"image2": "ok"}, None, ""),
        ({"image2": "missing"}, "image2", "missing.png: input image not found"),
        ({"image2": "ok", "controlnet2": "nope.pth"}, "controlnet2", "Control 2: unknown ControlNet 'nope.pth'"),
        ({"image2": "ok", "annotator2": "pose"}, "annotator2", "Control 2: annotator must be one of"),
        ({"image2": "ok", "start2": 0.9, "end2": 0.1}, "start2", "Control 2: start (0.9) must not exceed end (0.1)"),
        ({"image2": "ok", "strength2": 3}, "strength2", "strength2 must be between 0 and 2"),
    ],
)
def test_validator_puts_the_message_on_the_input_at_fault(
    tmp_path: Path, overrides: dict, at: str | None, message: str
) -> None:
    image = str(png(tmp_path / "wide.png", 4, 3000) if overrides.pop("wide", False) else png(tmp_path / "ok.png", 8, 8))
    if overrides.pop("broken", False):
        image = str(tmp_path / "broken.png")
        Path(image).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    given = [image, "red circle", "", "", 1, 64, 1, False, 1.0, 9.0, 1, 0.0, 100, 200, "ddim", 1.0, None, None, *UNITS]
    values = dict(zip(INPUTS, given, strict=True))
    values.update(overrides)
    if "image2" in overrides:  # the second control unit's image: the first's, or a missing file
        values["image2"] = image if overrides["image2"] == "ok" else str(tmp_path / "missing.png")
    verdicts = make_validator()(*values.values())
    assert [v["is_valid"] for v in verdicts] == [name != at for name in INPUTS]
    (said,) = [v["message"] for v in verdicts if not v["is_valid"]] or [""]
    assert message in said if message else said == ""


BOMB = "bomb96m.png: image too large to decode safely (over 1000 pixels, Pillow's decompression-bomb limit)"


@pytest.mark.parametrize(
    "broken,message", [(False, BOMB), (True, "bomb96m.png: cannot read image (UnidentifiedImageError)")]
)
def test_image_messages_name_the_file_not_the_servers_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, broken: bool, message: str
) -> None:
    """An upload lives in Gradio's cache (``/tmp/gradio/<hash>/name.png``): the page's message names the file."""
    image = png(tmp_path / "bomb96m.png", 64, 64)
    if broken:
        image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice this: Pillow's bomb error
    given = [str(image), "red circle", "", "", 1, 64, 1, False, 1.0, 9.0, 1, 0.0, 100, 200, "ddim", 1.0, None, None,
             *UNITS]  # fmt: skip
    verdicts = make_validator()(*given)
    assert [v["message"] for v in verdicts if not v["is_valid"]] == [message]
    with pytest.raises(gr.Error) as raised:
        gradio_canny2image.make_process(StubPipe())(*given)  # type: ignore[arg-type]
    assert raised.value.message == message


def test_upload_reaches_read_image_as_the_users_file(tmp_path: Path) -> None:
    """The Run event hands over the uploaded file itself (no preprocessing, so no conversion by Gradio): a 16-bit
    PNG is scaled by read_image (not clipped to white by an RGB conversion) and nothing is decoded before the
    checks."""
    from cldm.pipeline import read_image

    sixteen = tmp_path / "depth.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    page = build_page(StubPipe())  # type: ignore[arg-type]
    (run,) = [fn for fn in page.fns.values() if fn.name == "process"]
    assert run.preprocess is False
    sent = {"path": str(sixteen), "orig_name": "depth.png", "meta": {"_type": "gradio.FileData"}}
    path, _, second = checked_request(True, sent, "red circle", "", "", 1, 64, 1, False, 1.0, 9.0, 1, 0.0, 100, 200)
    assert second is None
    assert path == str(sixteen)
    assert np.unique(read_image(path)).tolist() == [round(40000 / 257)]
