"""Check a ComfyUI UI-format workflow against node schemas (/object_info), and convert it to the API format.

Mirrors what the frontend does when a user drags a workflow in: node types must exist, links must join matching
types, every required input must be linked or a widget, and widget values must fit their inputs, in order.
"""

from __future__ import annotations

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Combos whose options are the files of one machine: any string is fine in a shared workflow.
FILE_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image")}


def is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def inputs_in_order(info: dict):
    for group in ("required", "optional"):
        for name in info.get("input_order", {}).get(group, []):
            yield name, info["input"][group][name], group == "required"


def widget_slots(info: dict) -> list[tuple[str, list]]:
    """The widget inputs in widgets_values order, with the UI-only extra values (upload button, seed control)."""
    slots = []
    for name, spec, _ in inputs_in_order(info):
        if is_widget(spec):
            slots.append((name, spec))
            opts = spec[1] if len(spec) > 1 else {}
            if opts.get("image_upload"):
                slots.append(("<upload>", ["STRING"]))
            if opts.get("control_after_generate"):
                slots.append(("<control_after_generate>", ["STRING"]))
    return slots


def _check_value(node_type: str, name: str, spec, value) -> str | None:
    kind = "COMBO" if isinstance(spec[0], list) else spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind == "COMBO":
        options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        if not isinstance(value, str):
            return f"{node_type}.{name}: combo value {value!r} is not a string"
        if (node_type, name) not in FILE_COMBOS and value not in options:
            return f"{node_type}.{name}: {value!r} is not one of {options}"
    elif kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            return f"{node_type}.{name}: {value!r} is not a {kind}"
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            return f"{node_type}.{name}: {value} is outside [{opts.get('min')}, {opts.get('max')}]"
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{node_type}.{name}: {value!r} is not a boolean"
    elif kind == "STRING" and not isinstance(value, str):
        return f"{node_type}.{name}: {value!r} is not a string"
    return None


def validate(workflow: dict, object_info: dict) -> list[str]:
    """Every problem found, as readable strings (empty: the workflow is valid)."""
    errors = []
    if workflow.get("version") != 0.4:
        errors.append(f"version is {workflow.get('version')!r}, expected 0.4 (UI format)")
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    if len(nodes) != len(workflow.get("nodes", [])):
        errors.append("node ids are not unique")
    links = {}
    for link in workflow.get("links", []):
        if len(link) != 6:
            errors.append(f"link {link} does not have 6 fields")
            continue
        if link[0] in links:
            errors.append(f"link id {link[0]} is used twice")
        links[link[0]] = link
    for lid, (_, src, src_slot, dst, dst_slot, type_) in links.items():
        if src not in nodes or dst not in nodes:
            errors.append(f"link {lid} joins missing nodes {src} -> {dst}")
            continue
        outs, ins = nodes[src].get("outputs", []), nodes[dst].get("inputs", [])
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            errors.append(f"link {lid} is not listed on output {src_slot} of node {src}")
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
            errors.append(f"link {lid} is not the link of input {dst_slot} of node {dst}")
            continue
        src_type = object_info.get(nodes[src]["type"], {}).get("output", [])
        if src_slot < len(src_type) and type_ != src_type[src_slot]:
            errors.append(f"link {lid} says {type_} but {nodes[src]['type']} output {src_slot} is {src_type[src_slot]}")
        want = ins[dst_slot].get("type")
        info = object_info.get(nodes[dst]["type"])
        if info:
            spec = dict((n, s) for n, s, _ in inputs_in_order(info)).get(ins[dst_slot]["name"])
            want = spec[0] if spec else None
        if want not in (type_, "*"):
            errors.append(f"link {lid}: {type_} into {nodes[dst]['type']}.{ins[dst_slot]['name']} which takes {want}")
    has_output = has_note = False
    for node in nodes.values():
        t = node["type"]
        if t in ("Note", "MarkdownNote"):
            has_note = True
        if t in FRONTEND_ONLY:
            continue
        info = object_info.get(t)
        if info is None:
            errors.append(f"node {node['id']}: unknown node type {t}")
            continue
        has_output |= bool(info.get("output_node"))
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for i in node.get("inputs", []):
            if i.get("link") is not None and i["link"] not in links:
                errors.append(f"node {node['id']} ({t}) input {i['name']} names missing link {i['link']}")
        slots = widget_slots(info)
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            errors.append(f"node {node['id']} ({t}): {len(values)} widget values for {len(slots)} widgets "
                          f"{[n for n, _ in slots]}")
        else:
            for (name, spec), value in zip(slots, values, strict=True):
                if not name.startswith("<"):
                    problem = _check_value(t, name, spec, value)
                    if problem:
                        errors.append(f"node {node['id']}: {problem}")
        for name, spec, required in inputs_in_order(info):
            if required and not is_widget(spec) and name not in linked:
                errors.append(f"node {node['id']} ({t}): required input {name} is not connected")
    if not has_output:
        errors.append("no output node (SaveImage, PreviewImage, ...): ComfyUI would refuse to run it")
    if not has_note:
        errors.append("no Note on the canvas telling the user what to set")
    return errors


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt (``{"id": {"class_type", "inputs"}}``) that the frontend would POST to /prompt."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        inputs = {}
        values = iter(node.get("widgets_values", []))
        for name, _spec in widget_slots(info):
            value = next(values)
            if not name.startswith("<"):
                inputs[name] = value
        for i in node.get("inputs", []):
            if i.get("link") is not None:
                _, src, slot, *_ = links[i["link"]]
                inputs[i["name"]] = [str(src), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
