"""DDIM inversion's two step conventions on the trained toy model: round trip at CFG 1 through the nodes.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/toy_inversion.py [--n 8] [--steps 10 50] [--refine 0 1 2]

For ``--n`` held-out scenes: PSEdit DDIM Invert (source caption, CFG 1) with ``convention`` start or target, then
SamplerCustomAdvanced (DisableNoise, euler, the same SIGMAS, CFG 1 on the source caption) back to the photo. Prints
the latent round-trip error (RMS, model space) and the PSNR of the decoded result against the TAESD round trip of
the photo (the ceiling: what a perfect inversion gives), each the mean over the scenes; both conventions cost the
same model calls.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from _common import device_name, table

from psedit_toy import edits as E
from psedit_toy import run as R
from psedit_toy import scenes as S


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    p.add_argument("--refine", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--comfyui", default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    world = R.load_world(a.comfyui)
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs

    from psedit_cli.pipeline import nodes

    invert_node = nodes().inversion.DDIMInvert
    scenes = [S.render(e.source)[0] for e in E.make_edits(a.seed, a.n)]
    captions = [e.source_caption for e in E.make_edits(a.seed, a.n)]
    rows = []
    for steps in a.steps:
        for refine in a.refine:
            for convention in ("start", "target"):
                rms, psnr = [], []
                for rgb, caption in zip(scenes, captions, strict=True):
                    with torch.inference_mode():
                        cond = world.encode(caption)
                        latent = {"samples": world.vae.encode(R.to_image(rgb))}
                        ceiling = R.to_uint8(world.vae.decode(latent["samples"]))
                        sigmas = ncs.BasicScheduler().get_sigmas(world.model, "normal", steps, 1.0)[0]
                        inverted = invert_node.execute(world.model, latent, sigmas, cond, 1.0, refine,
                                                       convention=convention)[0]
                        g = comfy.samplers.CFGGuider(world.model)
                        g.set_conds(cond, cond)
                        g.set_cfg(1.0)
                        out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), g,
                                                                 comfy.samplers.sampler_object("euler"), sigmas,
                                                                 inverted)[0]["samples"]
                        rms.append((out - latent["samples"]).pow(2).mean().sqrt().item() * 0.18215)
                        psnr.append(E.psnr(R.to_uint8(world.vae.decode(out)), ceiling))
                rows.append({"steps": steps, "refine": refine, "convention": convention, "rms": np.mean(rms),
                             "psnr": np.mean(psnr)})
                r = rows[-1]
                print(f"{r['steps']} steps, refine {r['refine']}, {r['convention']}: RMS {r['rms']:.2e}, "
                      f"{r['psnr']:.2f} dB", flush=True)
    print(f"\n{a.n} held-out scenes, CFG 1; {device_name()}\n")
    print(table(rows, [("steps", "steps", "d"), ("refine", "refine", "d"), ("convention", "convention", "s"),
                       ("rms", "latent round-trip RMS", ".2e"), ("psnr", "PSNR vs TAESD ceiling (dB)", ".2f")]))


if __name__ == "__main__":
    main()
