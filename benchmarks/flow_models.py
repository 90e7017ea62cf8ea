"""Inversion then sampling on tiny SD3 (MMDiT-X) and Flux dev models in a real ComfyUI (issue 11's acceptance figures).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/flow_models.py [--steps 10 28] [--size 16]

The models are built from ComfyUI's own classes with random weights (tests/host/tiny.py ``build_tiny_flow``), the
latent is random (16 channels), and everything runs through the nodes and the stock SamplerCustomAdvanced with euler
and the 'simple' scheduler, as a graph would. Table 1: relative error of the regenerated latent, plain vs refined
inversion in both conventions, handed over by PSEdit Inverted Noise, against DisableNoise with the inverted LATENT
(the SD1.x/SDXL handover). Table 2: reconstruction where the model is guided: SD3 at CFG 5 (plain, negative-prompt,
null-text over the tokens only or tokens + pooled vector, 10 iterations), Flux through PSEdit Flux Guider at beta 0
(its source branch) and at the paper's beta.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import device_name, table, tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 28])
    parser.add_argument("--size", type=int, default=16, help="latent side (16 = a 128 px image)")
    args = parser.parse_args()
    tiny.load_pack()

    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs
    from psedit_pack.nodes.flux import FluxGuiderNode
    from psedit_pack.nodes.guidance import TripleGuiderNode
    from psedit_pack.nodes.inversion import DDIMInvert, InvertedNoiseNode
    from psedit_pack.nodes.nulltext import NullTextInversion

    euler = comfy.samplers.sampler_object("euler")

    def sample(guider, latent, sigmas, noise):
        with torch.inference_mode():
            return ncs.SamplerCustomAdvanced().sample(noise, guider, euler, sigmas, latent)[0]["samples"]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    rows, guided_rows = [], []
    for family in ("sd3", "flux"):
        model = tiny.build_tiny_flow(family)
        g = 3.5 if family == "flux" else None
        null, source, edit = (tiny.flow_conditioning(family, s, guidance=g) for s in range(3))
        latent = {"samples": torch.randn(1, 16, args.size, args.size, generator=torch.Generator().manual_seed(0))}
        plain = comfy.samplers.CFGGuider(model)
        plain.set_conds(source, source)
        plain.set_cfg(1.0)
        for steps in args.steps:
            with torch.inference_mode():
                sigmas = ncs.BasicScheduler().get_sigmas(model, "simple", steps, 1.0)[0]
            row = {"family": family, "steps": steps}
            for convention in ("start", "target"):
                for refine in (0, 3):
                    with torch.inference_mode():
                        inverted, payload = DDIMInvert.execute(model, latent, sigmas, source, 1.0, refine,
                                                               convention=convention)
                        noise = InvertedNoiseNode.execute(payload)[0]
                    row[f"{convention}{refine}"] = rel(sample(plain, inverted, sigmas, noise), latent["samples"])
            row["disable"] = rel(sample(plain, inverted, sigmas, ncs.Noise_EmptyNoise()), latent["samples"])
            rows.append(row)

        with torch.inference_mode():
            sigmas = ncs.BasicScheduler().get_sigmas(model, "simple", args.steps[0], 1.0)[0]
            inverted, payload = DDIMInvert.execute(model, latent, sigmas, source, 1.0, 3)
            noise = InvertedNoiseNode.execute(payload)[0]
        if family == "sd3":
            def triple(schedule, model=model, null=null, source=source, edit=edit):
                with torch.inference_mode():
                    return TripleGuiderNode.execute(model, null, source, edit, 5.0, 0.0, None, schedule)[0]

            guided_rows.append({"case": "SD3, CFG 5, plain (empty null)", "err": rel(
                sample(triple(None), inverted, sigmas, noise), latent["samples"])})
            for label, method, optimise in (("negative-prompt", "negative-prompt", "all"),
                                            ("null-text, tokens", "null-text", "tokens"),
                                            ("null-text, tokens + pooled", "null-text", "all")):
                t = time.perf_counter()
                with torch.inference_mode():
                    schedule = NullTextInversion.execute(model, payload, null, source, 5.0, method, 10, 1e-5, 0.01,
                                                         optimise=optimise)[0]
                seconds = time.perf_counter() - t
                guided_rows.append({"case": f"SD3, CFG 5, {label}", "seconds": seconds, "err": rel(
                    sample(triple(schedule), inverted, sigmas, noise), latent["samples"])})
        else:
            for beta in (0.0, 1.4):
                with torch.inference_mode():
                    guider = FluxGuiderNode.execute(model, source, edit, 3.5, beta)[0]
                guided_rows.append({"case": f"Flux, Flux Guider guidance 3.5, beta {beta:g}", "err": rel(
                    sample(guider, inverted, sigmas, noise), latent["samples"])})

    print(f"device: {device_name()}; tiny SD3 / Flux dev (random weights, ComfyUI's classes), latent 1x16x{args.size}x"
          f"{args.size}, euler, scheduler 'simple'; relative error of the regenerated latent\n")
    print(table(rows, [("family", "model", "s"), ("steps", "steps", "d"), ("start0", "plain (start)", ".1e"),
                       ("start3", "refine 3 (start)", ".1e"), ("target0", "plain (target)", ".1e"),
                       ("target3", "refine 3 (target)", ".1e"), ("disable", "DisableNoise + LATENT", ".2f")]))
    print(f"\nGuided reconstruction, {args.steps[0]} steps, inversion refined 3x, handed over by PSEdit Inverted "
          "Noise\n")
    print(table(guided_rows, [("case", "case", "s"), ("err", "relative error", ".1e"), ("seconds", "time s", ".1f")]))


if __name__ == "__main__":
    main()
