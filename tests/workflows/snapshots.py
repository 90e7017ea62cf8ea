"""The node schemas (``/object_info``) of every supported ComfyUI version, one snapshot file per version.

``tests/data/object_info/<version>.json`` holds PSEdit's nodes and the stock nodes the workflows use, as that
ComfyUI serves them (tools/snapshot_object_info.py writes it from a live server). The workflows are generated for the
oldest supported version's widgets (a newer frontend fills a widget added at the end of a node with its default, see
``ui_to_api.widget_values``); the always-run tests validate every workflow against every snapshot, and the host tests
compare the live server with the snapshot of its own version.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

DIR = Path(__file__).resolve().parents[1] / "data" / "object_info"


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def versions() -> list[str]:
    """The ComfyUI versions with a snapshot, oldest first."""
    return sorted((p.stem for p in DIR.glob("*.json")), key=version_key)


@cache
def load(version: str) -> dict:
    return json.loads((DIR / f"{version}.json").read_text())


def oldest() -> str:
    return versions()[0]


def newest() -> str:
    return versions()[-1]


def host_version(comfy_root: str | Path) -> str:
    """The version of the ComfyUI checkout at ``comfy_root`` (its ``comfyui_version.py``)."""
    text = (Path(comfy_root) / "comfyui_version.py").read_text()
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    if not match:
        raise ValueError(f"no __version__ in {comfy_root}/comfyui_version.py")
    return match.group(1)


def path_for(version: str) -> Path:
    return DIR / f"{version}.json"
