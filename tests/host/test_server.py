"""Host tier: a real ComfyUI server with PSEdit in custom_nodes starts cleanly, serves PSEdit's node schemas (equal
to the snapshot of its ComfyUI version the always-run workflow tests use, so it cannot go stale), documents every
node and input, lists and serves the example workflows as templates, and validates each workflow's API twin (as the
frontend converts it with the live schemas)."""

from __future__ import annotations

import io
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest
import tiny
from PIL import Image

try:
    tiny.comfy_path()
except tiny.ComfyUnavailable:
    pytest.skip("set COMFYUI_PATH to a ComfyUI checkout", allow_module_level=True)

sys.path.insert(0, str(tiny.REPO / "tools"))
sys.path.insert(0, str(tiny.REPO / "tests" / "workflows"))

import snapshots  # noqa: E402  (tests/workflows: a schema snapshot per supported ComfyUI version)
from comfy_server import PACK_FOLDER, Server  # noqa: E402
from make_workflows import WORKFLOWS as BUILDERS  # noqa: E402  (tools/: the workflows by id)
from make_workflows import path_of  # noqa: E402
from snapshot_object_info import strip_file_lists  # noqa: E402  (tools/: the snapshot's own normalisation)
from ui_to_api import ui_to_api  # noqa: E402

HOST_VERSION = snapshots.host_version(tiny.comfy_path())
KNOWN_HOST = HOST_VERSION in snapshots.versions()
# The host's own snapshot; on a ComfyUI without one (a user's newer one), the newest, of which only what PSEdit owns
# (its nodes' schemas) is compared.
SNAPSHOT = snapshots.load(HOST_VERSION if KNOWN_HOST else snapshots.newest())
WORKFLOWS = sorted(BUILDERS)  # ids; path_of(id) is example_workflows/<title>.json, the template <title>
PSEDIT_NODES = {"PSEditDDIMInvert", "PSEditNullTextInversion", "PSEditTripleGuider", "PSEditPerceptualGuidance",
                "PSEditStepWindow", "PSEditEditMask", "PSEditInvertedNoise", "PSEditFluxGuider",
                "PSEditAttentionControl", "PSEditFeatureInjection", "PSEditFlowEditGuider", "PSEditFlowEditFluxGuider"}
SCHEMA_KEYS = ("input", "input_order", "output", "output_is_list", "output_name")


def named_files() -> set[tuple[str, str]]:
    """``(folder, file name)`` of every model file and photo the workflows name (machine-specific combos): the files a
    user has once the missing-models dialog has downloaded them."""
    found = set()
    for name in WORKFLOWS:
        for node in tiny.workflow(name)["nodes"]:
            found |= {(m["directory"], m["name"]) for m in (node.get("properties") or {}).get("models", [])}
            if node["type"] == "LoadImage":
                found.add(("input", node["widgets_values"][0]))
    return found


@pytest.fixture(scope="module")
def server():
    s = Server().prepare()  # loopback, free port, own base directory; log in <base>/server.log
    # The files the workflows name, so ComfyUI's own prompt validation accepts their combos: stub model files
    # (loading one fails, after validation) and a real little image.
    for folder, file in named_files():
        if folder == "input":
            Image.new("RGB", (64, 64), (120, 90, 60)).save(s.base / "input" / file)
        else:
            (s.base / "models" / folder).mkdir(parents=True, exist_ok=True)
            (s.base / "models" / folder / file).write_bytes(b"")
    s.start()
    yield s
    s.stop(remove=True)


@pytest.fixture(scope="module")
def live(server):
    return server.get("/object_info")


def tracebacks(log: str) -> list[str]:
    """Each traceback in ``log``: its header, indented frames, and the exception line(s) that end it."""
    blocks, current = [], None
    for line in log.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            current = [line]
            blocks.append(current)
        elif current is not None and (line.startswith(" ") or len(current) == 1):
            current.append(line)
        elif current is not None:
            current.append(line)  # the exception line
            current = None
    return ["\n".join(b) for b in blocks]


def pack_problems(log: str) -> list[str]:
    """Log lines or tracebacks that say PSEdit failed to load (other packs' failures are not ours)."""
    problems = [tb for tb in tracebacks(log) if "psedit" in tb.lower()]
    for line in log.splitlines():
        if "psedit" in line.lower() and any(s in line for s in ("Cannot import", "IMPORT FAILED", "Error while calling",
                                                                "Skip ", "did not return")):
            problems.append(line)
    return problems


def test_pack_imports_without_errors(server, live):
    log = server.log()
    assert pack_problems(log) == [], log[-4000:]
    assert re.search(rf"seconds: .*custom_nodes/{PACK_FOLDER}\s*$", log, re.M), log[-3000:]
    assert "Unable to parse pyproject.toml" not in log  # our pyproject.toml is the only one this server reads


def test_log_check_recognises_failures():
    assert pack_problems("   0.1 seconds (IMPORT FAILED): /tmp/x/custom_nodes/psedit\n")
    assert pack_problems("Traceback (most recent call last):\n  File \"/tmp/custom_nodes/psedit/nodes/a.py\"\n"
                         "NameError: x\nCannot import /tmp/custom_nodes/psedit module for custom nodes: x\n")
    assert not pack_problems("Traceback (most recent call last):\n  File \"/c/nodes_audio.py\"\n"
                             "ModuleNotFoundError: torchaudio\n\nImport times for custom nodes:\n"
                             "   0.0 seconds: /tmp/x/custom_nodes/psedit\n")


def test_all_psedit_nodes_served(live):
    served = {k for k in live if k.startswith("PSEdit")}
    assert served >= PSEDIT_NODES
    assert served == {k for k in SNAPSHOT if k.startswith("PSEdit")}, \
        "run tools/snapshot_object_info.py and tools/make_workflows.py"


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_schema_matches_snapshot(live, name):
    assert name in live, f"{name} is not served by this ComfyUI"
    info = strip_file_lists(name, live[name])
    fix = "run tools/snapshot_object_info.py, then tools/make_workflows.py"
    if not KNOWN_HOST:
        if not name.startswith("PSEdit"):
            pytest.skip(f"no schema snapshot of ComfyUI {HOST_VERSION} (tests/data/object_info/): stock node schemas "
                        "are checked through the API twins below")
        fix = f"PSEdit's schema differs on ComfyUI {HOST_VERSION}: snapshot it ({fix})"
    for key in SCHEMA_KEYS:
        assert info.get(key) == SNAPSHOT[name].get(key), f"{name} {key} changed: {fix}"
    if KNOWN_HOST:
        assert info == SNAPSHOT[name], f"{name} changed (description, tooltips, ...): {fix}"
    else:
        for key in ("description", "display_name", "category", "output_tooltips"):
            assert info.get(key) == SNAPSHOT[name].get(key), f"{name} {key} changed: {fix}"


def test_host_version_has_a_snapshot():
    """The ComfyUI trees CI runs on (0.33.0; 0.3.64 in the slow tier) each have one; on another version this says
    what was left unchecked instead of passing silently."""
    if not KNOWN_HOST:
        pytest.skip(f"ComfyUI {HOST_VERSION} has no schema snapshot; stock schemas unchecked")
    assert snapshots.path_for(HOST_VERSION).is_file()


@pytest.mark.parametrize("name", sorted(PSEDIT_NODES))
def test_psedit_nodes_are_documented(live, name):
    info = live[name]
    assert info["category"] == "PSEdit"
    assert info["display_name"].startswith("PSEdit ")
    assert len(info.get("description") or "") > 40, f"{name} has no real description"
    for group in ("required", "optional"):
        for inp, spec in info["input"].get(group, {}).items():
            assert len(spec) > 1 and (spec[1].get("tooltip") or "").strip(), f"{name}.{inp} has no tooltip"
    assert all((t or "").strip() for t in info.get("output_tooltips", [])), f"{name} has an output without tooltip"
    assert len(info.get("output_tooltips", [])) == len(info["output"])


def test_workflow_templates_listed_and_served(server):
    """Listed under the pack by file name (the title the template browser shows); the JSON and the thumbnail are
    served at the URLs the frontend builds from that name (quoted: the titles hold spaces and parentheses)."""
    templates = server.get("/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == sorted(path_of(name).stem for name in WORKFLOWS)
    assert len(WORKFLOWS) >= 3
    for name in WORKFLOWS:
        url = f"{server.url}/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(path_of(name).stem)}"
        with urllib.request.urlopen(f"{url}.json", timeout=30) as r:
            assert r.status == 200
            served = json.loads(r.read())
        assert served == tiny.workflow(name)
        with urllib.request.urlopen(f"{url}.jpg", timeout=30) as r:
            assert r.status == 200 and r.headers.get("Content-Type") == "image/jpeg"
            assert Image.open(io.BytesIO(r.read())).size == (512, 512)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_twin_passes_comfyui_validation(server, live, name):
    """ComfyUI's own validate_prompt (types, ranges, options, required inputs, output nodes) accepts each workflow's
    API-format twin, converted with the live schemas as the frontend converts it (new widgets get their defaults).
    Accepted prompts are queued; the queue is cleared and the stub checkpoint fails to load."""
    workflow = tiny.workflow(name)
    prompt = ui_to_api(workflow, live)
    request = urllib.request.Request(f"{server.url}/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        pytest.fail(f"ComfyUI rejected {name}: {exc.read().decode()[:3000]}")
    finally:  # drop what was queued (its body is empty, not JSON)
        clear = urllib.request.Request(f"{server.url}/queue", data=b'{"clear": true}',
                                       headers={"Content-Type": "application/json"})
        urllib.request.urlopen(clear, timeout=30).close()
    assert answer.get("node_errors") == {} and answer.get("prompt_id"), answer
