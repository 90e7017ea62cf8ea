"""Generate example_workflows/*.json (ComfyUI UI format, version 0.4) from the node schemas.

    python tools/make_workflows.py

Reads the oldest supported ComfyUI's node schemas, tests/data/object_info/<version>.json (tools/snapshot_object_info.py
writes one per version from a live ComfyUI), so widget order, defaults and socket types always follow the real
schemas; a newer ComfyUI's frontend fills widgets it added at the end of a node with their defaults. tests/workflows/
validates the result against every version's snapshot. Edit the graphs here, not the JSON.

File names: the frontend titles a custom node pack's template by its file name (and turns the same name, with - and _
as spaces, into its description), so each workflow is written to ``example_workflows/<title>.json`` (TITLES,
path_of); the ids (WORKFLOWS' keys) are what code and tests call them.

Layout: nodes sit in columns, left to right in the order data flows; a column stacks its nodes top-down (a node may
ask for a minimum y to line up with a branch). Node sizes are at least what the frontend needs for their sockets and
widgets, and column widths follow their widest node, so nothing overlaps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "workflows"))
import snapshots  # noqa: E402  (tests/workflows: the schema snapshot of each supported ComfyUI)

INFO = snapshots.load(snapshots.oldest())
OUT = REPO / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_COLOR = {"color": "#432", "bgcolor": "#653"}
COLUMN_GAP, ROW_GAP, TITLE = 70, 60, 30  # canvas pixels; LiteGraph draws the title bar above a node's pos
SLOT_H, WIDGET_H, MULTILINE_H = 20, 24, 90

# The paper's settings (arXiv 2312.06680) and the nodes' documented ranges.
STEPS = 50
# ddim_uniform: the reference code's DDIM timesteps (t = 981, 961, ...). Null-text reconstruction at CFG 7.5 on the
# toy world (benchmarks/nulltext_schedule.py, 4 scenes): +1.3 dB over "normal" (which starts at sigma_max) at 10 steps,
# +0.4 dB at 20, equal (0.01 dB) at 50: never worse.
SCHEDULER = "ddim_uniform"
GAMMA = 7.5
# Triple Guider beta per Perceptual Guidance gradient: the paper's 3, but 1 in the SD1.5 pipeline (full gradient at
# strength 3). On the toy world's 64 edits (two 32-edit sweeps, seeds 0 and 1; README, *The toy world*) beta 1 keeps
# +1.4 dB [0.6, 2.2] more background than 3 with LPIPS -0.066 [-0.098, -0.039] and edit success +0.12 [0.00, 0.25]
# (shape edits reach their shape less often: 0.50 vs 0.75 of 16). The node's default stays the paper's 3, and so do
# the x0-gradient workflows (their sweep was not run). psedit_cli.pipeline.BETA holds the same (tests/workflows).
BETA = {"full": 1.0, "x0": 3.0}
TEXT_WINDOW = (0.0, 0.4)  # "first 20 of 50 steps"
PERCEPTUAL_WINDOW = (0.2, 0.8)
# step "normalized", target "x0": RMS of the correction of the x0 prediction per step, per gradient (below). With the
# full gradient 3: on the toy world's 32-edit sweep (README, *The toy world*) it keeps +1.3 dB [0.5, 2.2] more
# background than 1 (LPIPS -0.05, edit success +0.06 [0.00, 0.16]); x0 keeps the node's default 1 (its 32-edit sweep
# was not run). psedit_cli.pipeline.STRENGTH holds the same for `psedit edit/eval` (tests/workflows checks the two).
STRENGTH = {"full": 3.0, "x0": 1.0}
# Perceptual Guidance's gradient per family: "full" (through the model too, the paper's) where its memory is modest,
# "x0" (through the decoder only) elsewhere. On the toy world's 32-edit table (README, *The toy world*) full keeps
# +3.2 dB [2.1, 4.3] more background than x0 at equal edit success; SD1.5 at 512 px then needs 6.4 GiB instead of
# 2.7 (README, *GPU memory*). SDXL at 1024 px already needs 9.2 GiB with x0, and full costs 4.5-5.5x a stock step and
# 17-82 GiB on SD3.5 / Flux (benchmarks/flow_cost.py): x0 there.
# psedit_cli.pipeline.gradient_for applies the same choice to `psedit edit/eval --gradient auto`. The Prompt-to-Prompt
# workflow keeps x0: its guidance is optional there (strength 0 = off) and full was not measured through Attention
# Control.
GRADIENT = {"sd15": "full"}
SOURCE, EDIT = "a cat sitting on a sofa", "a tiger sitting on a sofa"
# Prompt-to-Prompt's and Plug-and-Play's defaults (the nodes' own): windows as fractions of the steps.
P2P_CROSS, P2P_SELF = (0.0, 0.8), (0.0, 0.4)
PNP_FEATURE, PNP_ATTN = (0.0, 0.8), (0.0, 0.5)

# The template browser's title of each workflow, and its file name (see the module docstring): short, readable, no
# underscores (the description would show them as spaces), slashes or apostrophes.
TITLES = {
    "psedit_edit_sd15": "PSEdit - edit a photo (SD1.5)",
    "psedit_ablation_sd15": "PSEdit - ablation, three rows of the paper (SD1.5)",
    "psedit_edit_sdxl": "PSEdit - edit a photo (SDXL)",
    "psedit_masked_edit_sd15": "PSEdit - masked edit (SD1.5)",
    "psedit_edit_sd35": "PSEdit - edit a photo (SD3.5)",
    "psedit_edit_flux": "PSEdit - edit a photo (Flux.1 dev)",
    "psedit_p2p_sd15": "PSEdit - Prompt-to-Prompt (SD1.5)",
    "psedit_pnp_sd15": "PSEdit - Plug-and-Play (SD1.5)",
    "psedit_flowedit_sd35": "PSEdit - edit a photo without inversion (SD3.5)",
    "psedit_flowedit_flux": "PSEdit - edit a photo without inversion (Flux.1 dev)",
}


def path_of(name: str) -> Path:
    """The file of the workflow with id ``name`` (a WORKFLOWS key): ``example_workflows/<its title>.json``."""
    return OUT / f"{TITLES[name]}.json"

# Model files each workflow names, with the download the frontend's missing-models dialog offers (it accepts
# huggingface.co / civitai.com .safetensors links). Each rides on the node that names it in a widget, in that node's
# ``properties.models`` (the checkpoint on its loader, the TAESD decoder on Perceptual Guidance's decoder widget):
# the frontend lists such an entry when the name is one of the node's widget values (ComfyUI 0.33's frontend lists
# nothing else). The TAESD decoder is also a workflow-level ``models`` entry, which 0.3.64's frontend reads.
CHECKPOINTS = {
    "sd15": {"name": "v1-5-pruned-emaonly-fp16.safetensors", "directory": "checkpoints",
             "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                    "v1-5-pruned-emaonly-fp16.safetensors?download=true"},
    "sdxl": {"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
             "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                    "sd_xl_base_1.0.safetensors?download=true"},
}
TAESD = {
    "sd15": {"name": "taesd_decoder.safetensors", "directory": "vae_approx",
             "url": "https://huggingface.co/madebyollin/taesd/resolve/main/taesd_decoder.safetensors"},
    "sdxl": {"name": "taesdxl_decoder.safetensors", "directory": "vae_approx",
             "url": "https://huggingface.co/madebyollin/taesdxl/resolve/main/taesdxl_decoder.safetensors"},
}
# The photo is scaled to the model's working size before anything else (ImageScaleToTotalPixels keeps its aspect;
# VAE Encode then crops each side to a multiple of 8): SD1.5 about 512x512 pixels, SDXL about 1024x1024.
MEGAPIXELS = {"sd15": 0.25, "sdxl": 1.0}  # the node counts 1024 x 1024 pixels as one megapixel


def is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    out = []
    for group in ("required", "optional"):
        for name in info.get("input_order", {}).get(group, []):
            out.append((name, info["input"][group][name], group == "optional"))
    return out


def default_of(spec):
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(spec[0], list) or spec[0] == "COMBO":
        options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        return opts.get("default", options[0] if options else "")
    if "default" in opts:
        return opts["default"]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec[0]]


class Graph:
    """Nodes and links in UI format; positions are assigned by column when the graph is written."""

    def __init__(self, models: list[dict] | None = None):
        self.nodes, self.links = [], []
        self.models = list(models or [])  # workflow-level model files (see TAESD)
        self.place = {}  # node id -> (column, min y) or (column, dx, y) for a fixed spot right of a column's x

    def _new_id(self) -> int:
        return len(self.nodes) + 1

    def add(self, type_: str, col: int, y: float = 0, widgets: dict | None = None, title: str | None = None,
            width: int = 300, height: int = 0, at: float | None = None, models: list[dict] | None = None) -> dict:
        """A node of ``type_`` in column ``col`` at or below ``y`` (or at ``x(col) + at, y`` exactly); ``models``:
        the files it loads, for the frontend's missing-models dialog."""
        if type_ not in INFO:
            raise KeyError(f"{type_} is not in {snapshots.path_for(snapshots.oldest())}: add it to "
                           "tools/snapshot_object_info.py")
        info = INFO[type_]
        widgets = dict(widgets or {})
        values, inputs, widget_h = [], [], 0
        for name, spec, optional in ordered_inputs(info):
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not is_widget(spec):
                inputs.append({"name": name, "type": spec[0], "link": None, **({"shape": 7} if optional else {})})
                continue
            values.append(widgets.pop(name) if name in widgets else default_of(spec))
            widget_h += MULTILINE_H if opts.get("multiline") else WIDGET_H
            if opts.get("image_upload"):
                values.append("image")  # the upload button's UI-only value
                widget_h += WIDGET_H
            if opts.get("control_after_generate", spec[0] == "INT" and name in ("seed", "noise_seed")):
                values.append("fixed")  # the seed's "control after generate"
                widget_h += WIDGET_H
        if widgets:
            raise KeyError(f"{type_} has no widget(s) {sorted(widgets)}")
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(info["output_name"], info["output"], strict=True))]
        need = max(len(inputs), len(outputs), 1) * SLOT_H + widget_h + 16
        node = {"id": self._new_id(), "type": type_, "pos": [0, 0], "size": [width, max(height, need)], "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": type_, **({"models": models} if models else {})},
                "widgets_values": values}
        if title and title != info.get("display_name"):
            node["title"] = title
        self.nodes.append(node)
        self.place[node["id"]] = (col, y) if at is None else (col, at, y)
        return node

    def note(self, text: str, col: int, y: float, width: int = 560, height: int = 200, at: float = 0) -> dict:
        """A Note at a fixed spot (usually above the graph, y < 0)."""
        node = {"id": self._new_id(), "type": "Note", "pos": [0, 0], "size": [width, height], "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                "widgets_values": [text], **NOTE_COLOR}
        self.nodes.append(node)
        self.place[node["id"]] = (col, at, y)
        return node

    def link(self, src: dict, output: str | int, dst: dict, input_name: str) -> None:
        slot = output if isinstance(output, int) else next(
            i for i, o in enumerate(src["outputs"]) if o["name"] == output)
        target = next((i for i, inp in enumerate(dst["inputs"]) if inp["name"] == input_name), None)
        if target is None:
            target = self._widget_socket(dst, input_name)
        if dst["inputs"][target]["link"] is not None:
            raise ValueError(f"{dst['type']}.{input_name} is already connected")
        link_id = len(self.links) + 1
        type_ = src["outputs"][slot]["type"]
        if dst["inputs"][target]["type"] not in (type_, "*"):
            raise TypeError(f"{src['type']}.{output} ({type_}) cannot feed {dst['type']}.{input_name}")
        self.links.append([link_id, src["id"], slot, dst["id"], target, type_])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][target]["link"] = link_id

    @staticmethod
    def _widget_socket(node: dict, name: str) -> int:
        """A socket on widget ``name`` (what the frontend makes when a link is dropped on a widget): appended to the
        node's inputs with a ``widget`` entry; the widget keeps its value in ``widgets_values``."""
        spec = next((s for n, s, _ in ordered_inputs(INFO[node["type"]]) if n == name), None)
        if spec is None or not is_widget(spec):
            raise KeyError(f"{node['type']} has no input or widget {name!r}")
        type_ = "COMBO" if isinstance(spec[0], list) else spec[0]
        node["inputs"].append({"name": name, "type": type_, "widget": {"name": name}, "link": None})
        return len(node["inputs"]) - 1

    def layout(self) -> None:
        by_id = {n["id"]: n for n in self.nodes}
        ncols = max(p[0] for p in self.place.values()) + 1
        width = [0] * ncols
        for nid, p in self.place.items():
            if len(p) == 2:
                width[p[0]] = max(width[p[0]], by_id[nid]["size"][0])
        x = [0] * ncols
        for c in range(1, ncols):
            x[c] = x[c - 1] + width[c - 1] + (COLUMN_GAP if width[c - 1] else 0)
        bottom = [None] * ncols
        for node in self.nodes:  # stacking in insertion order
            p = self.place[node["id"]]
            if len(p) == 3:
                node["pos"] = [x[p[0]] + p[1], p[2]]
                continue
            col, y = p
            if bottom[col] is not None:
                y = max(y, bottom[col] + ROW_GAP + TITLE)
            node["pos"] = [x[col], y]
            bottom[col] = y + node["size"][1]

    def to_json(self) -> dict:
        self.layout()
        for i, node in enumerate(self._execution_order()):
            node["order"] = i
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [60, 320]}},
                **({"models": self.models} if self.models else {}), "version": 0.4}

    def _execution_order(self) -> list[dict]:
        """Nodes in a topological order (the frontend's ``order`` field); Notes first."""
        deps = {n["id"]: {self.links[i["link"] - 1][1] for i in n["inputs"] if i["link"]} for n in self.nodes}
        done, order = set(), []
        while len(order) < len(self.nodes):
            for n in self.nodes:
                if n["id"] not in done and deps[n["id"]] <= done:
                    done.add(n["id"])
                    order.append(n)
        return order


# --- building blocks --------------------------------------------------------------------------------------------------

def loaders(g: Graph, family: str, photo: str, steps: int = STEPS, nulltext: bool = True,
            captions: bool = False, invert_with: str = "source") -> dict:
    """Columns 0-2: checkpoint, photo scaled to the model's size, three captions, VAE encode, sigmas, DDIM
    inversion (with the ``invert_with`` caption), null-text inversion (``nulltext``). ``captions``: the source and
    edit captions are typed once, in two String nodes (column 0) that feed their CLIPTextEncode and, by the caller,
    the attention control node, which must see the same texts."""
    ckpt = CHECKPOINTS[family]
    ckpt_node = g.add("CheckpointLoaderSimple", 0, 0, {"ckpt_name": ckpt["name"]}, width=340, models=[ckpt])
    loaded = g.add("LoadImage", 0, 0, {"image": photo}, title="Load Image (your photo)", width=340, height=380)
    image = g.add("ImageScaleToTotalPixels", 0, 0, {"upscale_method": "lanczos", "megapixels": MEGAPIXELS[family]},
                  title="photo at the model's size", width=340)
    g.link(loaded, "IMAGE", image, "image")
    encode = g.add("VAEEncode", 1, 0, width=360)
    g.link(image, "IMAGE", encode, "pixels")
    g.link(ckpt_node, "VAE", encode, "vae")
    texts, strings = {}, {}
    needs_source = invert_with == "source" or nulltext or captions  # Plug-and-Play's graph has none
    for name, text, title in (("null", "", "null caption (leave empty)"),
                              ("source", SOURCE, "source caption: what the photo shows"),
                              ("edit", EDIT, "edit caption: what it should show")):
        if name == "source" and not needs_source:
            continue
        if captions and name != "null":
            strings[name] = g.add("PrimitiveStringMultiline", 0, 0, {"value": text}, title=title, width=340,
                                  height=110)
            title = f"encode the {name} caption"
        texts[name] = g.add("CLIPTextEncode", 1, 0, {"text": text}, title=title, width=360, height=130)
        g.link(ckpt_node, "CLIP", texts[name], "clip")
        if name in strings:
            g.link(strings[name], "STRING", texts[name], "text")
    sched = g.add("BasicScheduler", 2, 0, {"scheduler": SCHEDULER, "steps": steps, "denoise": 1.0}, width=320)
    g.link(ckpt_node, "MODEL", sched, "model")
    invert = g.add("PSEditDDIMInvert", 2, 0, {"cfg": 1.0, "refine": 2}, width=320)
    g.link(ckpt_node, "MODEL", invert, "model")
    g.link(encode, "LATENT", invert, "latent")
    g.link(sched, "SIGMAS", invert, "sigmas")
    g.link(texts[invert_with], "CONDITIONING", invert, "source")
    nti = None
    if nulltext:
        nti = g.add("PSEditNullTextInversion", 2, 0,
                    {"guidance": GAMMA, "method": "null-text", "inner_iterations": 10, "early_stop": 1e-5,
                     "learning_rate": 0.01}, width=320)
        g.link(ckpt_node, "MODEL", nti, "model")
        g.link(invert, "inversion", nti, "inversion")
        g.link(texts["null"], "CONDITIONING", nti, "null")
        g.link(texts["source"], "CONDITIONING", nti, "source")
    return {"ckpt": ckpt_node, "loaded": loaded, "image": image, "encode": encode, "sched": sched,
            "invert": invert, "nti": nti, **texts, **{f"{k}_text": v for k, v in strings.items()}}


def window(g: Graph, col: int, y: float, span: tuple[float, float], title: str) -> dict:
    return g.add("PSEditStepWindow", col, y, {"start": span[0], "end": span[1]}, title=title, width=320)


def triple(g: Graph, s: dict, col: int, y: float, beta: float, span: tuple[float, float] | None,
           title: str = "PSEdit Triple Guider", model: dict | None = None) -> dict:
    """The Triple Guider on the checkpoint's MODEL (or ``model``: a control node's), with the null-text schedule
    when the graph has one."""
    w = window(g, col, y, span, "text guidance window") if span is not None else None
    node = g.add("PSEditTripleGuider", col, y, {"gamma": GAMMA, "beta": beta}, title=title, width=320)
    if model is None:
        g.link(s["ckpt"], "MODEL", node, "model")
    else:
        g.link(model, "model", node, "model")
    for name in ("null", "source", "edit"):
        g.link(s[name], "CONDITIONING", node, name)
    if w is not None:
        g.link(w, "window", node, "window")
    if s["nti"] is not None:
        g.link(s["nti"], "null_schedule", node, "null_schedule")
    return node


def attention_control(g: Graph, s: dict, col: int, y: float = 0, title: str = "PSEdit Attention Control") -> dict:
    """Prompt-to-Prompt with its paper defaults (replace, cross-attention 0-0.8, self-attention 0-0.4, no local
    blend) on the checkpoint's MODEL; the captions come from the graph's String nodes."""
    node = g.add("PSEditAttentionControl", col, y,
                 {"source_caption": SOURCE, "edit_caption": EDIT, "mode": "replace", "cross_start": P2P_CROSS[0],
                  "cross_end": P2P_CROSS[1], "self_start": P2P_SELF[0], "self_end": P2P_SELF[1]},
                 title=title, width=340)
    g.link(s["ckpt"], "MODEL", node, "model")
    g.link(s["invert"], "inversion", node, "inversion")
    g.link(s["ckpt"], "CLIP", node, "clip")
    g.link(s["source_text"], "STRING", node, "source_caption")
    g.link(s["edit_text"], "STRING", node, "edit_caption")
    return node


def perceptual(g: Graph, s: dict, inner: dict, col: int, y: float, decoder: dict, mask: dict | None = None,
               title: str = "PSEdit Perceptual Guidance", mask_output: str = "edit_mask",
               gradient: str = "x0") -> dict:
    """Perceptual Guidance with the TAESD ``decoder`` (a TAESD entry) named in its decoder widget and declared on the
    node, so the missing-models dialog offers it; ``gradient`` from :data:`GRADIENT` for the family."""
    w = window(g, col, y, PERCEPTUAL_WINDOW, "perceptual guidance window")
    node = g.add("PSEditPerceptualGuidance", col, y,
                 {"strength": STRENGTH[gradient], "lpips_net": "vgg", "gradient": gradient, "decoder": decoder["name"],
                  "step": "normalized", "pixel_weight": 0.0}, title=title, width=340, models=[decoder])
    g.link(inner, "GUIDER", node, "guider")
    g.link(s["ckpt"], "VAE", node, "vae")
    g.link(s["image"], "IMAGE", node, "image")
    g.link(w, "window", node, "window")
    if mask is not None:
        g.link(mask, mask_output, node, "mask")
    return node


def noise_and_sampler(g: Graph, col: int, y: float = 0) -> tuple[dict, dict]:
    noise = g.add("DisableNoise", col, y, title="DisableNoise (inverted latent)", width=320)
    sampler = g.add("KSamplerSelect", col, y, {"sampler_name": "euler"}, title="KSamplerSelect (euler = DDIM)",
                    width=320)
    return noise, sampler


def sample(g: Graph, s: dict, guider: dict, noise: dict, sampler: dict, col: int, y: float = 0,
           title: str | None = None) -> dict:
    """SamplerCustomAdvanced from the inverted latent with the inversion's SIGMAS, then VAEDecode (same column)."""
    run = g.add("SamplerCustomAdvanced", col, y, title=title, width=300)
    g.link(noise, "NOISE", run, "noise")
    g.link(guider, "GUIDER", run, "guider")
    g.link(sampler, "SAMPLER", run, "sampler")
    g.link(s["sched"], "SIGMAS", run, "sigmas")
    g.link(s["invert"], "inverted", run, "latent_image")
    decode = g.add("VAEDecode", col, 0, width=300)
    g.link(run, "output", decode, "samples")
    g.link(s["ckpt"], "VAE", decode, "vae")
    return decode


def save(g: Graph, image: dict, prefix: str, col: int, y: float = 0, title: str | None = None,
         at: float | None = None, width: int = 420, height: int = 460) -> dict:
    node = g.add("SaveImage", col, y, {"filename_prefix": prefix}, title=title, width=width, height=height, at=at)
    g.link(image, "IMAGE", node, "images")
    return node


# --- notes ------------------------------------------------------------------------------------------------------------

def setup_note(family: str) -> str:
    label, res = {"sd15": ("SD1.5", "512x512"), "sdxl": ("SDXL", "1024x1024")}[family]
    return (
        f"PSEdit ({label}): edit a real photo with a caption, keep everything else.\n\n"
        f"1. Load Checkpoint: an {label} checkpoint (the missing-models dialog offers {CHECKPOINTS[family]['name']} "
        f"and the TAESD decoder the guidance uses).\n"
        f"2. Load Image: your photo, any size: 'photo at the model's size' scales it to about {res} pixels' worth "
        f"({MEGAPIXELS[family]} megapixels in that node's units), keeping its aspect; VAE Encode then crops each side "
        "to a multiple of 8. Larger photos cost far more time and the model was not trained for them.\n"
        "3. source caption: what the photo shows. edit caption: the same sentence with the words to change "
        "(\"cat\" -> \"tiger\"). Leave the null caption empty.\n"
        "4. Queue. DDIM Invert turns the photo into the starting latent; Null-Text Inversion fits one null embedding "
        "per step (about inner_iterations x 2 model calls per step; method 'negative-prompt' is instant, a little "
        "less faithful). Keep the same BasicScheduler SIGMAS for inversion and sampling."
    )


def knobs_note(taesd: str, gradient: str) -> str:
    cost = ("full: through the model too (the paper's: a backward pass through the model each step, 6.4 GiB at 512 "
            "px); 'x0' is faster and keeps less of the photo" if gradient == "full" else
            "x0: through the decoder only; 'full' (through the model too) keeps more of the photo at several times "
            "the time and memory")
    return (
        "Knobs\n"
        f"- Triple Guider beta {BETA[gradient]:g}: edit strength (0 = the photo back; "
        + ("1 keeps more of the photo than the paper's 3; raise it to 3 for edits that change an object's shape"
           if BETA[gradient] != BETA["x0"] else "1-5 typical") + "). gamma = CFG scale: keep it equal to "
        f"Null-Text Inversion's guidance ({GAMMA}).\n"
        f"- text guidance window {TEXT_WINDOW[0]}-{TEXT_WINDOW[1]}: triple guidance in the first 40% of the steps "
        "(the paper's first 20 of 50); plain CFG on the edit caption after that.\n"
        f"- Perceptual Guidance strength {STRENGTH[gradient]:.1f} (0.3-3; 0 = off; larger keeps more of the photo) "
        "pulls the result toward "
        f"the photo by LPIPS in its window ({PERCEPTUAL_WINDOW[0]}-{PERCEPTUAL_WINDOW[1]}). Its decoder, "
        f"{taesd}_decoder.safetensors, goes in models/vae_approx (offered when the workflow loads; or choose 'vae': "
        "exact, much slower). The LPIPS trunk (e.g. vgg16-397923af.pth) is downloaded once by torchvision, or put "
        "it in models/lpips offline (see the README).\n"
        f"- Perceptual Guidance gradient {cost}."
    )


# --- workflows --------------------------------------------------------------------------------------------------------

def edit_workflow(family: str, masked: bool = False) -> dict:
    g = Graph(models=[TAESD[family]])
    s = loaders(g, family, "example.png")
    taesd = TAESD[family]["name"].split("_")[0]
    g.note(setup_note(family), 0, -300, width=760, height=240)
    guider = triple(g, s, 3, 0, beta=BETA[GRADIENT.get(family, "x0")], span=TEXT_WINDOW)
    mask = None
    if masked:
        mask = g.add("PSEditEditMask", 3, 0, {"probe_end": 0.5, "blur": 1.0, "threshold": 0.5, "soft": False},
                     width=320)
        g.link(s["ckpt"], "MODEL", mask, "model")
        g.link(s["invert"], "inversion", mask, "inversion")
        g.link(s["source"], "CONDITIONING", mask, "source")
        g.link(s["edit"], "CONDITIONING", mask, "edit")
    guided = perceptual(g, s, guider, 4, 0, TAESD[family], mask=mask, gradient=GRADIENT.get(family, "x0"))
    if masked:
        to_image = g.add("MaskToImage", 4, 0, width=340)
        g.link(mask, "edit_mask", to_image, "mask")
        preview = g.add("PreviewImage", 4, 0, title="edit mask preview (white = edited)", width=340, height=300)
        g.link(to_image, "IMAGE", preview, "images")
    noise, sampler = noise_and_sampler(g, 5)
    decode = sample(g, s, guided, noise, sampler, 6)
    save(g, decode, f"psedit_{'masked_' if masked else ''}edit", 7)
    g.note(knobs_note(taesd, GRADIENT.get(family, "x0")), 3, -300, width=730, height=240)
    if masked:
        # A painted mask goes through the photo's own scaling, so it lands where it was painted.
        painted = g.add("MaskToImage", 0, 0, title="your painted mask (optional)", width=340)
        g.link(s["loaded"], "MASK", painted, "mask")
        scaled = g.add("ImageScaleToTotalPixels", 0, 0, {"upscale_method": "area", "megapixels": MEGAPIXELS[family]},
                       title="mask at the photo's size", width=340)
        g.link(painted, "IMAGE", scaled, "image")
        back = g.add("ImageToMask", 0, 0, {"channel": "red"}, title="painted mask: connect to Edit Mask's mask",
                     width=340)
        g.link(scaled, "IMAGE", back, "image")
        g.note("Edit mask: white where the edit may change the photo, estimated from where the edit and source "
               "captions disagree in the first steps (probe_end). Lower threshold = larger region; blur softens "
               "its edge. To use your own, paint a mask in Load Image (right-click > Open in MaskEditor) and connect "
               "the MASK of 'painted mask: connect to Edit Mask's mask' (bottom left: the mask scaled exactly as the "
               "photo) to Edit Mask's mask input (it is then passed through). Perceptual guidance then pulls only "
               "the area outside the mask toward the photo.", 5, -300, width=720, height=240, at=0)
    return g.to_json()


def ablation_workflow() -> dict:
    g = Graph(models=[TAESD["sd15"]])
    s = loaders(g, "sd15", "example.png", captions=True)
    g.note("The paper's Figure 3 as one graph (arXiv 2312.06680): one DDIM inversion and one null-text inversion "
           "feed three edits of the same photo, saved side by side.\n"
           "1. Null-text: the paper's baseline, null-text inversion + Prompt-to-Prompt: Attention Control (replace, "
           f"cross-attention {P2P_CROSS[0]}-{P2P_CROSS[1]}, self-attention {P2P_SELF[0]}-{P2P_SELF[1]} of the steps) "
           "with plain CFG on the edit caption (beta = gamma, no window) and the null-text schedule.\n"
           f"2. Text optimization: triple guidance (gamma {GAMMA}, beta {BETA[GRADIENT['sd15']]:g}; the paper's 3) "
           "in the first 40% of the steps.\n"
           "3. Perceptual + text optimization: guider 2 wrapped by LPIPS guidance toward the photo in steps "
           "20-80%.\n\nType the source caption and the edit caption in the two String nodes at left: they feed the "
           "text encoders and Attention Control, which must see the same texts (replace: the same number of words; "
           "mode 'refine' to add or remove words).\n\n" + setup_note("sd15").split("\n\n", 1)[1], 0, -460,
           width=1100, height=400)
    control = attention_control(g, s, 3, 0, title="1. Prompt-to-Prompt (Attention Control)")
    nulltext = triple(g, s, 3, 0, beta=GAMMA, span=None, title="1. Null-text + P2P (plain CFG on the edit)",
                      model=control)
    textopt = triple(g, s, 3, 0, beta=BETA[GRADIENT["sd15"]], span=TEXT_WINDOW, title="2. Text optimization")
    noise, sampler = noise_and_sampler(g, 4, 0)
    guided = perceptual(g, s, textopt, 4, 560, TAESD["sd15"], title="3. Perceptual + text optimization",
                        gradient=GRADIENT["sd15"])
    d1 = sample(g, s, nulltext, noise, sampler, 5, 0, title="sample 1. Null-text")
    d2 = sample(g, s, textopt, noise, sampler, 5, 330, title="sample 2. Text optimization")
    d3 = sample(g, s, guided, noise, sampler, 5, 660, title="sample 3. Perceptual + text")
    w, gap = 400, 40
    save(g, d1, "psedit_nulltext", 6, 0, "1. Null-text", at=0, width=w)
    save(g, d2, "psedit_textopt", 6, 0, "2. Text optimization", at=w + gap, width=w)
    save(g, d3, "psedit_perceptual", 6, 0, "3. Perceptual + text optimization", at=2 * (w + gap), width=w)
    g.note(knobs_note("taesd", GRADIENT["sd15"])
           + "\n- 1. Attention Control: cross_start-cross_end / self_start-self_end, the steps "
           "where the edit reads the source's cross-attention maps / small-resolution self-attention; longer windows "
           f"keep more of the photo (see the template {TITLES['psedit_p2p_sd15']}).", 6, -460, width=3 * w + 2 * gap,
           height=400)
    if "ImageBatch" in INFO:
        y = 560
        batch = g.add("ImageBatch", 6, y, title="source + 1", width=220, at=0)
        g.link(s["image"], "IMAGE", batch, "image1")
        g.link(d1, "IMAGE", batch, "image2")
        batch2 = g.add("ImageBatch", 6, y + 120, title="+ 2", width=220, at=0)
        g.link(batch, "IMAGE", batch2, "image1")
        g.link(d2, "IMAGE", batch2, "image2")
        batch3 = g.add("ImageBatch", 6, y + 240, title="+ 3", width=220, at=0)
        g.link(batch2, "IMAGE", batch3, "image1")
        g.link(d3, "IMAGE", batch3, "image2")
        save(g, batch3, "psedit_ablation", 6, y, "source | Null-text | Text optimization | Perceptual + text",
             at=220 + gap, width=3 * w + 2 * gap - 220 - gap, height=420)
    return g.to_json()


# --- attention and feature control: Prompt-to-Prompt and Plug-and-Play (issue 10) ---------------------------------

def control_setup_note(kind: str) -> str:
    title, what = {
        "p2p": ("Prompt-to-Prompt (SD1.5): null-text inversion + attention control (Hertz et al. 2022)",
                "DDIM Invert turns the photo into the starting latent and its trajectory; Null-Text Inversion fits one "
                "null embedding per step (about inner_iterations x 2 model calls per step). Each step, Attention "
                "Control runs the model on that trajectory with the source caption (one extra model call) and hands "
                "its cross-attention maps (and early self-attention) to the edit caption's branch: the layout stays "
                "the photo's, the swapped words change."),
        "pnp": ("Plug-and-Play (SD1.5): feature injection on the inverted photo (Tumanyan et al. 2023)",
                "DDIM Invert turns the photo into the starting latent and its trajectory (with the empty prompt, as "
                "Plug-and-Play's code inverts). Each step, Feature Injection runs the model on that trajectory (one "
                "extra model call) and hands a decoder block's residual features and the later decoder layers' "
                "self-attention to every branch of the guider: the structure stays the photo's, the edit caption sets "
                "the appearance. No null-text inversion: Plug-and-Play samples with plain CFG."),
    }[kind]
    step3 = (
        "3. Type the source caption (what the photo shows) and the edit caption (what it should show) in the two "
        "String nodes at left: they feed the text encoders and the Attention Control node, which must see the same "
        "texts. mode 'replace' needs the same number of words (\"cat\" -> \"tiger\"); use 'refine' to add or remove "
        "words. Leave the null caption empty.\n" if kind == "p2p" else
        "3. Type the edit caption (what the photo should show). Plug-and-Play needs no source caption: the photo is "
        "inverted and the source pass run with the empty prompt (leave the null caption empty); a caption in Feature "
        "Injection's source_caption is PSEdit's variant, which holds the structure harder.\n")
    return (
        f"PSEdit {title}.\n\n"
        f"1. Load Checkpoint: an SD1.5 checkpoint (the missing-models dialog offers {CHECKPOINTS['sd15']['name']}"
        + (" and the TAESD decoder the perceptual guidance uses).\n" if kind == "p2p" else ").\n")
        + "2. Load Image: your photo, any size: 'photo at the model's size' scales it to about 512x512 pixels' worth, "
        "keeping its aspect; VAE Encode then crops each side to a multiple of 8.\n"
        + step3 + f"4. Queue. {what} Keep the same BasicScheduler SIGMAS for inversion and sampling."
    )


def p2p_knobs_note() -> str:
    return (
        "Knobs\n"
        f"- Attention Control windows (fractions of the steps): cross {P2P_CROSS[0]}-{P2P_CROSS[1]}, the steps where "
        "the edit caption's words read the source's cross-attention maps (the layout); self "
        f"{P2P_SELF[0]}-{P2P_SELF[1]}, where self-attention at a quarter of the latent's side and below is the "
        "source's (the shapes). Longer windows keep more of the photo, shorter ones let the edit change more. mode "
        "'reweight' scales reweight_words' attention by reweight_scale.\n"
        "- blend_words (e.g. \"cat tiger\"): local blend. Outside those words' attention region every step from "
        "blend_start follows the photo's trajectory, and blend_mask tells Perceptual Guidance to pull only there. "
        "Empty (default) = no blend, an all-black mask, the whole image guided.\n"
        f"- Triple Guider beta = gamma = {GAMMA}: plain CFG on the edit caption with the null-text schedule, as "
        f"Prompt-to-Prompt edits. beta {BETA['x0']:g} with a text guidance window (PSEdit Step Window "
        f"{TEXT_WINDOW[0]}-{TEXT_WINDOW[1]}) adds the paper's triple guidance; keep gamma equal to Null-Text "
        "Inversion's guidance.\n"
        f"- Perceptual Guidance (optional) strength {STRENGTH['x0']:.1f} (0 = off; or bypass the node, "
        "Ctrl+B) pulls the result toward the photo by LPIPS in its window "
        f"({PERCEPTUAL_WINDOW[0]}-{PERCEPTUAL_WINDOW[1]}). Its decoder, taesd_decoder.safetensors, goes in "
        "models/vae_approx (offered when the workflow loads); the LPIPS trunk is downloaded once by torchvision, "
        "or put it in models/lpips offline (see the README)."
    )


def pnp_knobs_note() -> str:
    return (
        "Knobs\n"
        f"- Feature Injection windows (fractions of the steps): feature {PNP_FEATURE[0]}-{PNP_FEATURE[1]}, the steps "
        "where a decoder block's features are the photo's (the structure); attn "
        f"{PNP_ATTN[0]}-{PNP_ATTN[1]}, where the later decoder layers' self-attention reads the photo's queries and "
        "keys. Longer windows keep more of the photo's structure, shorter ones let the text change more. "
        "feature_block / attn_from_block -1 = the paper's layers (SD1.5: decoder block 4; blocks 4-11).\n"
        f"- CFGGuider cfg {GAMMA}: the edit caption's strength against the empty null caption, as Plug-and-Play "
        "samples. Any guider works on the controlled MODEL: PSEdit Triple Guider (beta, step window) and Perceptual "
        f"Guidance (as in the template {TITLES['psedit_edit_sd15']}) compose with it."
    )


def p2p_workflow() -> dict:
    """Null-text inversion + Prompt-to-Prompt, plain CFG on the edit (the paper's baseline), optional perceptual
    guidance pulling outside the local blend's region (the whole image without blend words)."""
    g = Graph(models=[TAESD["sd15"]])
    s = loaders(g, "sd15", "example.png", captions=True)
    g.note(control_setup_note("p2p"), 0, -400, width=760, height=340)
    control = attention_control(g, s, 3, 0)
    guider = triple(g, s, 3, 0, beta=GAMMA, span=None, title="PSEdit Triple Guider (beta = gamma: CFG on the edit)",
                    model=control)
    guided = perceptual(g, s, guider, 4, 0, TAESD["sd15"], mask=control, mask_output="blend_mask",
                        title="PSEdit Perceptual Guidance (optional: strength 0 = off)")
    noise, sampler = noise_and_sampler(g, 5)
    decode = sample(g, s, guided, noise, sampler, 6)
    save(g, decode, "psedit_p2p", 7)
    g.note(p2p_knobs_note(), 3, -400, width=760, height=340)
    return g.to_json()


def pnp_workflow() -> dict:
    """DDIM inversion with the empty prompt + Plug-and-Play feature injection with the empty prompt's source pass (the
    reference's), sampled with the stock CFGGuider on the edit caption."""
    g = Graph()
    s = loaders(g, "sd15", "example.png", nulltext=False, invert_with="null")
    g.note(control_setup_note("pnp"), 0, -400, width=760, height=340)
    inject = g.add("PSEditFeatureInjection", 3, 0,
                   {"source_caption": "", "feature_start": PNP_FEATURE[0], "feature_end": PNP_FEATURE[1],
                    "attn_start": PNP_ATTN[0], "attn_end": PNP_ATTN[1]}, width=340, height=330)
    g.link(s["ckpt"], "MODEL", inject, "model")
    g.link(s["invert"], "inversion", inject, "inversion")
    g.link(s["ckpt"], "CLIP", inject, "clip")
    guider = g.add("CFGGuider", 3, 0, {"cfg": GAMMA}, title="CFGGuider (edit caption vs empty null)", width=340)
    g.link(inject, "model", guider, "model")
    g.link(s["edit"], "CONDITIONING", guider, "positive")
    g.link(s["null"], "CONDITIONING", guider, "negative")
    noise, sampler = noise_and_sampler(g, 4)
    decode = sample(g, s, guider, noise, sampler, 5)
    save(g, decode, "psedit_pnp", 6)
    g.note(pnp_knobs_note(), 3, -400, width=760, height=340)
    return g.to_json()


# --- flow-matching models: SD3.5 and Flux (issue 11) ------------------------------------------------------------------

# All-in-one checkpoints (diffusion model, text encoders, VAE) that CheckpointLoaderSimple loads: SD3.5 Medium (2.5 B,
# the practical size for gradients through the model: null-text inversion, full-gradient guidance; SD3.5 Large,
# sd3.5_large_fp8_scaled.safetensors from the same repository, works the same) and Flux.1 dev fp8, as ComfyUI's own
# examples and templates name them.
CHECKPOINTS.update({
    "sd35": {"name": "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors", "directory": "checkpoints",
             "url": "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/"
                    "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors?download=true"},
    "flux": {"name": "flux1-dev-fp8.safetensors", "directory": "checkpoints",
             "url": "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors?download=true"},
})
TAESD.update({
    "sd35": {"name": "taesd3_decoder.safetensors", "directory": "vae_approx",
             "url": "https://huggingface.co/madebyollin/taesd3/resolve/main/taesd3_decoder.safetensors"},
    "flux": {"name": "taef1_decoder.safetensors", "directory": "vae_approx",
             "url": "https://huggingface.co/madebyollin/taef1/resolve/main/taef1_decoder.safetensors"},
})
MEGAPIXELS.update({"sd35": 1.0, "flux": 1.0})  # both work at about 1024 x 1024
FLOW = {  # per family: steps and scheduler (ComfyUI's templates), the CFG scale gamma, beta (the paper's 3 / 7.5)
    "sd35": {"label": "SD3.5", "steps": 30, "scheduler": "sgm_uniform", "gamma": 4.5, "beta": 1.8},
    "flux": {"label": "Flux.1 dev", "steps": 28, "scheduler": "simple", "gamma": 3.5, "beta": 1.4},
}


def flow_setup_note(family: str) -> str:
    f = FLOW[family]
    text = (
        f"PSEdit ({f['label']}): edit a real photo with a caption, keep everything else.\n\n"
        f"1. Load Checkpoint: {'a' if family == 'flux' else 'an'} {f['label']} checkpoint with its text encoders "
        "(the missing-models dialog offers "
        f"{CHECKPOINTS[family]['name']} and the {TAESD[family]['name']} the guidance uses).\n"
        "2. Load Image: your photo, any size: 'photo at the model's size' scales it to about 1024x1024 pixels' worth "
        "(1 megapixel), keeping its aspect; VAE Encode then crops each side to a multiple of 8.\n"
        "3. source caption: what the photo shows. edit caption: the same sentence with the words to change "
        "(\"cat\" -> \"tiger\").\n"
    )
    if family == "flux":
        return text + (
            "4. Queue. DDIM Invert turns the photo into the starting latent at Flux guidance 3.5 (FluxGuidance on the "
            "source caption); PSEdit Inverted Noise hands it to the sampler (flow models replace the LATENT by the "
            "noise at sigma 1, so DisableNoise would hand over nothing). Flux has no unconditional branch: no null "
            "caption, no null-text inversion, the inversion alone reconstructs. Keep the same SIGMAS throughout."
        )
    return text + (
        "4. Queue. Leave the null caption empty. DDIM Invert turns the photo into the starting latent, Null-Text "
        f"Inversion fits the empty prompt (its tokens and pooled vector) per step for CFG {f['gamma']}; PSEdit "
        "Inverted Noise hands the latent to the sampler (flow models replace the LATENT by the noise at sigma 1, so "
        "DisableNoise would hand over nothing). Keep the same SIGMAS throughout."
    )


def flow_knobs_note(family: str) -> str:
    f = FLOW[family]
    if family == "flux":
        text = (
            "Knobs\n"
            f"- Flux Guider beta: edit strength as the paper's beta (0 = the photo back; {f['beta']}: the paper's "
            f"beta 3 at gamma 7.5, scaled to guidance {f['gamma']}; beta = guidance is plain Flux on the edit "
            "caption). It computes e_g(src) + (beta/g) "
            "(e_g(edit) - e_g(src)): Flux is guidance-distilled, e_g(c) = e_null + g (e_c - e_null), so this is the "
            "paper's triple guidance with gamma = g, without a null prediction. guidance g: keep it equal to "
            "FluxGuidance on the source caption (3.5).\n"
        )
    else:
        text = (
            "Knobs\n"
            f"- Triple Guider beta: edit strength (0 = the photo back; {f['beta']} = the paper's 3/7.5 of gamma). "
            f"gamma = CFG scale: keep it equal to Null-Text Inversion's guidance ({f['gamma']}).\n"
        )
    return text + (
        f"- text guidance window {TEXT_WINDOW[0]}-{TEXT_WINDOW[1]}: triple guidance in the first 40% of the steps; "
        "the edit caption alone (" + ("plain Flux" if family == "flux" else "plain CFG") + ") after that.\n"
        f"- Perceptual Guidance strength {STRENGTH['x0']:.1f} (0.3-3; 0 = off; larger keeps more of the photo) "
        "pulls the result toward "
        f"the photo by LPIPS in its window ({PERCEPTUAL_WINDOW[0]}-{PERCEPTUAL_WINDOW[1]}). Its decoder, "
        f"{TAESD[family]['name']}, goes in models/vae_approx (offered when the workflow loads; or choose 'vae': exact, "
        "much slower). The LPIPS trunk (e.g. vgg16-397923af.pth) is downloaded once by torchvision, or put it in "
        "models/lpips offline (see the README)."
    )


def _flow_inputs(g: Graph, family: str):
    """The flow workflows' shared start: checkpoint, the photo scaled to the model's size and VAE-encoded, and the
    captions (null, source, edit; Flux has no null caption). Returns (ckpt, image, encode, {name: CLIPTextEncode})."""
    flux = family == "flux"
    ckpt = g.add("CheckpointLoaderSimple", 0, 0, {"ckpt_name": CHECKPOINTS[family]["name"]}, width=340,
                 models=[CHECKPOINTS[family]])
    loaded = g.add("LoadImage", 0, 0, {"image": "example.png"}, title="Load Image (your photo)", width=340, height=380)
    image = g.add("ImageScaleToTotalPixels", 0, 0, {"upscale_method": "lanczos", "megapixels": MEGAPIXELS[family]},
                  title="photo at the model's size", width=340)
    g.link(loaded, "IMAGE", image, "image")
    encode = g.add("VAEEncode", 1, 0, width=360)
    g.link(image, "IMAGE", encode, "pixels")
    g.link(ckpt, "VAE", encode, "vae")
    captions = [("source", SOURCE, "source caption: what the photo shows"),
                ("edit", EDIT, "edit caption: what it should show")]
    if not flux:
        captions.insert(0, ("null", "", "null caption (leave empty)"))
    texts = {}
    for name, text, title in captions:
        texts[name] = g.add("CLIPTextEncode", 1, 0, {"text": text}, title=title, width=360, height=130)
        g.link(ckpt, "CLIP", texts[name], "clip")
    return ckpt, image, encode, texts


def flow_edit_workflow(family: str) -> dict:
    """The full method on a flow-matching model: invert, (SD3.5) null-text inversion, text guidance in the first 40%
    of the steps, perceptual guidance in 20-80%, sampled from PSEdit Inverted Noise."""
    f = FLOW[family]
    flux = family == "flux"
    g = Graph(models=[TAESD[family]])
    ckpt, image, encode, texts = _flow_inputs(g, family)
    source = texts["source"]
    if flux:
        source = g.add("FluxGuidance", 1, 0, {"guidance": f["gamma"]}, title="FluxGuidance (the source, inverted)",
                       width=360)
        g.link(texts["source"], "CONDITIONING", source, "conditioning")
    sched = g.add("BasicScheduler", 2, 0, {"scheduler": f["scheduler"], "steps": f["steps"], "denoise": 1.0},
                  width=320)
    g.link(ckpt, "MODEL", sched, "model")
    invert = g.add("PSEditDDIMInvert", 2, 0, {"cfg": 1.0, "refine": 2}, width=320)
    g.link(ckpt, "MODEL", invert, "model")
    g.link(encode, "LATENT", invert, "latent")
    g.link(sched, "SIGMAS", invert, "sigmas")
    g.link(source, "CONDITIONING", invert, "source")
    noise = g.add("PSEditInvertedNoise", 2, 0, width=320)
    g.link(invert, "inversion", noise, "inversion")
    text_window = window(g, 3, 0, TEXT_WINDOW, "text guidance window")
    if flux:
        guider = g.add("PSEditFluxGuider", 3, 0, {"guidance": f["gamma"], "beta": f["beta"]}, width=320)
    else:
        nti = g.add("PSEditNullTextInversion", 2, 0,
                    {"guidance": f["gamma"], "method": "null-text", "inner_iterations": 10, "early_stop": 1e-5,
                     "learning_rate": 0.01}, width=320)
        g.link(ckpt, "MODEL", nti, "model")
        g.link(invert, "inversion", nti, "inversion")
        g.link(texts["null"], "CONDITIONING", nti, "null")
        g.link(texts["source"], "CONDITIONING", nti, "source")
        guider = g.add("PSEditTripleGuider", 3, 0, {"gamma": f["gamma"], "beta": f["beta"]}, width=320)
        g.link(texts["null"], "CONDITIONING", guider, "null")
        g.link(nti, "null_schedule", guider, "null_schedule")
    g.link(ckpt, "MODEL", guider, "model")
    g.link(texts["source"], "CONDITIONING", guider, "source")
    g.link(texts["edit"], "CONDITIONING", guider, "edit")
    g.link(text_window, "window", guider, "window")
    guided = perceptual(g, {"ckpt": ckpt, "image": image}, guider, 4, 0, TAESD[family])
    sampler = g.add("KSamplerSelect", 5, 0, {"sampler_name": "euler"}, title="KSamplerSelect (euler = DDIM)",
                    width=320)
    run = g.add("SamplerCustomAdvanced", 6, 0, width=300)
    g.link(noise, "noise", run, "noise")
    g.link(guided, "GUIDER", run, "guider")
    g.link(sampler, "SAMPLER", run, "sampler")
    g.link(sched, "SIGMAS", run, "sigmas")
    g.link(invert, "inverted", run, "latent_image")
    decode = g.add("VAEDecode", 6, 0, width=300)
    g.link(run, "output", decode, "samples")
    g.link(ckpt, "VAE", decode, "vae")
    save(g, decode, f"psedit_edit_{family}", 7)
    g.note(flow_setup_note(family), 0, -300, width=760, height=240)
    g.note(flow_knobs_note(family), 3, -300, width=730, height=240)
    return g.to_json()


# --- inversion-free editing on flow models: FlowEdit (issue 27) -------------------------------------------------------

FLOWEDIT = {  # the reference's experiment configs (SD3_exp.yaml / FLUX_exp.yaml); psedit_core.flowedit.PAPER_DEFAULTS
    "sd35": {"node": "PSEditFlowEditGuider", "steps": 50, "scheduler": "simple", "source_guidance": 3.5,
             "edit_guidance": 13.5, "n_max": 33},
    "flux": {"node": "PSEditFlowEditFluxGuider", "steps": 28, "scheduler": "simple", "source_guidance": 1.5,
             "edit_guidance": 5.5, "n_max": 24},
}


def flowedit_note(family: str) -> str:
    f, e = FLOW[family], FLOWEDIT[family]
    calls = "4 model calls per step (source and edit, each with CFG on the null caption)" if family == "sd35" else \
        "2 model calls per step (source and edit, each at its Flux guidance)"
    return (
        f"PSEdit ({f['label']}): edit a photo without inversion (FlowEdit, Kulikov et al. 2025).\n\n"
        f"1. Load Checkpoint: {'a' if family == 'flux' else 'an'} {f['label']} checkpoint with its text encoders "
        f"(the missing-models dialog offers {CHECKPOINTS[family]['name']}).\n"
        "2. Load Image: your photo, any size: 'photo at the model's size' scales it to about 1024x1024 pixels' worth, "
        "keeping its aspect; VAE Encode then crops each side to a multiple of 8.\n"
        "3. source caption: what the photo shows. edit caption: the same sentence with the words to change.\n"
        "4. Queue. No inversion: from the photo's latent, FlowEdit integrates the difference between the edit and "
        f"source captions' velocities along noisy copies of the photo, over the last n_max = {e['n_max']} of the "
        f"{e['steps']} steps (the paper's), {calls}. DisableNoise is right here: the guider hands the photo's latent "
        "to the sampler and draws its own noise from its seed.\n\n"
        f"Knobs: edit_guidance ({e['edit_guidance']}) edits more when higher; source_guidance "
        f"({e['source_guidance']}); n_max: larger reaches further into the noise (stronger edits, less of the photo "
        "kept); n_avg averages noise draws (each costs the model calls again). Connect a MASK (painted in Load Image, "
        "or PSEdit Edit Mask) to keep the photo exactly outside it."
    )


def flowedit_workflow(family: str) -> dict:
    """FlowEdit on SD3.5 / Flux.1 dev with the paper's settings: the photo's latent as the sampler's start
    (DisableNoise), the FlowEdit guider, euler over the paper's schedule."""
    e = FLOWEDIT[family]
    flux = family == "flux"
    g = Graph()
    ckpt, image, encode, texts = _flow_inputs(g, family)
    sched = g.add("BasicScheduler", 2, 0, {"scheduler": e["scheduler"], "steps": e["steps"], "denoise": 1.0},
                  width=320)
    g.link(ckpt, "MODEL", sched, "model")
    guider = g.add(e["node"], 2, 0, {k: e[k] for k in ("source_guidance", "edit_guidance", "n_max")}, width=340,
                   height=260)
    g.link(ckpt, "MODEL", guider, "model")
    if not flux:
        g.link(texts["null"], "CONDITIONING", guider, "null")
    g.link(texts["source"], "CONDITIONING", guider, "source")
    g.link(texts["edit"], "CONDITIONING", guider, "edit")
    noise = g.add("DisableNoise", 3, 0, title="DisableNoise (the photo's latent is the start)", width=320)
    sampler = g.add("KSamplerSelect", 3, 0, {"sampler_name": "euler"}, title="KSamplerSelect (euler: FlowEdit's step)",
                    width=320)
    run = g.add("SamplerCustomAdvanced", 4, 0, width=300)
    g.link(noise, "NOISE", run, "noise")
    g.link(guider, "GUIDER", run, "guider")
    g.link(sampler, "SAMPLER", run, "sampler")
    g.link(sched, "SIGMAS", run, "sigmas")
    g.link(encode, "LATENT", run, "latent_image")
    decode = g.add("VAEDecode", 4, 0, width=300)
    g.link(run, "output", decode, "samples")
    g.link(ckpt, "VAE", decode, "vae")
    save(g, decode, f"psedit_flowedit_{family}", 5)
    g.note(flowedit_note(family), 0, -330, width=820, height=270)
    return g.to_json()


WORKFLOWS = {
    "psedit_edit_sd15": lambda: edit_workflow("sd15"),
    "psedit_ablation_sd15": ablation_workflow,
    "psedit_edit_sdxl": lambda: edit_workflow("sdxl"),
    "psedit_masked_edit_sd15": lambda: edit_workflow("sd15", masked=True),
    "psedit_edit_sd35": lambda: flow_edit_workflow("sd35"),
    "psedit_edit_flux": lambda: flow_edit_workflow("flux"),
    "psedit_p2p_sd15": p2p_workflow,
    "psedit_pnp_sd15": pnp_workflow,
    "psedit_flowedit_sd35": lambda: flowedit_workflow("sd35"),
    "psedit_flowedit_flux": lambda: flowedit_workflow("flux"),
}


def main() -> None:
    """Write every workflow to its file; remove any other example_workflows/*.json (a renamed or dropped workflow)
    with its thumbnail, so the template browser lists exactly WORKFLOWS."""
    OUT.mkdir(exist_ok=True)
    written = set()
    for name, build in WORKFLOWS.items():
        path = path_of(name)
        path.write_text(json.dumps(build(), indent=1) + "\n")
        written.add(path)
        sys.stdout.write(f"wrote example_workflows/{path.name}\n")
    for stale in sorted(set(OUT.glob("*.json")) - written):
        for path in (stale, stale.with_suffix(".jpg")):
            if path.exists():
                path.unlink()
                sys.stdout.write(f"removed example_workflows/{path.name}\n")


if __name__ == "__main__":
    main()
