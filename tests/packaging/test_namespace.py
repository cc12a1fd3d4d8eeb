"""The distribution installs one import name, ``fogline``, and nothing else.

Builds the wheel from the working tree (no network: ``--no-deps --no-build-isolation``)
and reads its file list, so a folder mapped wrongly in ``pyproject.toml`` or a
stray top-level package fails here rather than in a user's site-packages.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("fogline-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_has_one_top_level_package(wheel_names: list[str]) -> None:
    tops = {name.split("/")[0] for name in wheel_names}
    dist_info = {t for t in tops if t.endswith((".dist-info", ".data"))}
    assert tops - dist_info == {"fogline"}


def test_wheel_maps_the_design_folders_under_fogline(wheel_names: list[str]) -> None:
    names = set(wheel_names)
    for module in (
        "fogline/models/svi.py",
        "fogline/drift/policy.py",
        "fogline/daemon/stream/pipeline.py",
        "fogline/daemon/query/api.py",
        "fogline/replay_data/generator.py",
        "fogline/replay_data/abrupt.jsonl",
        "fogline/bench/svi.py",
        "fogline/cli/__init__.py",
    ):
        assert module in names, module
    # every source file of a mapped folder is in the wheel (no folder silently left out)
    for folder, package in (("models", "models"), ("drift", "drift"), ("daemon", "daemon")):
        for src in (ROOT / folder).rglob("*.py"):
            rel = src.relative_to(ROOT / folder).as_posix()
            assert f"fogline/{package}/{rel}" in names, rel


def test_only_fogline_is_importable_outside_the_checkout(tmp_path: Path) -> None:
    code = (
        "import importlib.util, fogline, fogline.cli;"
        "print([m for m in ('daemon', 'models', 'drift', 'replay_data', 'benchmarks')"
        " if importlib.util.find_spec(m) is not None])"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_fogline_help_lists_every_command() -> None:
    from fogline.cli import COMMAND_MODULES, build_parser

    text = build_parser().format_help()
    for command in (
        "warmstart",
        "run",
        "demo",
        "replay",
        "config",
        "snapshot",
        "experiment",
        "serve",
        "query",
        "bench",
    ):
        assert command in text
    assert all(m.startswith("fogline.cli.commands.") for m in COMMAND_MODULES)
