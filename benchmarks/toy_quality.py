"""The toy model's own quality: does it draw what a caption says, and can inversion give a photo back?

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/toy_quality.py [--seed 1] [--n 48] [--recon 8] [--steps 50]
        [--out DIR] [--weights FILE] [--model eps|flow]

1. Generation (stock CFGGuider, CFG 7.5, euler, ``--steps``): ``--n`` single-object captions with colour x shape
   pairs seen in training (held-in) and ``--n`` with pairs held out of training; the fraction whose largest
   saturated region has the caption's colour, its shape, both, and whose background has the caption's colour
   (``psedit_toy.scenes`` classifiers), also written to ``DIR/quality.csv`` (``split,colour,shape,both,background``).
   The scenes come from ``--seed``'s stream, never the training set's; noise seeds are ``seed * 1000 + i``.
2. Reconstruction of ``--recon`` held-out scenes: PSNR against the photo after the TAESD round trip alone (the
   ceiling), DDIM inversion (refine 2) sampled back at CFG 1, and at CFG 7.5 with the plain null embedding, with
   negative-prompt inversion and with null-text inversion (10 iterations).

``--model flow`` measures the flow-matching twin (``psedit_toy/weights/toy_sd3.safetensors``; its reconstructions
start from PSEdit Inverted Noise, as the flow workflows do, and its null-text inversion optimises tokens and pooled
vector). ``--weights`` measures another weights file (its manifest, ``<stem>.json`` or
``manifest.json`` beside it, gives the architecture and the world
whose scenes are reconstructed).
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
from psedit_toy import flow_model as F
from psedit_toy import model as M
from psedit_toy import run as R
from psedit_toy import scenes as S

QUALITY_COLUMNS = ("split", "colour", "shape", "both", "background")


def generation(world, n: int, steps: int, seed: int, out, version: str | None = None,
               cfg: float = 7.5) -> list[dict]:
    """Per split (held-in, held-out colour x shape pairs), the fraction of ``n`` generations with the caption's
    colour, shape, both and background colour."""
    rows = []
    for split, held_out in (("held-in", False), ("held-out", True)):
        rng = np.random.default_rng([seed, 0x6E4, int(held_out)])
        hits = {"colour": 0, "shape": 0, "both": 0, "background": 0}
        for i in range(n):
            scene = S.random_scene(rng, two_objects=0.0, held_out=held_out, version=version)
            o = scene.objects[0]
            img = R.generate(world, S.caption(scene), seed=seed * 1000 + i, steps=steps, cfg=cfg)
            colour, shape = S.classify_object(img)
            hits["colour"] += colour == o.colour
            hits["shape"] += shape == o.shape
            hits["both"] += colour == o.colour and shape == o.shape
            hits["background"] += S.classify_background(img) == scene.background
            if i < 8:
                from PIL import Image

                Image.fromarray(img).save(out / f"generated_{split}_{i}.png")
        rows.append({"split": split, "n": n, **{k: v / n for k, v in hits.items()}})
    return rows


def write_quality_csv(rows: list[dict], path: Path) -> None:
    """``split,colour,shape,both,background``: one row per split (held-in, held-out)."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=QUALITY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] if k == "split" else f"{r[k]:.4f}" for k in QUALITY_COLUMNS})


def reconstruction(world, n: int, steps: int, seed: int, version: str | None = None) -> list[dict]:
    import comfy.samplers

    s = Settings(steps=steps)
    psnrs: dict[str, list[float]] = {}
    ious: dict[str, list[float]] = {}  # the object's place and size: what edits.IOU_THRESHOLD is set from
    secs: dict[str, list[float]] = {}
    g = nodes().guidance
    for edit in E.make_edits(seed, n, version=version):
        src = S.render(edit.source)[0]
        inv = R.invert(world, src, edit.source_caption, edit.source_caption, s)
        with torch.inference_mode():
            ceiling = R.to_uint8(world.vae.decode(world.vae.encode(inv.image)))
        results = {"TAESD round trip (ceiling)": ceiling}
        for name, cfg in (("DDIM inversion, CFG 1", 1.0), ("DDIM inversion, CFG 7.5", 7.5)):
            with torch.inference_mode():
                guider = comfy.samplers.CFGGuider(world.model)
                guider.set_conds(inv.source, inv.null)
                guider.set_cfg(cfg)
            results[name] = R.sample(world, inv, guider)
        for method in ("negative-prompt", "null-text"):
            with torch.inference_mode():
                guider = g.TripleGuiderNode.execute(world.model, inv.null, inv.source, inv.source, 7.5, 0.0, None,
                                                    inv.schedules[method])[0]
            results[f"{method} inversion, CFG 7.5"] = R.sample(world, inv, guider)
            secs.setdefault(f"{method} inversion, CFG 7.5", []).append(inv.seconds[method])
        truth = S.render(edit.source)[1][0]
        for name, img in results.items():
            psnrs.setdefault(name, []).append(E.psnr(img, src))
            ious.setdefault(name, []).append(E.iou(E.object_region(img), truth))
        secs.setdefault("DDIM inversion, CFG 1", []).append(inv.seconds["invert"])
    return [{"method": k, "psnr": float(np.mean(v)), "min": float(np.min(v)), "iou": float(np.mean(ious[k])),
             "iou_min": float(np.min(ious[k])), "seconds": float(np.mean(secs[k])) if k in secs else None}
            for k, v in psnrs.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--recon", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale of the generations (the quality bar's is 7.5)")
    p.add_argument("--out", type=Path, default=Path("bench_out/toy_quality"),
                   help="quality.csv and sample images go here")
    p.add_argument("--weights", type=Path, default=None,
                   help="weights file (its manifest beside it; default: the --model's committed file)")
    p.add_argument("--model", choices=("eps", "flow"), default="eps",
                   help="eps: the SD1.5-family model; flow: its SD3-family flow-matching twin")
    p.add_argument("--comfyui", default=None)
    a = p.parse_args()
    a.weights = a.weights or (F.WEIGHTS if a.model == "flow" else M.WEIGHTS)
    logging.basicConfig(level=logging.WARNING)
    world = R.load_world(a.comfyui, weights=a.weights, family=a.model)
    version = M.manifest(a.weights).get("data_version")
    t = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"# toy model quality, {device_name()}, {a.weights} ({version or S.DATA_VERSION}), seed {a.seed}")
    if a.n:
        gen = generation(world, a.n, a.steps, a.seed, a.out, version, a.cfg)
        write_quality_csv(gen, a.out / "quality.csv")
        print(f"\nGeneration, CFG {a.cfg:g}, {a.steps} steps:\n")
        print(table(gen, [("split", "captions", "s"), ("n", "n", "d"), ("colour", "colour", ".2f"),
                          ("shape", "shape", ".2f"), ("both", "colour and shape", ".2f"),
                          ("background", "background colour", ".2f")]), flush=True)
    if a.recon:
        rec = reconstruction(world, a.recon, a.steps, a.seed, version)
        print(f"\nReconstruction of {a.recon} held-out scenes ({a.steps} steps), PSNR vs the photo (dB):\n")
        print(table(rec, [("method", "method", "s"), ("psnr", "mean PSNR", ".2f"), ("min", "min", ".2f"),
                          ("iou", "object IoU", ".3f"), ("iou_min", "min IoU", ".3f"),
                          ("seconds", "method s/photo", ".1f")]))
    print(f"\ntotal {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
