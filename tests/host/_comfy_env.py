"""Host-test environment: a real ComfyUI from ``COMFYUI_PATH`` (skipped with a reason when absent), CONDITIONING
without a text encoder, and a stock-node runner that works for V1 classes and V3 ``io.ComfyNode`` classes alike.

The models, TAESD and the photo come from ``tiny.py`` (shared with ``benchmarks/``); the fixtures in
``conftest.py`` cache them per session.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest
import tiny

SKIP_REASON = "set COMFYUI_PATH to a ComfyUI checkout to run host tests"


def require_comfyui() -> str:
    """Put ComfyUI on ``sys.path`` and initialise ``comfy.model_management``, or skip the calling test.

    ``comfy.cli_args.args.cpu`` is set before ``comfy.model_management`` is first imported (it looks for an
    NVIDIA driver otherwise) unless CUDA is available, so the same tests use the GPU on a machine that has one.
    Returns the ComfyUI root.
    """
    try:
        return tiny.import_comfy()
    except tiny.ComfyUnavailable:
        pytest.skip(SKIP_REASON)


def family_of(model) -> str:
    """``"sdxl"`` or ``"sd15"`` from a ModelPatcher's UNet config (SDXL: context_dim 2048 and an ADM input)."""
    unet_config = model.model.model_config.unet_config
    if unet_config.get("context_dim") == 2048 and unet_config.get("adm_in_channels"):
        return "sdxl"
    if unet_config.get("context_dim") == 768:
        return "sd15"
    raise ValueError(f"not an SD1.x/SDXL UNet: context_dim={unet_config.get('context_dim')}")


def conditioning_for(model, seed: int, tokens: int = 77):
    """CONDITIONING shaped the way CLIPTextEncode makes it for ``model``, random but deterministic in ``seed``:
    ``[[cond [1, tokens, context_dim], {"pooled_output": [1, 1280]}]]`` (the pooled output only for SDXL, whose
    ``encode_adm`` needs it; width/height default to 768 there)."""
    return tiny.conditioning(family_of(model), seed, tokens)


def run_node(node_cls, **inputs) -> tuple:
    """Run a node class the way ComfyUI does, minus the graph: returns its output tuple.

    V1 classes (``FUNCTION`` on an instance; all of ``nodes_custom_sampler`` in ComfyUI 0.3.64) and V3
    ``io.ComfyNode`` classes (classmethod ``execute`` returning ``io.NodeOutput``, later upstream) both work;
    a coroutine ``execute`` is run to completion.
    """
    execute = getattr(node_cls, "execute", None)
    if hasattr(node_cls, "define_schema") and inspect.ismethod(execute):  # V3: classmethod `execute`
        out = execute(**inputs)
        if inspect.iscoroutine(out):
            out = asyncio.run(out)
        return tuple(out.result or ()) if hasattr(out, "result") else tuple(out)
    out = getattr(node_cls(), node_cls.FUNCTION)(**inputs)
    if inspect.iscoroutine(out):
        out = asyncio.run(out)
    return tuple(out["result"]) if isinstance(out, dict) else tuple(out)


def run_api_workflow(name: str, classes: dict, stand_in, changes: dict) -> tuple[list, list]:
    """The example workflow ``name``'s API-format twin (as the frontend sends it), executed node by node under
    inference mode, as ComfyUI's executor runs it. ``stand_in(kind, inputs)`` returns the outputs of a node the test
    stands in for (the checkpoint, the text encoder, the photo) or None to run ``classes[kind]``; ``changes`` sets
    widget values per node type (each must be an input of that node). Returns the images SaveImage received and the
    node types run, in order."""
    import sys

    import torch

    sys.path.insert(0, str(tiny.REPO / "tests" / "workflows"))
    from ui_to_api import ui_to_api

    pending = dict(ui_to_api(tiny.workflow(name), tiny.host_object_info()))
    results, saved, ran = {}, [], []

    def resolve(v):
        return results[v[0]][v[1]] if isinstance(v, list) else v

    with torch.inference_mode():
        while pending:
            ready = [i for i, n in pending.items()
                     if all(not isinstance(v, list) or v[0] in results for v in n["inputs"].values())]
            assert ready, f"no node can run: {sorted(pending)}"
            for node_id in ready:
                node = pending.pop(node_id)
                kind = node["class_type"]
                inputs = {k: resolve(v) for k, v in node["inputs"].items()}
                for key, value in changes.get(kind, {}).items():
                    assert key in inputs, (kind, key)
                    inputs[key] = value
                if kind == "SaveImage":
                    saved.append(inputs["images"])
                    out = ()
                else:
                    out = stand_in(kind, inputs)
                    if out is None:
                        out = run_node(classes[kind], **inputs)
                results[node_id] = out
                ran.append(kind)
    return saved, ran
