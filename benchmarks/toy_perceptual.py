"""Perceptual guidance on the toy world: what each target, strength, window and loss does to the background, at
what edit success (the knobs of PSEdit Perceptual Guidance, measured against ground truth).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/toy_perceptual.py [--seed 0] [--n 8] [--steps 50]
        [--variants none x0:0.1 noise:0.1 ...] [--out bench_out/toy_perceptual]

Every variant runs on the same ``--n`` held-out edits (``psedit_toy.edits``), each inverted once (DDIM refine 2,
null-text 10 iterations) and edited with the workflow's triple guidance (gamma 7.5, beta 3, window 0-0.4); the
variant sets Perceptual Guidance on top. A variant is ``none`` (triple guidance alone) or
``TARGET:STRENGTH[:key=value...]`` with keys ``window=A-B`` (default 0.2-0.8), ``pixel=W`` (pixel_weight),
``mask=true`` (the ground-truth edit region as the mask), ``net=vgg|alex|squeeze``, ``gradient=x0|full``.
Prints a table (edit success, background PSNR / LPIPS outside the true edit region, whole-image PSNR) and writes
``variants.csv``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

import numpy as np
import torch
from _common import device_name, table

from psedit_cli.pipeline import Settings, nodes
from psedit_toy import edits as E
from psedit_toy import run as R
from psedit_toy import scenes as S
from psedit_toy.model import SHARED_TAESD

DEFAULT_VARIANTS = ["none", "x0:0.1", "x0:0.3", "x0:1", "noise:0.03", "noise:0.1", "noise:0.3", "x0:0.3:pixel=1"]


def parse(variant: str) -> dict | None:
    if variant == "none":
        return None
    target, strength, *rest = variant.split(":")
    spec = {"target": target, "strength": float(strength), "window": (0.2, 0.8), "pixel": 0.0, "mask": False,
            "net": "vgg", "gradient": "x0"}
    for item in rest:
        key, value = item.split("=")
        if key == "window":
            spec["window"] = tuple(float(v) for v in value.split("-"))
        elif key == "pixel":
            spec["pixel"] = float(value)
        elif key == "mask":
            spec["mask"] = value == "true"
        elif key in ("net", "gradient"):
            spec[key] = value
        else:
            raise ValueError(f"unknown key {key!r} in {variant!r}")
    return spec


def guider(world, inv, edit, s: Settings, spec: dict | None):
    g = R.guider("textopt", world, inv, s)
    if spec is None:
        return g
    n = nodes().guidance
    window = n.StepWindowNode.execute(*spec["window"])[0]
    mask = torch.from_numpy(edit.region()).float()[None] if spec["mask"] else None
    return n.PerceptualGuidanceNode.execute(g, world.vae, inv.image, spec["strength"], spec["net"], spec["gradient"],
                                            "taesd", "normalized", spec["pixel"], window=window, mask=mask,
                                            target=spec["target"])[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--out", type=Path, default=Path("bench_out/toy_perceptual"))
    p.add_argument("--comfyui", default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    a.out.mkdir(parents=True, exist_ok=True)
    specs = {v: parse(v) for v in a.variants}
    world = R.load_world(a.comfyui)
    import folder_paths

    nodes()._comfy.register_lpips_dirs([SHARED_TAESD.parent / "lpips"])
    folder_paths.add_model_folder_path("vae_approx", str(SHARED_TAESD))
    metrics = R.Metrics(nodes()._comfy.lpips_search_dirs())
    s = Settings(steps=a.steps)
    rows, t0 = [], time.perf_counter()
    for i, edit in enumerate(E.make_edits(a.seed, a.n)):
        src = S.render(edit.source)[0]
        inv = R.invert(world, src, edit.source_caption, edit.edit_caption, s, methods=("null-text",))
        for variant, spec in specs.items():
            with torch.inference_mode():
                img = R.sample(world, inv, guider(world, inv, edit, s, spec))
            rows.append({"variant": variant, "edit": i, "kind": edit.kind, **metrics.row(edit, src, img)})
        done = rows[-len(specs):]
        print(f"edit {i} ({edit.kind}): " + ", ".join(f"{r['variant']} {int(r['edit_success'])}/{r['bg_psnr']:.1f}"
                                                      for r in done) + f" ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    agg = []
    for variant in specs:
        group = [r for r in rows if r["variant"] == variant]
        agg.append({"variant": variant, **{k: float(np.mean([r[k] for r in group]))
                                            for k in ("edit_success", "bg_psnr", "bg_lpips", "psnr")}})
    with (a.out / "variants.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "edit", "kind", "edit_success", "bg_psnr", "bg_lpips", "psnr",
                                          "lpips"])
        w.writeheader()
        w.writerows(rows)
    print(f"\n{a.n} edits, seed {a.seed}, {a.steps} steps; {device_name()}; {time.perf_counter() - t0:.0f} s\n")
    print(table(agg, [("variant", "variant", "s"), ("edit_success", "edit success", ".2f"),
                      ("bg_psnr", "bg PSNR", ".2f"), ("bg_lpips", "bg LPIPS", ".3f"), ("psnr", "PSNR", ".2f")]))


if __name__ == "__main__":
    main()
