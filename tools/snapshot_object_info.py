"""Write tests/data/object_info/<version>.json: the schemas of PSEdit's nodes and of every stock node the workflows
use, as the ComfyUI at COMFYUI_PATH (of that version) serves them.

    COMFYUI_PATH=/path/to/ComfyUI python tools/snapshot_object_info.py     # once per supported ComfyUI version
    python tools/make_workflows.py      # then regenerate the workflows (from the oldest version's snapshot)

Starts ComfyUI (``main.py --cpu``, loopback, a free port, no browser, no API nodes) with this repository installed as
``custom_nodes/psedit`` in a throw-away base directory (see tests/host/comfy_server.py), reads ``/object_info``, keeps
every ``PSEdit*`` node plus the stock nodes the generator needs (STOCK, OPTIONAL) and any other type found in
example_workflows/, and stops the server. File lists (checkpoints, input images, decoders) are emptied so the
snapshot is the same on every machine. The always-run workflow tests validate example_workflows/ against every
version's file; a host test checks the file of the host's version still equals the live schemas, so it cannot go
stale unnoticed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "host"))
sys.path.insert(0, str(REPO / "tests" / "workflows"))

import snapshots  # noqa: E402
from comfy_server import Server  # noqa: E402

# Stock nodes tools/make_workflows.py builds with; OPTIONAL ones are used only when this ComfyUI has them.
STOCK = ["CheckpointLoaderSimple", "CLIPTextEncode", "LoadImage", "VAEEncode", "VAEDecode", "BasicScheduler",
         "KSamplerSelect", "DisableNoise", "SamplerCustomAdvanced", "SaveImage", "PreviewImage", "MaskToImage",
         "ImageToMask", "ImageScaleToTotalPixels", "FluxGuidance", "PrimitiveStringMultiline",
         "CFGGuider"]
OPTIONAL = ["ImageBatch"]
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# Machine-specific option lists (files on disk), emptied down to the fixed choices listed here; tests/workflows/
# validate.py accepts any file name there.
FILE_LISTS = {("CheckpointLoaderSimple", "ckpt_name"): [], ("LoadImage", "image"): [],
              ("PSEditPerceptualGuidance", "decoder"): ["taesd", "vae"]}


def workflow_types() -> set[str]:
    types = set()
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        types |= {n["type"] for n in json.loads(path.read_text())["nodes"]} - FRONTEND_ONLY
    return types


def strip_file_lists(name: str, info: dict) -> dict:
    """``info`` with the option lists of file-name inputs emptied but for their fixed choices (old list form and new
    COMBO form)."""
    info = json.loads(json.dumps(info))
    for (node, inp), fixed in FILE_LISTS.items():
        if name != node:
            continue
        for group in ("required", "optional"):
            spec = info["input"].get(group, {}).get(inp)
            if spec is None:
                continue
            if isinstance(spec[0], list):
                spec[0] = [o for o in spec[0] if o in fixed]
            if len(spec) > 1 and isinstance(spec[1], dict) and "options" in spec[1]:
                spec[1]["options"] = [o for o in spec[1]["options"] if o in fixed]
    return info


def keep(object_info: dict, wanted: set[str]) -> dict:
    return {name: strip_file_lists(name, info) for name, info in sorted(object_info.items())
            if name.startswith("PSEdit") or name in wanted}


def main() -> None:
    wanted = set(STOCK) | set(OPTIONAL) | workflow_types()
    server = Server()
    try:
        server.start()
        live = server.get("/object_info")
        log = server.log()
    finally:
        server.stop(remove=True)
    missing = sorted(n for n in wanted - set(OPTIONAL) if n not in live)
    if missing:
        raise SystemExit(f"these node types are missing from this ComfyUI: {missing}")
    if not any(n.startswith("PSEdit") for n in live):
        raise SystemExit(f"PSEdit's nodes did not load; the server log was:\n{log[-4000:]}")
    info = keep(live, wanted)
    out = snapshots.path_for(snapshots.host_version(server.root))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    sys.stdout.write(f"wrote {out.relative_to(REPO)} ({len(info)} node types; "
                     f"{', '.join(n for n in OPTIONAL if n not in live) or 'no optional node'} missing)\n")


if __name__ == "__main__":
    main()
