"""Every example workflow is valid against the node schemas (tests/data/object_info.json, checked against a live
ComfyUI by tests/host/test_server.py) and converts to an API-format prompt. No ComfyUI needed."""

import copy
import json
from pathlib import Path

import pytest
from validate import inputs_in_order, is_widget, ui_to_api, validate

REPO = Path(__file__).resolve().parents[2]
OBJECT_INFO = json.loads((REPO / "tests" / "data" / "object_info.json").read_text())
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
EXPECTED = {"psedit_edit_sd15", "psedit_ablation_sd15", "psedit_edit_sdxl", "psedit_masked_edit_sd15"}


def load(path):
    return json.loads(path.read_text())


def test_expected_workflows_present():
    assert {p.stem for p in WORKFLOWS} == EXPECTED


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_valid(path):
    assert validate(load(path), OBJECT_INFO) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_converts_to_api_prompt(path):
    prompt = ui_to_api(load(path), OBJECT_INFO)
    assert prompt
    for node_id, node in prompt.items():
        info = OBJECT_INFO[node["class_type"]]
        for name, spec, required in inputs_in_order(info):
            if required:
                assert name in node["inputs"], (node_id, node["class_type"], name)
            if name in node["inputs"] and not is_widget(spec):
                src, slot = node["inputs"][name]
                assert OBJECT_INFO[prompt[src]["class_type"]]["output"][slot] == spec[0]


def test_edit_workflow_uses_the_whole_method():
    types = [n["type"] for n in load(REPO / "example_workflows" / "psedit_edit_sd15.json")["nodes"]]
    for t in ("PSEditDDIMInvert", "PSEditNullTextInversion", "PSEditTripleGuider", "PSEditPerceptualGuidance",
              "PSEditStepWindow", "SamplerCustomAdvanced", "DisableNoise"):
        assert t in types
    ablation = [n["type"] for n in load(REPO / "example_workflows" / "psedit_ablation_sd15.json")["nodes"]]
    assert ablation.count("SamplerCustomAdvanced") == 3 and ablation.count("PSEditTripleGuider") == 3
    masked = [n["type"] for n in load(REPO / "example_workflows" / "psedit_masked_edit_sd15.json")["nodes"]]
    assert "PSEditEditMask" in masked and "PreviewImage" in masked


@pytest.fixture
def good():
    return load(REPO / "example_workflows" / "psedit_edit_sd15.json")


def node_of(wf, type_):
    return next(n for n in wf["nodes"] if n["type"] == type_)


@pytest.mark.parametrize("breakage,message", [
    (lambda wf: node_of(wf, "PSEditTripleGuider")["widgets_values"].pop(), "widget values for"),
    (lambda wf: node_of(wf, "PSEditTripleGuider")["widgets_values"].__setitem__(0, 99.0), "outside"),
    (lambda wf: node_of(wf, "PSEditPerceptualGuidance")["widgets_values"].__setitem__(1, "resnet"), "not one of"),
    (lambda wf: node_of(wf, "PSEditDDIMInvert").__setitem__("type", "PSEditDDIMInvertX"), "unknown node type"),
    (lambda wf: wf["links"][0].__setitem__(5, "IMAGE"), "says IMAGE"),
    (lambda wf: node_of(wf, "SamplerCustomAdvanced")["inputs"][1].__setitem__("link", None), "not connected"),
    (lambda wf: wf.__setitem__("nodes", [n for n in wf["nodes"] if n["type"] != "SaveImage"]), "no output node"),
    (lambda wf: wf.__setitem__("nodes", [n for n in wf["nodes"] if n["type"] != "Note"]), "no Note"),
    (lambda wf: node_of(wf, "PSEditStepWindow")["widgets_values"].__setitem__(0, "0"), "is not a FLOAT"),
])
def test_validator_catches_broken_workflows(good, breakage, message):
    broken = copy.deepcopy(good)
    breakage(broken)
    errors = validate(broken, OBJECT_INFO)
    assert any(message in e for e in errors), errors
