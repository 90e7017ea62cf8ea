"""Write tests/data/object_info.json: the schemas of every node type the example workflows use, from a live server.

    COMFYUI_PATH=/path/to/ComfyUI python tools/snapshot_object_info.py

Starts ComfyUI on loopback with this repository installed (see tests/host/comfy_server.py), reads /object_info and keeps
PSEdit's nodes and the stock nodes in STOCK. The always-run workflow tests validate example_workflows/ against this
file; a host test checks it still equals the live schemas, so it cannot go stale unnoticed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "host"))

from comfy_server import Server  # noqa: E402

OUT = REPO / "tests" / "data" / "object_info.json"
STOCK = ["CheckpointLoaderSimple", "CLIPTextEncode", "LoadImage", "VAEEncode", "VAEDecode", "BasicScheduler",
         "KSamplerSelect", "DisableNoise", "SamplerCustomAdvanced", "SaveImage", "PreviewImage", "ImageBatch",
         "MaskToImage", "GrowMask"]
# Machine-specific option lists (files on disk) are emptied so the snapshot is the same everywhere.
FILE_LISTS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image")}


def keep(object_info: dict) -> dict:
    out = {}
    for name, info in sorted(object_info.items()):
        if name.startswith("PSEdit") or name in STOCK:
            info = json.loads(json.dumps(info))
            for node, inp in FILE_LISTS:
                if name == node:
                    spec = info["input"]["required"][inp]
                    spec[0] = [] if isinstance(spec[0], list) else spec[0]
                    if isinstance(spec[1], dict) and "options" in spec[1]:
                        spec[1]["options"] = []
            out[name] = info
    return out


def main() -> None:
    with Server() as server:
        info = keep(server.get("/object_info"))
    missing = [n for n in STOCK if n not in info]
    if missing:
        raise SystemExit(f"these stock nodes are missing from this ComfyUI: {missing}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    sys.stdout.write(f"wrote {OUT} ({len(info)} node types)\n")


if __name__ == "__main__":
    main()
