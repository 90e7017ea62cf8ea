"""Check a ComfyUI UI-format workflow against node schemas (/object_info).

Mirrors what the frontend and ``execution.validate_prompt`` would reject or silently break: unknown node types, links
whose recorded type differs from the output or the input they join, link ids that the nodes do not list (or list
twice), required inputs neither linked nor a widget, ``widgets_values`` out of step with the widget inputs (UI-only
values included), values outside an input's type, range or options, no output node, no Note for the user.
``validate`` returns readable problems; an empty list means valid.
"""

from __future__ import annotations

from ui_to_api import (
    CONTROL,
    CONTROL_VALUES,
    FRONTEND_ONLY,
    UPLOAD,
    inputs_in_order,
    is_widget,
    options_of,
    widget_values,
)

NOTES = {"Note", "MarkdownNote"}
# Combos whose options are the files on one machine: any file name is fine in a shared workflow.
FILE_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"), ("VAELoader", "vae_name"),
               ("LoraLoader", "lora_name"), ("LoadImageMask", "image"), ("PSEditPerceptualGuidance", "decoder")}
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos


def check_value(node_type: str, name: str, spec, value) -> str | None:
    """Why ``value`` does not fit widget input ``name`` (spec from /object_info), or None."""
    kind = "COMBO" if isinstance(spec[0], list) else spec[0]
    opts = options_of(spec)
    if kind == "COMBO":
        options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        if not isinstance(value, str):
            return f"{node_type}.{name}: combo value {value!r} is not a string"
        if (node_type, name) not in FILE_COMBOS and value not in options:
            return f"{node_type}.{name}: {value!r} is not one of {options}"
    elif kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            return f"{node_type}.{name}: {value!r} is not a {kind}"
        if value != value or ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
            return f"{node_type}.{name}: {value} is outside [{opts.get('min')}, {opts.get('max')}]"
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{node_type}.{name}: {value!r} is not a BOOLEAN"
    elif kind == "STRING" and not isinstance(value, str):
        return f"{node_type}.{name}: {value!r} is not a STRING"
    return None


def _input_spec(info: dict, name: str):
    return next((spec for n, spec, _ in inputs_in_order(info) if n == name), None)


def _check_links(workflow: dict, nodes: dict, object_info: dict, errors: list[str]) -> dict:
    links = {}
    for link in workflow.get("links", []):
        if not isinstance(link, list) or len(link) != 6:
            errors.append(f"link {link} is not [id, from_node, from_slot, to_node, to_slot, TYPE]")
            continue
        if link[0] in links:
            errors.append(f"link id {link[0]} is used twice")
        links[link[0]] = link
    if links and workflow.get("last_link_id", 0) < max(links):
        errors.append(f"last_link_id {workflow.get('last_link_id')} is below the largest link id {max(links)}")
    for lid, (_, src, src_slot, dst, dst_slot, type_) in links.items():
        if src not in nodes or dst not in nodes:
            errors.append(f"link {lid} joins missing nodes {src} -> {dst}")
            continue
        outs, ins = nodes[src].get("outputs") or [], nodes[dst].get("inputs") or []
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            errors.append(f"link {lid} is not listed on output {src_slot} of node {src}")
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
            errors.append(f"link {lid} is not the link of input {dst_slot} of node {dst}")
            continue
        src_info = object_info.get(nodes[src]["type"])
        if src_info is not None and src_slot < len(src_info["output"]) and type_ != src_info["output"][src_slot]:
            errors.append(f"link {lid} says {type_} but {nodes[src]['type']} output {src_slot} is "
                          f"{src_info['output'][src_slot]}")
        dst_info = object_info.get(nodes[dst]["type"])
        if dst_info is not None:
            spec = _input_spec(dst_info, ins[dst_slot].get("name"))
            want = None if spec is None else ("COMBO" if isinstance(spec[0], list) else spec[0])
            if want not in (type_, "*"):
                errors.append(f"link {lid}: {type_} into {nodes[dst]['type']}.{ins[dst_slot].get('name')}, "
                              f"which takes {want}")
    # The other direction: every link a node names exists and points back at that node and slot.
    for node in nodes.values():
        for slot, inp in enumerate(node.get("inputs") or []):
            lid = inp.get("link")
            if lid is not None and (lid not in links or links[lid][3:5] != [node["id"], slot]):
                errors.append(f"node {node['id']} input {inp.get('name')} names link {lid}, which does not end there")
        for slot, out in enumerate(node.get("outputs") or []):
            for lid in out.get("links") or []:
                if lid not in links or links[lid][1:3] != [node["id"], slot]:
                    errors.append(f"node {node['id']} output {out.get('name')} names link {lid}, which does not "
                                  "start there")
    return links


def _is_vector2(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)


def _check_shape(node: dict, errors: list[str]) -> None:
    """The fields the frontend's workflow schema (zComfyNode, version 0.4) requires, with their types."""
    where = f"node {node.get('id')} ({node.get('type')})"
    checks = [("id", lambda v: isinstance(v, int) and not isinstance(v, bool)), ("type", lambda v: isinstance(v, str)),
              ("pos", _is_vector2), ("size", _is_vector2), ("flags", lambda v: isinstance(v, dict)),
              ("order", lambda v: isinstance(v, int)), ("mode", lambda v: isinstance(v, int)),
              ("properties", lambda v: isinstance(v, dict))]
    for key, ok in checks:
        if key not in node or not ok(node[key]):
            errors.append(f"{where}: field {key!r} is missing or malformed ({node.get(key)!r})")
    for key in ("inputs", "outputs"):
        for slot in node.get(key) or []:
            if not isinstance(slot.get("name"), str) or "type" not in slot:
                errors.append(f"{where}: {key} entry {slot} needs a name and a type")
    if not isinstance(node.get("widgets_values", []), list):
        errors.append(f"{where}: widgets_values is not a list")


def _check_node(node: dict, info: dict, errors: list[str], fill_new: bool) -> None:
    t, nid = node["type"], node["id"]
    if (node.get("properties") or {}).get("Node name for S&R") != t:
        errors.append(f"node {nid} ({t}): properties['Node name for S&R'] should be {t!r}")
    schema_inputs = {n: s for n, s, _ in inputs_in_order(info)}
    for inp in node.get("inputs") or []:
        spec = schema_inputs.get(inp.get("name"))
        if spec is None:
            errors.append(f"node {nid} ({t}): input {inp.get('name')!r} is not in the schema")
        elif not is_widget(spec) and inp.get("type") not in (spec[0], "*"):
            errors.append(f"node {nid} ({t}): input {inp['name']} has type {inp.get('type')}, schema says {spec[0]}")
    outputs = [o.get("type") for o in node.get("outputs") or []]
    added = fill_new and outputs == list(info["output"])[:len(outputs)]  # outputs a newer version appended
    if outputs != list(info["output"]) and not added:
        errors.append(f"node {nid} ({t}): outputs {outputs}, schema says {info['output']}")
    linked = {i["name"] for i in node.get("inputs") or [] if i.get("link") is not None}
    for name, spec, required in inputs_in_order(info):
        if required and not is_widget(spec) and name not in linked:
            errors.append(f"node {nid} ({t}): required input {name} is not connected")
    try:
        values = widget_values(node, info, fill_new=fill_new)
    except ValueError as exc:
        errors.append(str(exc))
        return
    for name, spec, value, _filled in values:
        if name == CONTROL:
            if value not in CONTROL_VALUES:
                errors.append(f"node {nid} ({t}): control_after_generate value {value!r} is not one of "
                              f"{CONTROL_VALUES}")
        elif name == UPLOAD:
            if not isinstance(value, str):
                errors.append(f"node {nid} ({t}): upload widget value {value!r} is not a string")
        elif name not in linked:
            problem = check_value(t, name, spec, value)
            if problem:
                errors.append(f"node {nid}: {problem}")


def validate(workflow: dict, object_info: dict, fill_new: bool = False) -> list[str]:
    """Every problem found in a UI-format workflow, as readable strings (empty: valid). With ``fill_new``, widgets and
    outputs a newer ComfyUI added at the end of a node may be missing (the frontend adds them, widgets with their
    defaults; e.g. 0.33's SaveImage has an IMAGE output)."""
    errors = []
    if workflow.get("version") != 0.4:
        errors.append(f"version is {workflow.get('version')!r}, expected 0.4 (UI format)")
    node_list = workflow.get("nodes") or []
    nodes = {n["id"]: n for n in node_list}
    if len(nodes) != len(node_list):
        errors.append("node ids are not unique")
    if nodes and workflow.get("last_node_id", 0) < max(nodes):
        errors.append(f"last_node_id {workflow.get('last_node_id')} is below the largest node id {max(nodes)}")
    _check_links(workflow, nodes, object_info, errors)
    has_output = has_note = False
    for node in nodes.values():
        _check_shape(node, errors)
        t = node["type"]
        has_note |= t in NOTES and bool((node.get("widgets_values") or [""])[0].strip())
        if t in FRONTEND_ONLY:
            continue
        info = object_info.get(t)
        if info is None:
            errors.append(f"node {node['id']}: unknown node type {t}")
            continue
        has_output |= bool(info.get("output_node"))
        _check_node(node, info, errors, fill_new)
    if not has_output:
        errors.append("no output node (SaveImage, PreviewImage, ...): ComfyUI would refuse to run it")
    if not has_note:
        errors.append("no Note on the canvas telling the user what to set")
    return errors


def overlaps(workflow: dict, margin: float = 10) -> list[str]:
    """Pairs of nodes whose boxes (title bar included, plus ``margin``) overlap on the canvas."""
    boxes = []
    for n in workflow.get("nodes", []):
        (x, y), (w, h) = n["pos"], n["size"]
        boxes.append((n.get("title") or n["type"], n["id"], x, y - TITLE_HEIGHT, x + w + margin, y + h + margin))
    found = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a[2] < b[4] and b[2] < a[4] and a[3] < b[5] and b[3] < a[5]:
                found.append(f"{a[0]} (node {a[1]}) overlaps {b[0]} (node {b[1]})")
    return found
