"""Host tier, in the real frontend: a fresh ComfyUI (no model files at all) loads each example workflow the way the
template browser does and offers every model file the workflow needs for download.

The frontend is the comfyui-frontend-package of the ComfyUI at COMFYUI_PATH (0.3.64: 1.27, a Missing Models
dialog; 0.33: 1.49, an Errors panel), in headless Chromium driven over the DevTools protocol
(tools/screenshot_workflows.py). Needs Chromium (``apt-get install chromium``; .ci/run installs it).
"""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
import tiny

try:
    tiny.comfy_path()
except tiny.ComfyUnavailable:
    pytest.skip("set COMFYUI_PATH to a ComfyUI checkout", allow_module_level=True)

sys.path.insert(0, str(tiny.REPO / "tools"))

import screenshot_workflows as frontend  # noqa: E402
from comfy_server import Server  # noqa: E402
from make_workflows import WORKFLOWS, path_of  # noqa: E402

# The screenshot tool's settings, with the missing-models warning on, as in a fresh install.
SETTINGS = {**frontend.SETTINGS, "Comfy.Workflow.ShowMissingModelsWarning": True}


def declared_models(workflow: dict) -> set[tuple[str, str]]:
    """``(directory, file)`` of every model file a workflow declares: on the node naming it, and workflow-level."""
    found = {(m["directory"], m["name"]) for m in workflow.get("models", [])}
    for node in workflow["nodes"]:
        found |= {(m["directory"], m["name"]) for m in (node.get("properties") or {}).get("models", [])}
    return found


def chromium() -> str:
    try:
        return frontend.find_chromium(None)
    except SystemExit:
        pytest.fail("no Chromium for the frontend check: apt-get install chromium (or set $CHROMIUM)")


async def listings(url: str, names: list[str]) -> dict[str, str]:
    """What the frontend lists as missing for each workflow, each loaded into a freshly opened page."""
    page = frontend.Browser(chromium(), timeout=90)
    out = {}
    try:
        await page.connect()
        await page.viewport(1400, 1000)
        for name in names:
            await page.send("Page.navigate", url=url)
            await page.wait_for("!!(window.app?.canvas && window.app?.graph && window.app?.extensionManager?.command)",
                                "the ComfyUI frontend to start", timeout=120)
            await page.wait_for("!!window.app.extensionManager.workflow?.activeWorkflow", "the startup workflow")
            await asyncio.sleep(1.0)  # the previous page's workflow is restored, and its dialog shown: close it
            await frontend.close_dialogs(page, expected=True)
            out[name] = await frontend.missing_models_listed(page, name)
    finally:
        await page.close()
    return out


def test_a_fresh_comfyui_offers_every_model_a_workflow_needs():
    server = Server().prepare()
    settings = server.base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(SETTINGS))
    frontend.sample_photo().save(server.base / "input" / "example.png")
    names = {path_of(n).stem: n for n in WORKFLOWS}
    try:
        server.start()
        listed = asyncio.run(listings(server.url, sorted(names)))
    finally:
        server.stop(remove=True)
    for title, name in names.items():
        workflow = tiny.workflow(name)
        wanted = declared_models(workflow)
        guided = any(n["type"] == "PSEditPerceptualGuidance" for n in workflow["nodes"])
        assert {d for d, _ in wanted} == {"checkpoints", *(["vae_approx"] * guided)}, wanted
        missing = sorted(f for _, f in wanted if f not in listed[title])
        assert not missing, f"{title}: the frontend does not offer {missing}; it lists:\n{listed[title][-2000:]}"
