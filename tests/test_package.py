"""The package: pyproject's build and console commands, ``pip install -e .``, and ``python -m tools.X`` /
``benchmarks.X`` from the repo root without an install."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
import sysconfig
import venv
from importlib import metadata
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
ROOT_SCRIPTS = ("cpu_canny2image", "gradio_canny2image", "tutorial_train", "tutorial_dataset", "tool_add_control",
                "tool_transfer_control", "share")  # fmt: skip
PACKAGES = ("ldm", "cldm", "annotator", "tools", "benchmarks")
TOOLS_WITH_MAIN = ("convert_checkpoint", "make_clip_tokenizer_files", "make_controlnet_manifests", "make_fill50k",
                   "make_random_checkpoint", "make_test_imgs", "make_tiny_demo", "measure_control")  # fmt: skip


def source_files() -> list[Path]:
    """The project's .py files: the root scripts and every package, tests included (no venvs, no caches)."""
    files = []
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "venv", "build")]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return files


def run(cmd: list[str | Path], cwd: Path) -> subprocess.CompletedProcess:
    """``cmd`` in ``cwd`` without PYTHONPATH (a command must find the project by its install or the cwd alone)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_console_commands_resolve_to_mains() -> None:
    required = {
        "controlnet-canny2image": "cpu_canny2image:main", "controlnet-gradio": "gradio_canny2image:main",
        "controlnet-train": "tutorial_train:main", "controlnet-add-control": "tool_add_control:main",
        "controlnet-convert": "tools.convert_checkpoint:main", "controlnet-bench": "benchmarks.bench_canny2image:main",
    }  # fmt: skip
    assert required.items() <= SCRIPTS.items()
    assert all(name.startswith("controlnet-") for name in SCRIPTS)
    for target in SCRIPTS.values():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        params = inspect.signature(main).parameters.values()
        assert all(p.default is not inspect.Parameter.empty for p in params), target  # callable with no arguments


def test_build_covers_the_code_and_the_tokenizer_files() -> None:
    from setuptools import find_packages

    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    assert sorted(setuptools_cfg["py-modules"]) == sorted(ROOT_SCRIPTS)
    assert sorted(p.stem for p in REPO.glob("*.py")) == sorted(ROOT_SCRIPTS)
    found = set(find_packages(str(REPO), include=setuptools_cfg["packages"]["find"]["include"]))
    on_disk = {str(p.parent.relative_to(REPO)).replace(os.sep, ".") for top in PACKAGES
               for p in (REPO / top).rglob("__init__.py")}  # fmt: skip
    assert found == on_disk and "tests" not in found and {"ldm.modules.encoders", "annotator.canny"} <= found
    data = setuptools_cfg["package-data"]["ldm.modules.encoders"]
    tokenizer_dir = REPO / "ldm" / "modules" / "encoders" / "clip_tokenizer"
    assert sorted(data) == sorted(f"clip_tokenizer/{p.name}" for p in tokenizer_dir.iterdir())
    assert PYPROJECT["project"]["dynamic"] == ["dependencies"]
    assert setuptools_cfg["dynamic"]["dependencies"]["file"] == ["requirements.txt"]


def test_no_sys_path_edits_and_no_tool_calls_another_tools_main() -> None:
    files = source_files()
    assert len(files) > 50
    needle = "sys.path." + "insert"  # spelt apart so that this file does not contain it
    assert [str(p.relative_to(REPO)) for p in files if needle in p.read_text(encoding="utf-8")] == []
    calls = []
    for path in files:
        if path.parent.name == "tests":
            continue  # tests may run a command's main as a user would
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and any(alias.name == "main" for alias in node.names):
                calls.append(f"{path.name}: from {node.module} import main")
            if isinstance(node, ast.Attribute) and node.attr == "main":
                calls.append(f"{path.name}: .main")
    assert calls == []


def test_ci_installs_the_package_and_runs_every_test() -> None:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    install = lines.index(".venv/bin/python -m pip install -q -e .")
    assert lines.index(".venv/bin/python -m pip install -q -r requirements-test.txt") < install
    assert lines.index('.venv/bin/python -m pytest -q -m ""') > install  # -m "": the slow tests too
    assert "-m 'not slow'" in PYPROJECT["tool"]["pytest"]["ini_options"]["addopts"]


def test_tools_and_benchmarks_run_as_modules_from_the_repo_root(tmp_path: Path) -> None:
    out = tmp_path / "fill"
    proc = run([sys.executable, "-m", "tools.make_fill50k", "--out", out, "--n", "3", "--resolution", "16"], REPO)
    assert proc.returncode == 0, proc.stderr
    assert len((out / "prompt.json").read_text().splitlines()) == 3
    with Image.open(out / "source" / "2.png") as img:
        assert img.size == (16, 16)
    proc = run([sys.executable, "-m", "benchmarks.bench_canny2image", "--paths", "fast,warp"], REPO)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: --paths: unknown path(s) ['warp'] (choose from fast, reference, diffusers, "
                                   "low-memory, compiled, reference-api)")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("module", [f"tools.{name}" for name in TOOLS_WITH_MAIN] + ["benchmarks.bench_canny2image"])
def test_every_tool_module_shows_its_help(module: str) -> None:
    proc = run([sys.executable, "-m", module, "--help"], REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ") and "--help" in proc.stdout


def test_installed_package_is_this_checkout_with_its_commands(tmp_path: Path) -> None:
    """Where the package is installed (.ci/run does ``pip install -e .``): it is this checkout, editable, with
    pyproject's commands, and a command runs outside the repo."""
    # pip's record of the install (direct_url.json); a build's controlnet_cpu.egg-info in the repo root, which
    # the repo root on sys.path also shows as a distribution, has none
    installed = [d for d in metadata.distributions(name="controlnet-cpu") if d.read_text("direct_url.json")]
    if not installed:
        pytest.skip("controlnet-cpu is not installed here (pip install -e .)")
    dist = installed[0]
    origin = json.loads(dist.read_text("direct_url.json"))
    if origin.get("url") != REPO.as_uri():
        pytest.skip(f"controlnet-cpu is installed from {origin.get('url')}, not from this checkout")
    assert origin["dir_info"].get("editable") is True
    assert {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"} == SCRIPTS
    command = Path(sysconfig.get_path("scripts")) / "controlnet-canny2image"
    proc = run([command, "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: controlnet-canny2image")


@pytest.fixture(scope="module")
def editable_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install -e .`` of this checkout, for real, into a scratch venv that sees this environment's packages
    through a .pth file (no download: ``--no-deps --no-build-isolation --no-index``); returns its bin folder."""
    setuptools = pytest.importorskip("setuptools", reason="building needs setuptools (requirements-test.txt)")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building needs setuptools>=77, found {setuptools.__version__} (requirements-test.txt)")
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(root)
    scheme = {"base": str(root), "platbase": str(root)}
    site = Path(sysconfig.get_path("purelib", vars=scheme))
    (site / "outer_env.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    bin_dir = Path(sysconfig.get_path("scripts", vars=scheme))
    proc = run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                "-e", REPO], root)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return bin_dir


@pytest.mark.slow
def test_pip_install_editable_gives_working_commands(editable_install: Path, tmp_path: Path) -> None:
    """Every console command answers --help outside the repo; the canny command runs the tiny demo from there,
    finding the repo's config, checkpoint and test image; the fill50k command writes to the caller's cwd."""
    for name in SCRIPTS:
        proc = run([editable_install / name, "--help"], tmp_path)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        assert proc.stdout.startswith(f"usage: {name}"), name
    proc = run([editable_install / "controlnet-canny2image", "--demo", "--ddim-steps", "2", "--seed", "3", "-o", "out"],
               tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["out/disc_edges.png", "out/disc_3_0.png"]
    for name in ("disc_edges.png", "disc_3_0.png"):
        with Image.open(tmp_path / "out" / name) as img:
            assert img.size == (64, 64)
    proc = run([editable_install / "controlnet-make-fill50k", "--out", "fill", "--n", "2", "--resolution", "16"],
               tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "fill" / "prompt.json").read_text().splitlines()) == 2
