"""The toy model's own quality: does it draw what a caption says, and can inversion give a photo back?

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/toy_quality.py [--n 48] [--recon 8] [--steps 50]

1. Generation (stock CFGGuider, CFG 7.5, euler, ``--steps``): ``--n`` single-object captions with colour x shape
   pairs seen in training (held-in) and ``--n`` with pairs held out of training; the fraction whose largest
   saturated region has the caption's colour, its shape, both, and whose background has the caption's colour
   (``psedit_toy.scenes`` classifiers).
2. Reconstruction of ``--recon`` held-out scenes: PSNR against the photo after the TAESD round trip alone (the
   ceiling), DDIM inversion (refine 2) sampled back at CFG 1, and at CFG 7.5 with the plain null embedding, with
   negative-prompt inversion and with null-text inversion (10 iterations).
"""

from __future__ import annotations

import argparse
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


def generation(world, n: int, steps: int, seed: int, out) -> list[dict]:
    rows = []
    for split, held_out in (("held-in", False), ("held-out", True)):
        rng = np.random.default_rng([seed, 0x6E4, int(held_out)])
        hits = {"colour": 0, "shape": 0, "both": 0, "background": 0}
        for i in range(n):
            scene = S.random_scene(rng, two_objects=0.0, held_out=held_out)
            o = scene.objects[0]
            img = R.generate(world, S.caption(scene), seed=seed * 1000 + i, steps=steps)
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


def reconstruction(world, n: int, steps: int, seed: int) -> list[dict]:
    import comfy.samplers

    s = Settings(steps=steps)
    psnrs: dict[str, list[float]] = {}
    secs: dict[str, list[float]] = {}
    g = nodes().guidance
    for edit in E.make_edits(seed, n):
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
        for name, img in results.items():
            psnrs.setdefault(name, []).append(E.psnr(img, src))
        secs.setdefault("DDIM inversion, CFG 1", []).append(inv.seconds["invert"])
    return [{"method": k, "psnr": float(np.mean(v)), "min": float(np.min(v)),
             "seconds": float(np.mean(secs[k])) if k in secs else None} for k, v in psnrs.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--recon", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_out/toy_quality"), help="sample images go here")
    p.add_argument("--comfyui", default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    world = R.load_world(a.comfyui)
    t = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"# toy model quality, {device_name()}")
    if a.n:
        gen = generation(world, a.n, a.steps, a.seed, a.out)
        print(f"\nGeneration, CFG 7.5, {a.steps} steps:\n")
        print(table(gen, [("split", "captions", "s"), ("n", "n", "d"), ("colour", "colour", ".2f"),
                          ("shape", "shape", ".2f"), ("both", "colour and shape", ".2f"),
                          ("background", "background colour", ".2f")]), flush=True)
    rec = reconstruction(world, a.recon, a.steps, a.seed)
    print(f"\nReconstruction of {a.recon} held-out scenes ({a.steps} steps), PSNR vs the photo (dB):\n")
    print(table(rec, [("method", "method", "s"), ("psnr", "mean PSNR", ".2f"), ("min", "min", ".2f"),
                      ("seconds", "method s/photo", ".1f")]))
    print(f"\ntotal {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
