"""Null-text inversion at a real photo's size in fp32, fp16 and bf16: reconstruction and the iterations it runs.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/nulltext_precision.py [--size 512] [--steps 10] [--iters 10]

A tiny SD1.5-architecture UNet (random weights) is built under inference mode with its weights stored in each
precision (half-precision kernels on this device, as a GPU runs them; and fp16 weights with ComfyUI's manual cast
to fp32). A real photo (``--size`` px, TAESD-encoded: a 512-px photo gives the 4x64x64 latent, and so the
gradient sizes, of an SD1.5 edit) is inverted with PSEdit DDIM Invert (CFG 1, refine 2) and regenerated at CFG
7.5 on the source caption (Triple Guider, beta 0) with the plain null embedding and with PSEdit Null-Text
Inversion's schedule. Reported: the relative latent error of each regeneration, the gain, the Adam iterations the
early stop let run (of ``steps x iters``), and the steps whose embedding never moved.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from _common import device_name, table, tiny

CASES = {"fp32": (torch.float32, None), "fp16": (torch.float16, None), "bf16": (torch.bfloat16, None),
         "fp16 + manual cast fp32": (torch.float16, torch.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--comfyui")
    args = parser.parse_args()
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = args.comfyui
    sys.path.insert(0, str(tiny.comfy_path()))
    from comfy.cli_args import args as comfy_args

    comfy_args.use_pytorch_cross_attention = True  # SDPA, as on a GPU (ComfyUI picks sub-quadratic on the CPU)
    tiny.load_pack()
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs
    from psedit_pack.nodes.guidance import TripleGuiderNode
    from psedit_pack.nodes.inversion import DDIMInvert
    from psedit_pack.nodes.nulltext import NullSchedule, run_null_text

    vae = tiny.taesd_vae("sd15")
    if vae is None:
        raise SystemExit("needs the real TAESD files in ../shared/weights")
    c = {n: tiny.conditioning("sd15", s) for s, n in enumerate(("null", "source"))}
    with torch.inference_mode():
        latent = {"samples": vae.encode(tiny.photo(args.size))}

    def regenerate(model, schedule, inverted, sigmas):
        with torch.inference_mode():
            g = TripleGuiderNode.execute(model, c["null"], c["source"], c["source"], 7.5, 0.0, None, schedule)[0]
            out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), g, comfy.samplers.sampler_object("euler"),
                                                     sigmas, inverted)[0]["samples"]
        return ((out.float() - latent["samples"]).norm() / latent["samples"].norm()).item()

    rows = []
    for name, (dtype, cast) in CASES.items():
        model = tiny.build_tiny("sd15", "eps", dtype=dtype, manual_cast=cast)
        with torch.inference_mode():
            sigmas = ncs.BasicScheduler().get_sigmas(model, "normal", args.steps, 1.0)[0]
            inverted, payload = DDIMInvert.execute(model, latent, sigmas, c["source"], 1.0, 2)
            result = run_null_text(model, payload, c["null"], c["source"], 7.5, args.iters, 1e-5, 0.01)
        schedule = NullSchedule(tuple([[phi.detach().cpu(), {}]] for phi in result.nulls), sigmas.cpu(), 7.5,
                                "null-text")
        nulls = [c["null"][0][0]] + [phi.float().cpu() for phi in result.nulls]
        frozen = [i for i in range(args.steps) if (nulls[i + 1] - nulls[i]).abs().max() == 0]
        plain, fitted = regenerate(model, None, inverted, sigmas), regenerate(model, schedule, inverted, sigmas)
        rows.append({"name": name, "plain": plain, "fitted": fitted, "gain": plain / fitted,
                     "iters": f"{sum(result.iterations)} / {args.steps * args.iters}",
                     "frozen": ", ".join(map(str, frozen)) or "none"})
        print(rows[-1], flush=True)
    print(f"\ndevice: {device_name()}; tiny SD1.5 UNet, {args.size}x{args.size} photo (latent "
          f"{tuple(latent['samples'].shape)}), {args.steps} steps, {args.iters} Adam iterations at most per step\n")
    print(table(rows, [("name", "UNet weights", "s"), ("plain", "rel. error, plain null", ".4f"),
                       ("fitted", "rel. error, null-text", ".4f"), ("gain", "gain", ".2f"),
                       ("iters", "Adam iterations run", "s"), ("frozen", "steps never updated", "s")]))


if __name__ == "__main__":
    main()
