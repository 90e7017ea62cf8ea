"""Per-step cost of PSEdit's guidance against stock CFG, and of inversion against one sampling pass.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/step_cost.py [--size 128] [--steps 3]

Full-size SD1.5 architecture (UNet and SD VAE) with random weights, the real TAESD from ../shared/weights, all
run through ComfyUI's own SamplerCustomAdvanced exactly as a graph would. Every row is measured in this one run,
on the device named in the header (a GPU when torch sees one). Random weights cost what trained ones do.
"""

from __future__ import annotations

import argparse
import os

import torch
from _common import PeakMemory, device_name, memory_note, table, timed, tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed sampling steps per configuration")
    parser.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH)")
    args = parser.parse_args()
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = args.comfyui
    tiny.load_pack()
    tiny.register_shared_weights()

    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs
    from psedit_pack.nodes.guidance import PerceptualGuidanceNode, TripleGuiderNode
    from psedit_pack.nodes.inversion import DDIMInvert

    model = tiny.build_tiny("sd15", size="full")
    vae_full = tiny.random_sd_vae()
    image = tiny.photo(args.size)
    null, source, edit = (tiny.conditioning("sd15", s) for s in range(3))
    euler = comfy.samplers.sampler_object("euler")

    with torch.inference_mode():
        latent = {"samples": torch.randn(1, 4, args.size // 8, args.size // 8,
                                         generator=torch.Generator().manual_seed(0))}
        sigmas = ncs.BasicScheduler().get_sigmas(model, "normal", args.steps, 1.0)[0]
        cfg = comfy.samplers.CFGGuider(model)
        cfg.set_conds(edit, null)
        cfg.set_cfg(7.5)
        triple = TripleGuiderNode.execute(model, null, source, edit, 7.5, 3.0)[0]
        dual = ncs.DualCFGGuider().get_guider(model, edit, source, null, 3.0, 7.5, "regular")[0]
        guiders = [("stock CFG (CFGGuider, 2 predictions)", cfg), ("stock DualCFGGuider (3 predictions)", dual),
                   ("PSEdit Triple Guider (3 predictions)", triple)]
        for decoder, vae in (("taesd", None), ("vae", vae_full)):
            for gradient in ("x0", "full"):
                g = PerceptualGuidanceNode.execute(triple, vae, image, 0.1, "vgg", gradient, decoder, "normalized")[0]
                guiders.append((f"Triple + Perceptual ({'SD VAE' if decoder == 'vae' else 'TAESD'}, {gradient})", g))

    def run(guider, steps_sigmas):
        with torch.inference_mode():
            return ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), guider, euler, steps_sigmas, latent)[0]

    rows = []
    warm = sigmas[-2:]  # one step: loads the models and builds caches (VAE copies, LPIPS)
    for name, guider in guiders:
        run(guider, warm)
        r = {"name": name}
        with PeakMemory() as mem, timed(r):
            run(guider, sigmas)
        r.update(per_step=r["seconds"] / args.steps, peak=mem.peak_mb)
        rows.append(r)
    base = rows[0]["per_step"]
    for r in rows:
        r["ratio"] = r["per_step"] / base

    inv_rows = []
    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(source, null)
    plain.set_cfg(1.0)
    run(plain, warm)
    r = {"name": "one sampling pass (CFG 1)"}
    with PeakMemory() as mem, timed(r):
        run(plain, sigmas)
    r["peak"] = mem.peak_mb
    inv_rows.append(r)
    for refine in (0, 2):
        r = {"name": f"PSEdit DDIM Invert, refine {refine}"}
        with PeakMemory() as mem, timed(r), torch.inference_mode():
            DDIMInvert.execute(model, latent, sigmas, source, 1.0, refine)
        r["peak"] = mem.peak_mb
        inv_rows.append(r)
    for r in inv_rows:
        r["ratio"] = r["seconds"] / inv_rows[0]["seconds"]

    print(f"device: {device_name()}; {memory_note()}")
    print(f"full-size SD1.5 UNet + SD VAE (random weights), real TAESD; {args.size}x{args.size} image, "
          f"{args.steps} timed euler steps after a 1-step warm-up; LPIPS vgg for perceptual guidance\n")
    print(table(rows, [("name", "guidance", "s"), ("per_step", "s / step", ".2f"), ("ratio", "x stock CFG", ".2f"),
                       ("peak", "peak MiB", ".0f")]))
    print()
    print(table(inv_rows, [("name", "pass", "s"), ("seconds", "s", ".2f"), ("ratio", "x one sampling pass", ".2f"),
                           ("peak", "peak MiB", ".0f")]))


if __name__ == "__main__":
    main()
