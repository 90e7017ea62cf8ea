"""Host tier: a real ComfyUI server with PSEdit in custom_nodes starts cleanly, serves PSEdit's node schemas (equal
to the snapshot the always-run workflow tests use) and lists and serves the example workflows as templates."""

from __future__ import annotations

import json
import urllib.request

import pytest
import tiny

try:
    tiny.comfy_path()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

from comfy_server import PACK_FOLDER, Server  # noqa: E402

SNAPSHOT = json.loads((tiny.REPO / "tests" / "data" / "object_info.json").read_text())
WORKFLOWS = sorted(p.stem for p in (tiny.REPO / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def server():
    s = Server().start()
    yield s
    s.stop(remove=True)


def test_pack_imports_without_errors(server):
    log = server.log()
    lines = [line for line in log.splitlines() if PACK_FOLDER in line or "psedit" in line.lower()]
    assert not [line for line in lines if "IMPORT FAILED" in line or "Error" in line], lines
    assert any("custom_nodes/psedit" in line for line in lines), log[-2000:]


def test_schemas_match_snapshot(server):
    live = server.get("/object_info")
    psedit = sorted(k for k in live if k.startswith("PSEdit"))
    assert psedit == sorted(k for k in SNAPSHOT if k.startswith("PSEdit"))
    for name, snap in SNAPSHOT.items():
        info = json.loads(json.dumps(live[name]))
        for group in ("required", "optional"):  # file lists are machine-specific; the snapshot keeps them empty
            for spec in info["input"].get(group, {}).values():
                if name in ("CheckpointLoaderSimple", "LoadImage") and isinstance(spec[0], list):
                    spec[0] = []
                    if len(spec) > 1 and isinstance(spec[1], dict) and "options" in spec[1]:
                        spec[1]["options"] = []
        assert info == snap, f"{name} changed: run tools/snapshot_object_info.py and tools/make_workflows.py"
    for name in psedit:
        info = live[name]
        assert len(info["description"]) > 40
        for group in ("required", "optional"):
            for inp, spec in info["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (name, inp)


def test_workflow_templates_listed_and_served(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == WORKFLOWS
    for name in WORKFLOWS:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK_FOLDER}/{name}.json") as r:
            served = json.loads(r.read())
        assert served == json.loads((tiny.REPO / "example_workflows" / f"{name}.json").read_text())
