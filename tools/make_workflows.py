"""Generate example_workflows/*.json (ComfyUI UI format, version 0.4) from the node schemas.

    python tools/make_workflows.py

Reads tests/data/object_info.json (tools/snapshot_object_info.py refreshes it), so widget order and socket types
always follow the real schemas; tests/workflows/ validates the result. Edit the graphs here, not the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INFO = json.loads((REPO / "tests" / "data" / "object_info.json").read_text())
OUT = REPO / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_COLOR = {"color": "#432", "bgcolor": "#653"}


def is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    out = []
    for group in ("required", "optional"):
        for name in info.get("input_order", {}).get(group, []):
            out.append((name, info["input"][group][name], group == "optional"))
    return out


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_: str, pos, widgets: dict | None = None, size=(320, 120), title: str | None = None) -> dict:
        info = INFO[type_]
        widgets = dict(widgets or {})
        values, inputs = [], []
        for name, spec, optional in ordered_inputs(info):
            if is_widget(spec):
                if name in widgets:
                    values.append(widgets.pop(name))
                elif isinstance(spec[0], list) or spec[0] == "COMBO":
                    options = spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])
                    values.append(spec[1].get("default", options[0]) if len(spec) > 1 else options[0])
                else:
                    values.append(spec[1]["default"])
                if len(spec) > 1 and spec[1].get("image_upload"):
                    values.append("image")  # the upload button's UI-only value
            else:
                inputs.append({"name": name, "type": spec[0], "link": None, **({"shape": 7} if optional else {})})
        if widgets:
            raise KeyError(f"{type_} has no widget(s) {sorted(widgets)}")
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(info["output_name"], info["output"], strict=True))]
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": type_}, "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def note(self, text: str, pos, size=(360, 160)) -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                "widgets_values": [text], **NOTE_COLOR}
        self.nodes.append(node)
        return node

    def link(self, src: dict, output: str | int, dst: dict, input_name: str) -> None:
        slot = output if isinstance(output, int) else next(
            i for i, o in enumerate(src["outputs"]) if o["name"] == output)
        target = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == input_name)
        link_id = len(self.links) + 1
        type_ = src["outputs"][slot]["type"]
        self.links.append([link_id, src["id"], slot, dst["id"], target, type_])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][target]["link"] = link_id

    def to_json(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.7, "offset": [40, 40]}}, "version": 0.4}


def loaders(g: Graph, ckpt: str, photo: str, source: str, edit: str, steps: int, x0=0):
    """Checkpoint, photo, three captions, VAE encode, sigmas, inversion and null-text inversion."""
    ckpt_node = g.add("CheckpointLoaderSimple", (x0, 0), {"ckpt_name": ckpt}, size=(320, 100))
    image = g.add("LoadImage", (x0, 160), {"image": photo}, size=(320, 320))
    texts = {}
    for i, (name, text) in enumerate((("null", ""), ("source", source), ("edit", edit))):
        texts[name] = g.add("CLIPTextEncode", (x0 + 380, 160 + i * 170), {"text": text}, size=(340, 130),
                            title=f"{name} caption" + (" (leave empty)" if name == "null" else ""))
        g.link(ckpt_node, "CLIP", texts[name], "clip")
    encode = g.add("VAEEncode", (x0 + 380, 40), size=(220, 50))
    g.link(image, "IMAGE", encode, "pixels")
    g.link(ckpt_node, "VAE", encode, "vae")
    sched = g.add("BasicScheduler", (x0 + 780, 0), {"scheduler": "normal", "steps": steps, "denoise": 1.0},
                  size=(300, 110))
    g.link(ckpt_node, "MODEL", sched, "model")
    invert = g.add("PSEditDDIMInvert", (x0 + 780, 160), {"cfg": 1.0, "refine": 2}, size=(320, 160))
    g.link(ckpt_node, "MODEL", invert, "model")
    g.link(encode, "LATENT", invert, "latent")
    g.link(sched, "SIGMAS", invert, "sigmas")
    g.link(texts["source"], "CONDITIONING", invert, "source")
    nti = g.add("PSEditNullTextInversion", (x0 + 780, 380),
                {"guidance": 7.5, "method": "null-text", "inner_iterations": 10, "early_stop": 1e-5,
                 "learning_rate": 0.01}, size=(320, 230))
    g.link(ckpt_node, "MODEL", nti, "model")
    g.link(invert, "inversion", nti, "inversion")
    g.link(texts["null"], "CONDITIONING", nti, "null")
    g.link(texts["source"], "CONDITIONING", nti, "source")
    return {"ckpt": ckpt_node, "image": image, "encode": encode, "sched": sched, "invert": invert, "nti": nti,
            **texts}


def triple(g: Graph, s: dict, pos, beta: float, window: tuple[float, float] | None, title: str):
    node = g.add("PSEditTripleGuider", pos, {"gamma": 7.5, "beta": beta}, size=(320, 200), title=title)
    g.link(s["ckpt"], "MODEL", node, "model")
    for name in ("null", "source", "edit"):
        g.link(s[name], "CONDITIONING", node, name)
    g.link(s["nti"], "null_schedule", node, "null_schedule")
    if window is not None:
        w = g.add("PSEditStepWindow", (pos[0], pos[1] - 120), {"start": window[0], "end": window[1]},
                  size=(260, 80), title="text guidance window")
        g.link(w, "window", node, "window")
    return node


def perceptual(g: Graph, s: dict, inner: dict, pos, window=(0.2, 0.8), mask: dict | None = None):
    w = g.add("PSEditStepWindow", (pos[0], pos[1] - 120), {"start": window[0], "end": window[1]}, size=(260, 80),
              title="perceptual guidance window")
    node = g.add("PSEditPerceptualGuidance", pos,
                 {"strength": 0.1, "lpips_net": "vgg", "gradient": "x0", "decoder": "taesd", "step": "normalized",
                  "pixel_weight": 0.0}, size=(340, 260))
    g.link(inner, "GUIDER", node, "guider")
    g.link(s["ckpt"], "VAE", node, "vae")
    g.link(s["image"], "IMAGE", node, "image")
    g.link(w, "window", node, "window")
    if mask is not None:
        g.link(mask, "edit_mask", node, "mask")
    return node


def sample(g: Graph, s: dict, guider: dict, pos, prefix: str):
    noise = g.add("DisableNoise", (pos[0], pos[1]), size=(200, 40))
    sampler = g.add("KSamplerSelect", (pos[0], pos[1] + 80), {"sampler_name": "euler"}, size=(240, 60))
    run = g.add("SamplerCustomAdvanced", (pos[0] + 280, pos[1]), size=(260, 110))
    g.link(noise, "NOISE", run, "noise")
    g.link(guider, "GUIDER", run, "guider")
    g.link(sampler, "SAMPLER", run, "sampler")
    g.link(s["sched"], "SIGMAS", run, "sigmas")
    g.link(s["invert"], "inverted", run, "latent_image")
    decode = g.add("VAEDecode", (pos[0] + 280, pos[1] + 150), size=(220, 50))
    g.link(run, "output", decode, "samples")
    g.link(s["ckpt"], "VAE", decode, "vae")
    save = g.add("SaveImage", (pos[0] + 580, pos[1]), {"filename_prefix": prefix}, size=(320, 340))
    g.link(decode, "IMAGE", save, "images")
    return decode


SETUP_NOTE = (
    "PSEdit: edit a real photo, keep the rest.\n\n"
    "1. Load Checkpoint: an {family} checkpoint.\n2. Load Image: your photo ({res}; any size works, it is cropped to "
    "a multiple of 8).\n3. source caption: what the photo shows. edit caption: what it should show (change few "
    "words). Leave the null caption empty.\n4. Queue. The first run inverts the photo (DDIM Invert) and fits null-"
    "text embeddings (about inner_iterations x 2 model calls per step)."
)
KNOBS_NOTE = (
    "Knobs\n- Triple Guider beta: edit strength (0 = reconstruct the photo, 2-5 typical). gamma = CFG; keep it equal "
    "to Null-Text Inversion's guidance.\n- Text window 0-0.4: the paper's 'first 20 of 50 steps'.\n- Perceptual "
    "Guidance strength 0.05-0.15; its window decides how much detail returns (too late restores shadows as "
    "objects). decoder taesd needs {taesd}.safetensors in models/vae_approx; LPIPS trunk weights go in "
    "models/lpips (see README) or are downloaded once.\n- method negative-prompt: instant, slightly less faithful."
)


def edit_workflow(family: str, ckpt: str, res: str, taesd: str, masked: bool = False) -> dict:
    g = Graph()
    s = loaders(g, ckpt, "example.png", "a cat sitting on a sofa", "a tiger sitting on a sofa", 50)
    g.note(SETUP_NOTE.format(family=family, res=res), (0, -240), size=(700, 200))
    guider = triple(g, s, (1180, 160), beta=3.0, window=(0.0, 0.4), title="PSEdit Triple Guider")
    mask = None
    if masked:
        mask = g.add("PSEditEditMask", (1180, 460),
                     {"probe_end": 0.5, "blur": 1.0, "threshold": 0.5, "soft": False}, size=(320, 220))
        g.link(s["ckpt"], "MODEL", mask, "model")
        g.link(s["invert"], "inversion", mask, "inversion")
        g.link(s["source"], "CONDITIONING", mask, "source")
        g.link(s["edit"], "CONDITIONING", mask, "edit")
        preview = g.add("MaskToImage", (1180, 720), size=(220, 50))
        g.link(mask, "edit_mask", preview, "mask")
        show = g.add("PreviewImage", (1180, 800), size=(320, 300), title="edit mask preview (white = edited)")
        g.link(preview, "IMAGE", show, "images")
        g.note("Edit mask: white where the edit may change the photo, estimated from where the edit and source "
               "captions disagree. Preview it here; lower threshold = larger region. To use your own, paint a mask "
               "in Load Image (right-click > Open in MaskEditor) and connect Load Image's MASK to Edit Mask's "
               "mask input (it is then passed through). Only the area outside the mask is pulled toward the photo.",
               (1560, 800), size=(420, 200))
    guided = perceptual(g, s, guider, (1560, 160), mask=mask)
    sample(g, s, guided, (1960, 160), f"psedit_{'masked_' if masked else ''}edit")
    g.note(KNOBS_NOTE.format(taesd=taesd), (1960, -240), size=(700, 200))
    return g.to_json()


def ablation_workflow() -> dict:
    g = Graph()
    s = loaders(g, "v1-5-pruned-emaonly.safetensors", "example.png", "a cat sitting on a sofa",
                "a tiger sitting on a sofa", 50)
    g.note("The paper's Figure 3 / table as one graph (arXiv 2312.06680). One inversion and one null-text inversion "
           "feed three edits, saved side by side:\n1. Null-text: plain CFG on the edit caption (beta = gamma) with "
           "the null-text schedule.\n2. Text optimization: triple guidance (beta 3) in the first 40% of the steps.\n"
           "3. Perceptual + text optimization: 2. plus LPIPS guidance toward the photo in steps 20-80%.\n"
           + SETUP_NOTE.format(family="SD1.5", res="512x512").split("\n\n", 1)[1], (0, -300), size=(760, 260))
    nulltext = triple(g, s, (1180, 0), beta=7.5, window=None, title="1. Null-text (plain CFG on the edit)")
    textopt = triple(g, s, (1180, 560), beta=3.0, window=(0.0, 0.4), title="2. Text optimization")
    textopt_b = triple(g, s, (1180, 1060), beta=3.0, window=(0.0, 0.4), title="3. Text optimization (for +LPIPS)")
    guided = perceptual(g, s, textopt_b, (1560, 1060))
    d1 = sample(g, s, nulltext, (1960, 0), "psedit_nulltext")
    d2 = sample(g, s, textopt, (1960, 560), "psedit_textopt")
    d3 = sample(g, s, guided, (1960, 1060), "psedit_perceptual")
    batch = g.add("ImageBatch", (2900, 300), size=(220, 60), title="photo + Null-text")
    g.link(s["image"], "IMAGE", batch, "image1")
    g.link(d1, "IMAGE", batch, "image2")
    batch2 = g.add("ImageBatch", (2900, 400), size=(220, 60), title="+ Text optimization")
    g.link(batch, "IMAGE", batch2, "image1")
    g.link(d2, "IMAGE", batch2, "image2")
    batch3 = g.add("ImageBatch", (2900, 500), size=(220, 60), title="+ Perceptual + text")
    g.link(batch2, "IMAGE", batch3, "image1")
    g.link(d3, "IMAGE", batch3, "image2")
    save = g.add("SaveImage", (3160, 300), {"filename_prefix": "psedit_ablation"}, size=(700, 360),
                 title="source | Null-text | Text optimization | Perceptual + text")
    g.link(batch3, "IMAGE", save, "images")
    return g.to_json()


WORKFLOWS = {
    "psedit_edit_sd15": lambda: edit_workflow("SD1.5", "v1-5-pruned-emaonly.safetensors", "512x512", "taesd"),
    "psedit_ablation_sd15": ablation_workflow,
    "psedit_edit_sdxl": lambda: edit_workflow("SDXL", "sd_xl_base_1.0.safetensors", "1024x1024", "taesdxl"),
    "psedit_masked_edit_sd15": lambda: edit_workflow("SD1.5", "v1-5-pruned-emaonly.safetensors", "512x512", "taesd",
                                                     masked=True),
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        (OUT / f"{name}.json").write_text(json.dumps(build(), indent=1) + "\n")
        sys.stdout.write(f"wrote example_workflows/{name}.json\n")


if __name__ == "__main__":
    main()
