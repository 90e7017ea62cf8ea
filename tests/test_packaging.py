"""Always-run checks of what ComfyUI-Manager and ComfyUI read before any node runs: the supported ComfyUI versions
(pyproject's ``requires-comfyui``, the pack's own check at import, the schema snapshots the tests use)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "workflows"))

import snapshots  # noqa: E402


def load_entry():
    """The pack's ``__init__.py`` as a plain module (outside ComfyUI it imports nothing of ComfyUI's)."""
    spec = importlib.util.spec_from_file_location("psedit_entry", REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_supported_versions_agree():
    entry = load_entry()
    comfy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["requires-comfyui"] == f">={entry.MIN_COMFYUI}"
    assert snapshots.oldest() == entry.MIN_COMFYUI  # the oldest supported version is the one tested
    assert f"ComfyUI {entry.MIN_COMFYUI}" in (REPO / "README.md").read_text()


@pytest.mark.parametrize("version", ["0.3.64", "0.3.65", "0.4.0", "0.33.0", "0.37.1", "1.0.0"])
def test_supported_comfyui_loads(version):
    load_entry().check_comfyui(version)


@pytest.mark.parametrize("version", ["0.3.63", "0.3.10", "0.2.7", None])
def test_an_older_comfyui_is_told_which_version_is_needed(version):
    with pytest.raises(ImportError, match=r"PSEdit needs ComfyUI 0\.3\.64 or later, this ComfyUI is .*update ComfyUI"):
        load_entry().check_comfyui(version)


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "skimage": "scikit-image", "yaml": "pyyaml"}
HOST = {"torch", "torchvision", "comfy", "comfy_extras", "comfy_api", "folder_paths", "nodes", "server"}


def third_party_imports(paths) -> set[str]:
    """Top-level modules imported by ``paths`` that are neither the standard library, the project nor the host."""
    import ast

    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    local = {p.stem for p in (REPO / "benchmarks").glob("*.py")} | {"psedit_core", "psedit_cli", "psedit_toy",
                                                                    "psedit_pack", "tiny", "cli_helpers"}
    return {m for m in found if m not in sys.stdlib_module_names and m not in local and m not in HOST}


def requirement_names(reqs: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_bench_extra_installs_what_every_benchmark_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    have = requirement_names(project["dependencies"] + project["optional-dependencies"]["bench"])
    needed = third_party_imports([*(REPO / "benchmarks").glob("*.py"), *(REPO / "psedit_toy").glob("*.py")])
    assert "matplotlib" in needed  # the sweep plot: the import this test exists for
    missing = {m for m in needed if DISTRIBUTIONS.get(m, m).lower() not in have}
    assert not missing, f"add to pyproject's [project.optional-dependencies] bench: {sorted(missing)}"
