"""Every example workflow is valid against the node schemas of every supported ComfyUI version
(tests/data/object_info/<version>.json, each checked against a live ComfyUI of that version by
tests/host/test_server.py), is what tools/make_workflows.py generates, and converts to an API-format prompt for each
version; its file name is the readable title the template browser shows. No ComfyUI needed.

Workflows are named by their ids (tools/make_workflows.py's WORKFLOWS keys, e.g. psedit_edit_sd15); ``path_of`` there
gives the file, ``example_workflows/<title>.json``."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import snapshots
from ui_to_api import CONTROL, FRONTEND_ONLY, inputs_in_order, is_widget, ui_to_api, widget_slots, widget_values
from validate import overlaps, validate

REPO = Path(__file__).resolve().parents[2]
VERSIONS = snapshots.versions()
OBJECT_INFO = snapshots.load(snapshots.oldest())  # what tools/make_workflows.py generates for
_spec = importlib.util.spec_from_file_location("make_workflows", REPO / "tools" / "make_workflows.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)
FILES = sorted((REPO / "example_workflows").glob("*.json"))
EXPECTED = {"psedit_edit_sd15", "psedit_ablation_sd15", "psedit_edit_sdxl", "psedit_masked_edit_sd15",
            "psedit_edit_sd35", "psedit_edit_flux", "psedit_p2p_sd15", "psedit_pnp_sd15", "psedit_flowedit_sd35",
            "psedit_flowedit_flux"}
WORKFLOWS = sorted(EXPECTED)
PSEDIT_NODES = {"PSEditDDIMInvert", "PSEditNullTextInversion", "PSEditTripleGuider", "PSEditPerceptualGuidance",
                "PSEditStepWindow", "PSEditEditMask", "PSEditInvertedNoise", "PSEditFluxGuider",
                "PSEditAttentionControl", "PSEditFeatureInjection", "PSEditFlowEditGuider", "PSEditFlowEditFluxGuider"}
# Per workflow: the TAESD decoder it declares and the image side its photo is scaled to.
TAESD_OF = {"sd15": "taesd_decoder", "sdxl": "taesdxl_decoder", "sd35": "taesd3_decoder", "flux": "taef1_decoder"}
SIDE_OF = {"sd15": 512, "sdxl": 1024, "sd35": 1024, "flux": 1024}


def family_of(name: str) -> str:
    """The model family of a workflow id: psedit_edit_sdxl -> sdxl."""
    return name.rsplit("_", 1)[1]


def load(name: str) -> dict:
    return json.loads(gen.path_of(name).read_text())


def nodes_of(wf, type_):
    return [n for n in wf["nodes"] if n["type"] == type_]


def node_of(wf, type_):
    return nodes_of(wf, type_)[0]


def widgets(node) -> dict:
    """A node's widget values by input name (UI-only values dropped)."""
    slots = widget_slots(OBJECT_INFO[node["type"]])
    return {name: v for (name, _), v in zip(slots, node["widgets_values"], strict=True) if not name.startswith("<")}


def source_of(wf, node, input_name):
    """The node feeding ``node``'s input ``input_name``."""
    link_id = next(i["link"] for i in node["inputs"] if i["name"] == input_name)
    link = next(link for link in wf["links"] if link[0] == link_id)
    return next(n for n in wf["nodes"] if n["id"] == link[1])


def test_expected_workflows_present():
    assert set(gen.WORKFLOWS) == set(gen.TITLES) == EXPECTED
    assert set(FILES) == {gen.path_of(name) for name in EXPECTED}, "run tools/make_workflows.py"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_workflow_file_names_are_readable_titles(path):
    """The template browser shows a pack's template by its file name (title; and description, - and _ as spaces)
    and its thumbnail from <name>.jpg beside it."""
    assert path.stem.startswith("PSEdit - ") and "_" not in path.stem, path.name
    assert not set(path.stem) & set("/\\'\""), path.name
    assert path.with_suffix(".jpg").is_file(), f"no thumbnail {path.stem}.jpg: run tools/screenshot_workflows.py"


def test_snapshot_has_every_psedit_node():
    assert PSEDIT_NODES <= {k for k in OBJECT_INFO if k.startswith("PSEdit")}


def test_a_snapshot_per_supported_version():
    """0.3.64 is the oldest ComfyUI supported, 0.33.0 today's (README, pyproject's requires-comfyui)."""
    assert {"0.3.64", "0.33.0"} <= set(VERSIONS)
    assert snapshots.oldest() == "0.3.64"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_valid(name, version):
    """Exact for the oldest version (the generator's); a newer one may have added widgets at the end of a node,
    which the frontend fills with their defaults."""
    assert validate(load(name), snapshots.load(version), fill_new=version != snapshots.oldest()) == []


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", WORKFLOWS)
def test_only_new_widgets_are_filled(name, version):
    """Every widget a newer version fills with its default is one the oldest version does not have: the workflows
    carry a value for everything they can set."""
    info, old = snapshots.load(version), snapshots.load(snapshots.oldest())
    for node in load(name)["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        for slot, _spec, _value, filled in widget_values(node, info[node["type"]]):
            if filled:
                assert slot not in {n for n, _ in widget_slots(old[node["type"]])}, (name, node["type"], slot)


def test_newer_widgets_are_filled_with_their_defaults():
    """ComfyUI 0.33 added ImageScaleToTotalPixels.resolution_steps (default 1); the workflows' API twins for 0.33
    carry it with its default, as the frontend sends it."""
    info = snapshots.load("0.33.0")["ImageScaleToTotalPixels"]
    prompt = ui_to_api(load("psedit_edit_sd15"), snapshots.load("0.33.0"))
    scale = next(n for n in prompt.values() if n["class_type"] == "ImageScaleToTotalPixels")
    assert scale["inputs"]["resolution_steps"] == info["input"]["required"]["resolution_steps"][1]["default"] == 1
    old = ui_to_api(load("psedit_edit_sd15"), snapshots.load("0.3.64"))
    assert "resolution_steps" not in next(n for n in old.values() if n["class_type"] == "ImageScaleToTotalPixels")[
        "inputs"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_layout_has_no_overlaps(name):
    assert overlaps(load(name)) == []


def test_workflows_are_what_the_generator_writes():
    for name, build in gen.WORKFLOWS.items():
        assert build() == load(name), f"{gen.path_of(name).name} differs from tools/make_workflows.py: run it"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_converts_to_api_prompt(name, version):
    wf = load(name)
    object_info = snapshots.load(version)
    prompt = ui_to_api(wf, object_info)
    assert set(prompt) == {str(n["id"]) for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY}
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        for name, spec, required in inputs_in_order(info):
            if required:
                assert name in node["inputs"], (node_id, node["class_type"], name)
            if name in node["inputs"] and not is_widget(spec):
                src, slot = node["inputs"][name]
                assert object_info[prompt[src]["class_type"]]["output"][slot] == spec[0]
        assert set(node["inputs"]) <= {n for n, _, _ in inputs_in_order(info)}


def test_edit_workflow_settings():
    wf = load("psedit_edit_sd15")
    assert widgets(node_of(wf, "BasicScheduler")) == {"scheduler": "ddim_uniform", "steps": 50, "denoise": 1.0}
    assert widgets(node_of(wf, "PSEditDDIMInvert")) == {"cfg": 1.0, "refine": 2, "convention": "start"}
    assert widgets(node_of(wf, "PSEditNullTextInversion")) == {
        "guidance": 7.5, "method": "null-text", "inner_iterations": 10, "early_stop": 1e-5, "learning_rate": 0.01,
        "early_stop_rule": "mokady", "optimise": "all", "lr_schedule": "reference"}
    texts = sorted(widgets(n)["text"] for n in nodes_of(wf, "CLIPTextEncode"))
    assert texts == ["", "a cat sitting on a sofa", "a tiger sitting on a sofa"]
    guider = node_of(wf, "PSEditTripleGuider")
    assert widgets(guider) == {"gamma": 7.5, "beta": 1.0}  # the paper's 3, tuned with the full gradient (README)
    assert widgets(source_of(wf, guider, "window")) == {"start": 0.0, "end": 0.4}
    assert source_of(wf, guider, "null_schedule")["type"] == "PSEditNullTextInversion"
    perceptual = node_of(wf, "PSEditPerceptualGuidance")
    assert source_of(wf, perceptual, "guider") is guider
    assert widgets(source_of(wf, perceptual, "window")) == {"start": 0.2, "end": 0.8}
    w = widgets(perceptual)
    # full: through the model too, the paper's gradient (+3.2 dB of background over x0 on the toy world's table)
    assert (w["lpips_net"], w["gradient"], w["decoder"], w["step"]) == (
        "vgg", "full", "taesd_decoder.safetensors", "normalized")
    assert w["strength"] == 3.0  # with the full gradient: +1.3 dB [0.5, 2.2] of background over 1 (toy world)
    run = node_of(wf, "SamplerCustomAdvanced")
    assert source_of(wf, run, "noise")["type"] == "DisableNoise"
    assert widgets(source_of(wf, run, "sampler")) == {"sampler_name": "euler"}
    assert source_of(wf, run, "latent_image")["type"] == "PSEditDDIMInvert"
    assert source_of(wf, run, "sigmas") is source_of(wf, node_of(wf, "PSEditDDIMInvert"), "sigmas")
    assert source_of(wf, run, "guider") is perceptual


@pytest.mark.parametrize("name", WORKFLOWS)
def test_perceptual_strength_is_the_clis(name):
    """Every Perceptual Guidance's strength is the one `psedit edit/eval` uses with its gradient by default."""
    from psedit_cli.pipeline import STRENGTH

    for node in nodes_of(load(name), "PSEditPerceptualGuidance"):
        w = widgets(node)
        assert w["strength"] == STRENGTH[w["gradient"]], (name, w["gradient"], w["strength"])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_triple_beta_is_the_clis(name):
    """A Triple Guider under full-gradient Perceptual Guidance has the beta `psedit edit/eval` uses with it (1); the
    SDXL edit (x0) keeps the paper's 3. (SD3.5 / Flux scale beta to their CFG; Prompt-to-Prompt's is gamma.)"""
    from psedit_cli.pipeline import BETA

    wf = load(name)
    for node in nodes_of(wf, "PSEditPerceptualGuidance"):
        inner, gradient = source_of(wf, node, "guider"), widgets(node)["gradient"]
        if inner["type"] == "PSEditTripleGuider" and (gradient == "full" or name == "psedit_edit_sdxl"):
            assert widgets(inner)["beta"] == BETA[gradient], (name, widgets(inner)["beta"])


def test_ablation_is_figure_3():
    wf = load("psedit_ablation_sd15")
    assert len(nodes_of(wf, "PSEditDDIMInvert")) == 1 and len(nodes_of(wf, "PSEditNullTextInversion")) == 1
    saves = {widgets(n)["filename_prefix"]: n for n in nodes_of(wf, "SaveImage")}
    assert {"psedit_nulltext", "psedit_textopt", "psedit_perceptual"} <= set(saves)

    def guider_of(prefix):
        decode = source_of(wf, saves[prefix], "images")
        return source_of(wf, source_of(wf, decode, "samples"), "guider")

    nulltext, textopt, perceptual = (guider_of(p) for p in ("psedit_nulltext", "psedit_textopt", "psedit_perceptual"))
    assert nulltext["type"] == textopt["type"] == "PSEditTripleGuider"
    w = widgets(nulltext)
    assert w["beta"] == w["gamma"] == 7.5
    assert next(i for i in nulltext["inputs"] if i["name"] == "window")["link"] is None
    assert source_of(wf, nulltext, "null_schedule")["type"] == "PSEditNullTextInversion"
    # The paper's baseline: null-text inversion + Prompt-to-Prompt; the other two edit the plain MODEL.
    control = source_of(wf, nulltext, "model")
    assert control["type"] == "PSEditAttentionControl" and control is node_of(wf, "PSEditAttentionControl")
    assert_p2p_defaults(wf, control)
    assert source_of(wf, textopt, "model")["type"] == "CheckpointLoaderSimple"
    assert widgets(textopt) == {"gamma": 7.5, "beta": 1.0}  # the SD1.5 pipeline's (the paper's 3, README)
    assert widgets(source_of(wf, textopt, "window")) == {"start": 0.0, "end": 0.4}
    assert perceptual["type"] == "PSEditPerceptualGuidance" and source_of(wf, perceptual, "guider") is textopt
    assert widgets(source_of(wf, perceptual, "window")) == {"start": 0.2, "end": 0.8}
    # The three results side by side, left to right in the paper's order.
    xs = [saves[p]["pos"] for p in ("psedit_nulltext", "psedit_textopt", "psedit_perceptual")]
    assert xs[0][1] == xs[1][1] == xs[2][1] and xs[0][0] < xs[1][0] < xs[2][0]
    if "ImageBatch" in OBJECT_INFO:
        grid = source_of(wf, saves["psedit_ablation"], "images")
        chain = []
        while grid["type"] == "ImageBatch":
            chain.append(source_of(wf, grid, "image2"))
            grid = source_of(wf, grid, "image1")
        assert grid["type"] == "ImageScaleToTotalPixels" and len(chain) == 3
        assert source_of(wf, grid, "image")["type"] == "LoadImage"


def test_sdxl_workflow_says_what_it_needs():
    wf = load("psedit_edit_sdxl")
    notes = " ".join(n["widgets_values"][0] for n in nodes_of(wf, "Note"))
    assert "SDXL checkpoint" in notes and "1024" in notes and "taesdxl_decoder" in notes and "vae_approx" in notes
    assert {n["type"] for n in wf["nodes"]} == {n["type"] for n in load("psedit_edit_sd15")["nodes"]}
    # x0 on SDXL: 9.2 GiB at 1024 px already (README, GPU memory); the SD1.5 workflows run the full gradient
    assert widgets(node_of(wf, "PSEditPerceptualGuidance"))["gradient"] == "x0"
    assert [widgets(node_of(load(n), "PSEditPerceptualGuidance"))["gradient"]
            for n in ("psedit_masked_edit_sd15", "psedit_ablation_sd15")] == ["full", "full"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_notes_name_what_to_set(name):
    """The notes name what to set, and each knob the graph has: beta (Triple/Flux Guider), strength (Perceptual
    Guidance), cfg (CFGGuider), the control nodes' windows."""
    wf = load(name)
    notes = " ".join(n["widgets_values"][0] for n in nodes_of(wf, "Note")).lower()
    types = {n["type"] for n in wf["nodes"]}
    words = ["checkpoint", "photo", "source caption", "edit caption"]
    words += ["window"] * bool(types & {"PSEditStepWindow", "PSEditAttentionControl", "PSEditFeatureInjection"})
    words += ["beta"] * bool(types & {"PSEditTripleGuider", "PSEditFluxGuider"})
    words += ["n_max", "edit_guidance", "mask"] * bool(types & {"PSEditFlowEditGuider", "PSEditFlowEditFluxGuider"})
    words += ["strength"] * ("PSEditPerceptualGuidance" in types) + ["cfg"] * ("CFGGuider" in types)
    words += ["cross", "self"] * ("PSEditAttentionControl" in types)
    words += ["blend_words"] * any(c["outputs"][1]["links"] for c in nodes_of(wf, "PSEditAttentionControl"))
    words += ["feature", "attn"] * ("PSEditFeatureInjection" in types)
    for word in words:
        assert word in notes, word


ALLOWED_DOWNLOADS = ("https://huggingface.co/", "https://civitai.com/")  # the frontend's missing-models dialog


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_declares_its_model_files(name):
    """The frontend offers a download for a node's ``properties.models`` entry whose name is one of its widget
    values (both frontends; ComfyUI 0.33's lists nothing else), and 0.3.64's for every workflow-level ``models``
    entry; it accepts huggingface.co / civitai.com .safetensors. tests/host/test_frontend.py checks both
    frontends."""
    wf = load(name)
    loader = node_of(wf, "CheckpointLoaderSimple")
    declared = loader["properties"]["models"]
    assert [m["name"] for m in declared] == [widgets(loader)["ckpt_name"]]
    assert declared[0]["directory"] == "checkpoints"
    # The TAESD decoder exactly when a Perceptual Guidance decodes with it: named in its decoder widget (the family's
    # own file) and declared on that node, and at workflow level for the older frontend.
    taesd = f"{TAESD_OF[family_of(name)]}.safetensors"
    guidance = nodes_of(wf, "PSEditPerceptualGuidance")
    for node in guidance:
        assert widgets(node)["decoder"] == taesd
        assert [(m["name"], m["directory"]) for m in node["properties"]["models"]] == [(taesd, "vae_approx")]
        declared = declared + node["properties"]["models"]
    assert [(m["name"], m["directory"]) for m in wf.get("models", [])] == [(taesd, "vae_approx")] * bool(guidance)
    for m in declared + wf.get("models", []):
        assert m["url"].startswith(ALLOWED_DOWNLOADS) and m["name"].endswith(".safetensors"), m
        assert m["url"].split("?")[0].endswith("/" + m["name"]), m


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_photo_is_scaled_to_the_model_before_anything_uses_it(name):
    """A 4000x3000 phone photo must not reach the model at that size: everything that reads the photo reads it
    through ImageScaleToTotalPixels at the family's working area (SD1.5 512x512, SDXL 1024x1024)."""
    wf = load(name)
    scale = source_of(wf, node_of(wf, "VAEEncode"), "pixels")
    assert scale["type"] == "ImageScaleToTotalPixels" and source_of(wf, scale, "image")["type"] == "LoadImage"
    side = SIDE_OF[family_of(name)]
    assert widgets(scale)["megapixels"] * 1024 * 1024 == side * side  # the node's megapixel is 1024 x 1024
    for n in nodes_of(wf, "PSEditPerceptualGuidance"):
        assert source_of(wf, n, "image") is scale
    load_image = node_of(wf, "LoadImage")
    readers = [link[3] for link in wf["links"] if link[1] == load_image["id"] and link[2] == 0]
    assert readers == [scale["id"]]


def test_masked_workflow_scales_a_painted_mask_as_the_photo():
    wf = load("psedit_masked_edit_sd15")
    to_mask = node_of(wf, "ImageToMask")
    scale = source_of(wf, to_mask, "image")
    photo_scale = source_of(wf, node_of(wf, "VAEEncode"), "pixels")
    assert scale["type"] == "ImageScaleToTotalPixels" and scale is not photo_scale
    assert widgets(scale)["megapixels"] == widgets(photo_scale)["megapixels"]
    assert source_of(wf, source_of(wf, scale, "image"), "mask")["type"] == "LoadImage"


def test_masked_workflow_uses_the_mask():
    wf = load("psedit_masked_edit_sd15")
    mask = node_of(wf, "PSEditEditMask")
    assert source_of(wf, node_of(wf, "PSEditPerceptualGuidance"), "mask") is mask
    assert "PreviewImage" in {n["type"] for n in wf["nodes"]}


# --- attention and feature control (Prompt-to-Prompt, Plug-and-Play) ------------------------------------------------

CONTROL_WORKFLOWS = ["psedit_p2p_sd15", "psedit_pnp_sd15", "psedit_ablation_sd15"]


def assert_p2p_defaults(wf, control):
    """Prompt-to-Prompt's defaults on the checkpoint's MODEL, CLIP and the one DDIM inversion; no local blend."""
    w = widgets(control)
    assert (w["mode"], w["cross_start"], w["cross_end"], w["self_start"], w["self_end"]) == ("replace", 0.0, 0.8,
                                                                                           0.0, 0.4)
    assert w["blend_words"] == "" and w["reweight_words"] == ""
    assert source_of(wf, control, "model")["type"] == source_of(wf, control, "clip")["type"] == \
        "CheckpointLoaderSimple"
    assert source_of(wf, control, "inversion") is node_of(wf, "PSEditDDIMInvert")


@pytest.mark.parametrize("name", ["psedit_p2p_sd15", "psedit_ablation_sd15"])
def test_captions_are_typed_once(name):
    """Attention Control finds the edit branch by its text: each caption is one String node feeding its
    CLIPTextEncode and the control node, so they cannot differ."""
    wf = load(name)
    strings = {widgets(n)["value"]: n for n in nodes_of(wf, "PrimitiveStringMultiline")}
    assert set(strings) == {SOURCE_TEXT, EDIT_TEXT}
    fed = {widgets(source_of(wf, n, "text"))["value"]: n for n in nodes_of(wf, "CLIPTextEncode")
           if any(i["name"] == "text" and i["link"] for i in n["inputs"])}
    assert set(fed) == {SOURCE_TEXT, EDIT_TEXT}
    for text, encoder in fed.items():
        assert widgets(encoder)["text"] == text  # the widget's value matches what the link sends
    assert source_of(wf, node_of(wf, "PSEditDDIMInvert"), "source") is fed[SOURCE_TEXT]
    for control in nodes_of(wf, "PSEditAttentionControl"):
        assert source_of(wf, control, "source_caption") is strings[SOURCE_TEXT]
        assert widgets(control)["source_caption"] == SOURCE_TEXT
        assert source_of(wf, control, "edit_caption") is strings[EDIT_TEXT]
        assert widgets(control)["edit_caption"] == EDIT_TEXT
    # A link on a widget is a socket the frontend knows as that widget's.
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        specs = {n: spec for n, spec, _ in inputs_in_order(OBJECT_INFO[node["type"]])}
        for inp in node["inputs"]:
            if inp["link"] is not None and is_widget(specs[inp["name"]]):
                assert inp.get("widget") == {"name": inp["name"]}, (node["type"], inp)


def test_p2p_workflow_settings():
    """Null-text inversion + Attention Control + Triple Guider at beta = gamma (plain CFG on the edit, as
    Prompt-to-Prompt), wrapped by Perceptual Guidance that pulls outside the blend region, sampled as the edit."""
    wf = load("psedit_p2p_sd15")
    control = node_of(wf, "PSEditAttentionControl")
    assert_p2p_defaults(wf, control)
    guider = node_of(wf, "PSEditTripleGuider")
    assert source_of(wf, guider, "model") is control
    assert widgets(guider) == {"gamma": 7.5, "beta": 7.5}
    assert next(i for i in guider["inputs"] if i["name"] == "window")["link"] is None
    nti = source_of(wf, guider, "null_schedule")
    assert nti["type"] == "PSEditNullTextInversion" and widgets(nti)["guidance"] == 7.5
    assert widgets(nti)["method"] == "null-text"
    perceptual = node_of(wf, "PSEditPerceptualGuidance")
    assert source_of(wf, perceptual, "guider") is guider and source_of(wf, perceptual, "mask") is control
    mask_link = next(i for i in perceptual["inputs"] if i["name"] == "mask")["link"]
    link = next(lk for lk in wf["links"] if lk[0] == mask_link)
    assert (link[2], link[5]) == (1, "MASK")  # blend_mask
    assert widgets(source_of(wf, perceptual, "window")) == {"start": 0.2, "end": 0.8}
    assert_sampled_as_the_edit(wf, perceptual)
    assert any(t.get("title", "").endswith("strength 0 = off)") for t in nodes_of(wf, "PSEditPerceptualGuidance"))


def test_pnp_workflow_settings():
    """As Plug-and-Play's code: DDIM inversion with the empty prompt, Feature Injection with the empty prompt's source
    pass, the paper's windows and layers, residual injection, then the stock CFGGuider on the edit caption against
    the empty null; no null-text inversion, no perceptual guidance, no source caption anywhere."""
    wf = load("psedit_pnp_sd15")
    types = {n["type"] for n in wf["nodes"]}
    assert not types & {"PSEditNullTextInversion", "PSEditPerceptualGuidance", "PSEditTripleGuider",
                        "PrimitiveStringMultiline"}
    assert sorted(widgets(n)["text"] for n in nodes_of(wf, "CLIPTextEncode")) == ["", EDIT_TEXT]
    assert widgets(source_of(wf, node_of(wf, "PSEditDDIMInvert"), "source"))["text"] == ""
    inject = node_of(wf, "PSEditFeatureInjection")
    assert widgets(inject) == {"source_caption": "", "feature_start": 0.0, "feature_end": 0.8, "attn_start": 0.0,
                               "attn_end": 0.5, "feature_block": -1, "attn_from_block": -1, "inject": "residual"}
    assert source_of(wf, inject, "inversion") is node_of(wf, "PSEditDDIMInvert")
    assert source_of(wf, inject, "model")["type"] == source_of(wf, inject, "clip")["type"] == "CheckpointLoaderSimple"
    guider = node_of(wf, "CFGGuider")
    assert source_of(wf, guider, "model") is inject and widgets(guider) == {"cfg": 7.5}
    assert widgets(source_of(wf, guider, "positive"))["text"] == EDIT_TEXT
    assert widgets(source_of(wf, guider, "negative"))["text"] == ""
    assert_sampled_as_the_edit(wf, guider)


def assert_sampled_as_the_edit(wf, guider):
    run = node_of(wf, "SamplerCustomAdvanced")
    assert source_of(wf, run, "guider") is guider
    assert source_of(wf, run, "noise")["type"] == "DisableNoise"
    assert widgets(source_of(wf, run, "sampler")) == {"sampler_name": "euler"}
    invert = node_of(wf, "PSEditDDIMInvert")
    assert source_of(wf, run, "latent_image") is invert
    assert source_of(wf, run, "sigmas") is source_of(wf, invert, "sigmas")
    assert widgets(invert) == {"cfg": 1.0, "refine": 2, "convention": "start"}
    assert widgets(source_of(wf, invert, "sigmas")) == {"scheduler": "ddim_uniform", "steps": 50, "denoise": 1.0}


# --- flow-matching models (SD3.5, Flux) -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["psedit_edit_sd35", "psedit_edit_flux"])
def test_flow_workflows_hand_the_inversion_over_as_noise(name):
    """Flow models replace latent_image by the noise at sigma 1: the sampler's noise is PSEdit Inverted Noise of the
    same inversion, its latent the inverted LATENT, its SIGMAS the inversion's; euler; the full method's windows."""
    wf = load(name)
    invert, run = node_of(wf, "PSEditDDIMInvert"), node_of(wf, "SamplerCustomAdvanced")
    noise = source_of(wf, run, "noise")
    assert noise["type"] == "PSEditInvertedNoise" and source_of(wf, noise, "inversion") is invert
    assert source_of(wf, run, "latent_image") is invert
    assert source_of(wf, run, "sigmas") is source_of(wf, invert, "sigmas")
    assert widgets(source_of(wf, run, "sampler")) == {"sampler_name": "euler"}
    assert "DisableNoise" not in {n["type"] for n in wf["nodes"]}
    perceptual = source_of(wf, run, "guider")
    assert perceptual["type"] == "PSEditPerceptualGuidance"
    assert widgets(source_of(wf, perceptual, "window")) == {"start": 0.2, "end": 0.8}
    assert widgets(source_of(wf, source_of(wf, perceptual, "guider"), "window")) == {"start": 0.0, "end": 0.4}
    assert widgets(invert) == {"cfg": 1.0, "refine": 2, "convention": "start"}


def test_sd35_workflow_settings():
    wf = load("psedit_edit_sd35")
    assert widgets(node_of(wf, "BasicScheduler"))["scheduler"] == "sgm_uniform"
    guider = node_of(wf, "PSEditTripleGuider")
    nti = source_of(wf, guider, "null_schedule")
    assert nti["type"] == "PSEditNullTextInversion" and widgets(nti)["optimise"] == "all"
    assert widgets(guider)["gamma"] == widgets(nti)["guidance"] == 4.5
    assert widgets(guider)["beta"] == pytest.approx(4.5 * 3.0 / 7.5)  # the paper's beta / gamma
    notes = " ".join(n["widgets_values"][0] for n in nodes_of(wf, "Note"))
    assert "SD3.5" in notes and "taesd3_decoder" in notes and "Inverted Noise" in notes


def test_flux_workflow_settings():
    """Flux is guidance-distilled: no null caption, no null-text inversion; DDIM Invert's source goes through
    FluxGuidance at the Flux Guider's guidance, which the guider sets on both captions itself."""
    wf = load("psedit_edit_flux")
    types = {n["type"] for n in wf["nodes"]}
    assert "PSEditNullTextInversion" not in types and "PSEditTripleGuider" not in types
    assert sorted(widgets(n)["text"] for n in nodes_of(wf, "CLIPTextEncode")) == [SOURCE_TEXT, EDIT_TEXT]
    guider = node_of(wf, "PSEditFluxGuider")
    flux_guidance = source_of(wf, node_of(wf, "PSEditDDIMInvert"), "source")
    assert flux_guidance["type"] == "FluxGuidance"
    assert widgets(flux_guidance)["guidance"] == widgets(guider)["guidance"] == 3.5
    assert source_of(wf, flux_guidance, "conditioning") is source_of(wf, guider, "source")
    assert widgets(guider)["beta"] == pytest.approx(3.5 * 3.0 / 7.5)
    assert widgets(node_of(wf, "BasicScheduler"))["scheduler"] == "simple"
    notes = " ".join(n["widgets_values"][0] for n in nodes_of(wf, "Note"))
    assert "Flux" in notes and "taef1_decoder" in notes and "guidance-distilled" in notes


SOURCE_TEXT, EDIT_TEXT = "a cat sitting on a sofa", "a tiger sitting on a sofa"


# --- the validator and converter catch broken workflows ---------------------------------------------------------------

@pytest.fixture
def good():
    return load("psedit_edit_sd15")


def first_link_into(wf, type_):
    node = node_of(wf, type_)
    return next(link for link in wf["links"] if link[3] == node["id"])


@pytest.mark.parametrize("breakage,message", [
    (lambda wf: wf.__setitem__("version", 1), "expected 0.4"),
    (lambda wf: node_of(wf, "PSEditTripleGuider")["widgets_values"].pop(), "widget values for"),
    (lambda wf: node_of(wf, "PSEditTripleGuider")["widgets_values"].__setitem__(0, 99.0), "outside"),
    (lambda wf: node_of(wf, "BasicScheduler")["widgets_values"].__setitem__(1, 2.5), "is not a INT"),
    (lambda wf: node_of(wf, "PSEditPerceptualGuidance")["widgets_values"].__setitem__(1, "resnet"), "not one of"),
    (lambda wf: node_of(wf, "PSEditNullTextInversion")["widgets_values"].__setitem__(1, 3), "not a string"),
    (lambda wf: node_of(wf, "PSEditStepWindow")["widgets_values"].__setitem__(0, "0"), "is not a FLOAT"),
    (lambda wf: node_of(wf, "PSEditDDIMInvert").__setitem__("type", "PSEditDDIMInvertX"), "unknown node type"),
    (lambda wf: first_link_into(wf, "PSEditDDIMInvert").__setitem__(5, "CLIP"), "says CLIP"),
    (lambda wf: first_link_into(wf, "VAEDecode").__setitem__(2, 1), None),  # any message: several break
    (lambda wf: node_of(wf, "SamplerCustomAdvanced")["inputs"][1].__setitem__("link", None), "not connected"),
    (lambda wf: wf["links"].append(list(wf["links"][0])), "used twice"),
    (lambda wf: node_of(wf, "VAEEncode")["outputs"][0]["links"].append(999), "does not start there"),
    (lambda wf: wf.__setitem__("last_link_id", 1), "last_link_id"),
    (lambda wf: node_of(wf, "Note").pop("flags"), "field 'flags'"),
    (lambda wf: node_of(wf, "VAEDecode").__setitem__("pos", [0]), "field 'pos'"),
    (lambda wf: node_of(wf, "PSEditTripleGuider")["inputs"][0].__setitem__("type", "CLIP"), "schema says MODEL"),
    (lambda wf: wf.__setitem__("nodes", [n for n in wf["nodes"] if n["type"] != "SaveImage"]), "no output node"),
    (lambda wf: wf.__setitem__("nodes", [n for n in wf["nodes"] if n["type"] != "Note"]), "no Note"),
])
def test_validator_catches_broken_workflows(good, breakage, message):
    broken = copy.deepcopy(good)
    breakage(broken)
    errors = validate(broken, OBJECT_INFO)
    assert errors, "the validator accepted a broken workflow"
    if message is not None:
        assert any(message in e for e in errors), errors


def test_wrong_link_type_into_input(good):
    broken = copy.deepcopy(good)
    link = first_link_into(broken, "PSEditPerceptualGuidance")  # guider: GUIDER
    src = next(n for n in broken["nodes"] if n["type"] == "VAEEncode")
    # Re-route the guider input from VAEEncode's LATENT, recording the true type.
    old = next(n for n in broken["nodes"] if n["id"] == link[1])
    old["outputs"][link[2]]["links"].remove(link[0])
    src["outputs"][0]["links"].append(link[0])
    link[1:3], link[5] = [src["id"], 0], "LATENT"
    assert any("LATENT into PSEditPerceptualGuidance.guider" in e for e in validate(broken, OBJECT_INFO))


def test_overlap_detection(good):
    broken = copy.deepcopy(good)
    a, b = node_of(broken, "VAEEncode"), node_of(broken, "VAEDecode")
    b["pos"] = [a["pos"][0] + 10, a["pos"][1] + 10]
    assert any("VAEDecode" in o for o in overlaps(broken))


SEEDED = {  # a KSampler-like schema: the frontend puts a control value after a seed
    "Seeded": {"input": {"required": {"seed": ["INT", {"default": 0, "min": 0, "max": 2**64 - 1}],
                                      "steps": ["INT", {"default": 20, "min": 1, "max": 100,
                                                        "control_after_generate": True}],
                                      "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}]}},
               "input_order": {"required": ["seed", "steps", "cfg"]}, "output": [], "output_name": [],
               "output_node": True},
}


def seeded_workflow(values):
    return {"version": 0.4, "last_node_id": 2, "last_link_id": 0, "links": [], "nodes": [
        {"id": 1, "type": "Seeded", "pos": [0, 0], "size": [300, 200], "flags": {}, "order": 0, "mode": 0,
         "inputs": [], "outputs": [], "properties": {"Node name for S&R": "Seeded"}, "widgets_values": values},
        {"id": 2, "type": "Note", "pos": [400, 0], "size": [300, 200], "flags": {}, "order": 1, "mode": 0,
         "properties": {}, "widgets_values": ["set the seed"]}]}


def test_control_after_generate_slots():
    assert [n for n, _ in widget_slots(SEEDED["Seeded"])] == ["seed", CONTROL, "steps", CONTROL, "cfg"]
    ok = seeded_workflow([42, "randomize", 20, "fixed", 7.0])
    assert validate(ok, SEEDED) == []
    assert ui_to_api(ok, SEEDED) == {"1": {"class_type": "Seeded", "inputs": {"seed": 42, "steps": 20, "cfg": 7.0}}}
    assert any("widget values for" in e for e in validate(seeded_workflow([42, 20, 7.0]), SEEDED))
    assert any("control_after_generate" in e for e in validate(seeded_workflow([42, "sometimes", 20, "fixed", 7.0]),
                                                               SEEDED))


def test_ui_to_api_follows_reroutes_and_skips_muted(good):
    wf = copy.deepcopy(good)
    decode = node_of(wf, "VAEDecode")
    link = first_link_into(wf, "VAEDecode")  # samples <- SamplerCustomAdvanced
    reroute = {"id": 100, "type": "Reroute", "pos": [0, 900], "size": [75, 26], "mode": 0,
               "inputs": [{"name": "", "type": "*", "link": link[0]}],
               "outputs": [{"name": "", "type": link[5], "links": [101]}], "properties": {}}
    target = link[3:5]
    link[3:5] = [100, 0]
    wf["links"].append([101, 100, 0, *target, link[5]])
    next(i for i in decode["inputs"] if i["link"] == link[0])["link"] = 101
    wf["nodes"].append(reroute)
    prompt = ui_to_api(wf, OBJECT_INFO)
    assert "100" not in prompt
    assert prompt[str(decode["id"])]["inputs"]["samples"] == [str(link[1]), link[2]]
    node_of(wf, "SaveImage")["mode"] = 2
    assert str(node_of(wf, "SaveImage")["id"]) not in ui_to_api(wf, OBJECT_INFO)
