"""Convert a ComfyUI UI-format workflow (what users drag in) to the API-format prompt that ``POST /prompt`` takes.

Only the frontend does this conversion in ComfyUI; this is a small, schema-driven version of it for tests (and for the
slow server run). It also holds the schema helpers the validator shares: which inputs are widgets, in which order
their values sit in ``widgets_values``, and which UI-only values (a seed's "control_after_generate", an image
upload button) are interleaved there.
"""

from __future__ import annotations

# Nodes that exist only in the frontend: never sent to the server.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# Input types the frontend shows as widgets (a list as the type, or "COMBO", is a drop-down).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# The frontend gives these inputs a "control after generate" widget even when the schema does not ask for one.
SEED_NAMES = {"seed", "noise_seed"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD = "<upload>"
CONTROL = "<control_after_generate>"
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


def is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def options_of(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def inputs_in_order(info: dict):
    """``(name, spec, required)`` for each input, in the node's declared order (``input_order``)."""
    order = info.get("input_order") or {g: list(info["input"].get(g, {})) for g in ("required", "optional")}
    for group in ("required", "optional"):
        for name in order.get(group, []):
            yield name, info["input"][group][name], group == "required"


def has_control_widget(name: str, spec) -> bool:
    """Whether the frontend adds a "control_after_generate" value after this widget's value."""
    opts = options_of(spec)
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return spec[0] == "INT" and name in SEED_NAMES


def widget_slots(info: dict) -> list[tuple[str, list]]:
    """The entries of ``widgets_values``, in order: ``(input name, spec)``, or a UI-only slot (UPLOAD, CONTROL)."""
    slots = []
    for name, spec, _ in inputs_in_order(info):
        if is_widget(spec):
            slots.append((name, spec))
            opts = options_of(spec)
            if opts.get("image_upload"):
                slots.append((UPLOAD, ["STRING"]))
            if has_control_widget(name, spec):
                slots.append((CONTROL, [list(CONTROL_VALUES)]))
    return slots


def default_of(spec):
    """The value the frontend gives a new widget: the schema's default, else the first option / zero / empty."""
    opts = options_of(spec)
    if isinstance(spec[0], list) or spec[0] == "COMBO":
        options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        return opts.get("default", options[0] if options else "")
    if "default" in opts:
        return opts["default"]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec[0]]


def widget_values(node: dict, info: dict, fill_new: bool = True) -> list[tuple[str, list, object, bool]]:
    """``(slot name, spec, value, filled)`` for each of ``info``'s widget slots, from the node's ``widgets_values``.

    A workflow saved for an older ComfyUI lacks the values of widgets a newer one added at the end of a node (e.g.
    ``ImageScaleToTotalPixels.resolution_steps`` in 0.33); the frontend fills them with their defaults
    (``filled``), and so does this with ``fill_new``. Any other count mismatch raises ``ValueError``."""
    values = list(node.get("widgets_values") or [])
    slots = widget_slots(info)
    missing = slots[len(values):]
    if len(values) > len(slots) or (missing and not fill_new) or any(n in (UPLOAD, CONTROL) for n, _ in missing):
        raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values for "
                         f"{len(slots)} widget slots {[n for n, _ in slots]}")
    out = [(name, spec, value, False) for (name, spec), value in zip(slots, values, strict=False)]
    return out + [(name, spec, default_of(spec), True) for name, spec in missing]


def _resolve(links: dict, nodes: dict, link_id: int) -> tuple[int, int] | None:
    """The real ``(node id, output slot)`` behind a link, following Reroute nodes."""
    seen = set()
    while link_id is not None and link_id not in seen:
        seen.add(link_id)
        _, src, slot, *_ = links[link_id]
        if nodes[src]["type"] != "Reroute":
            return src, slot
        link_id = (nodes[src].get("inputs") or [{}])[0].get("link")
    return None


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt (``{"<id>": {"class_type", "inputs"}}``) the frontend would POST for ``workflow``.

    Widget values are mapped by the schema's input order (UI-only values dropped; widgets a newer ComfyUI added at
    the end of a node get their defaults, as the frontend gives them, see :func:`widget_values`); linked inputs become
    ``["<source id>", slot]`` and override a widget of the same name (a widget converted to an input). Muted nodes
    are left out; bypassed nodes are not supported (the frontend rewires them).
    """
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        mode = node.get("mode", MODE_ALWAYS)
        if node["type"] in FRONTEND_ONLY or mode == MODE_NEVER:
            continue
        if mode == MODE_BYPASS:
            raise NotImplementedError(f"node {node['id']} ({node['type']}) is bypassed: not supported")
        info = object_info[node["type"]]
        inputs = {}
        for name, _spec, value, _filled in widget_values(node, info):
            if name not in (UPLOAD, CONTROL):
                inputs[name] = value
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            origin = _resolve(links, nodes, inp["link"])
            if origin is not None:
                inputs[inp["name"]] = [str(origin[0]), origin[1]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
