"""Reconstruction at guidance 7.5: plain DDIM inversion vs negative-prompt vs null-text inversion.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/reconstruction.py [--steps 10 25 50] [--size 64]

Two models, same protocol: invert the source latent with DDIM (guidance 1, no refinement), then sample it back
with CFG at 7.5 on the source prompt (PSEdit Triple Guider with beta = 0), using the plain null embedding, the
negative-prompt schedule, or the optimised null-text schedule. Reported: latent MSE against the source latent,
PSNR of the TAESD-decoded result against the TAESD-decoded source latent (real TAESD weights), the time of the
method (its optimisation; the shared inversion and regeneration are timed separately) and its peak memory.

* analytic: a Gaussian whose mean is linear in a 16-d "text embedding" (closed-form optimal denoiser);
* tiny: a tiny SD1.5-architecture UNet with random weights, run through ComfyUI's nodes on a real photo's
  TAESD latent (needs COMFYUI_PATH; skipped otherwise).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _common import WEIGHTS_NOTE, PeakMemory, device_name, memory_note, table, timed, tiny

from psedit_core.analytic import EmbeddingGaussian
from psedit_core.guidance import cfg
from psedit_core.inversion import ddim_invert, to_eps
from psedit_core.metrics import psnr
from psedit_core.nulltext import negative_prompt_inversion, null_text_inversion

W = 7.5


def karras(n: int, sigma_min=0.0292, sigma_max=14.6146, rho=7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def taesd_decoder():
    vae = tiny.taesd_vae("sd15") if os.environ.get("COMFYUI_PATH") else None
    if vae is None:
        return None
    return lambda z: (vae.first_stage_model.decode(z / 0.18215) + 1) / 2


def analytic_rows(steps, decode):
    g = torch.Generator().manual_seed(0)
    k, hw = 16, 16
    model = EmbeddingGaussian(torch.randn(k, 4 * hw * hw, generator=g) / k**0.5, torch.full((1, 4, hw, hw), 0.7))
    source, null = torch.randn(1, k, generator=g), torch.randn(1, k, generator=g)
    x0 = model.mean(source) + 0.7 * torch.randn(1, 4, hw, hw, generator=g)
    rows = []
    for n in steps:
        sigmas = karras(n)
        inv = ddim_invert(lambda x, s: model.denoiser(x, s, cond=source), x0, sigmas)

        def regenerate(nulls, inv=inv, sigmas=sigmas, n=n):
            x = inv.inverted
            for i in range(n):
                s = sigmas[i].reshape(1)
                d = cfg(model.denoiser(x, s, cond=nulls[i]), model.denoiser(x, s, cond=source), W)
                x = x + (sigmas[i + 1] - sigmas[i]) * to_eps(x, s, d)
            return x

        for method in ("plain DDIM", "negative-prompt", "null-text"):
            r = {"model": "analytic", "steps": n, "method": method}
            with PeakMemory() as mem, timed(r):
                if method == "plain DDIM":
                    nulls = [null] * n
                elif method == "negative-prompt":
                    nulls = negative_prompt_inversion(source, n)
                else:
                    nulls = null_text_inversion(model.denoiser, inv.latents, sigmas, source, null, W,
                                                inner_steps=10, early_stop=1e-5, lr=0.05).nulls
            out = regenerate(nulls)
            r.update(mse=(out - x0).pow(2).mean().item(), peak=mem.peak_mb)
            if decode is not None:
                with torch.no_grad():
                    r["psnr"] = psnr(decode(out).clamp(0, 1), decode(x0).clamp(0, 1)).item()
            rows.append(r)
    return rows


def tiny_rows(steps, size):
    tiny.load_pack()
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs
    from psedit_pack.nodes.guidance import TripleGuiderNode
    from psedit_pack.nodes.inversion import DDIMInvert
    from psedit_pack.nodes.nulltext import NullTextInversion

    model = tiny.build_tiny("sd15")
    vae = tiny.taesd_vae("sd15")
    null, source, edit = (tiny.conditioning("sd15", s) for s in range(3))
    image = tiny.photo(size)
    euler = comfy.samplers.sampler_object("euler")
    rows = []
    with torch.inference_mode():
        latent = {"samples": vae.encode(image)}
        reference = vae.decode(latent["samples"])
    for n in steps:
        with torch.inference_mode():
            sigmas = ncs.BasicScheduler().get_sigmas(model, "normal", n, 1.0)[0]
            t = time.perf_counter()
            inverted, payload = DDIMInvert.execute(model, latent, sigmas, source, 1.0, 0)
            t_inv = time.perf_counter() - t
        for method in ("plain DDIM", "negative-prompt", "null-text"):
            r = {"model": f"tiny SD1.5 ({size}px)", "steps": n, "method": method}
            with PeakMemory() as mem, timed(r), torch.inference_mode():
                schedule = None
                if method != "plain DDIM":
                    schedule = NullTextInversion.execute(model, payload, null, source, W, method, 10, 1e-5, 0.01)[0]
            with torch.inference_mode():
                guider = TripleGuiderNode.execute(model, null, source, edit, W, 0.0, None, schedule)[0]
                out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), guider, euler, sigmas, inverted)[0]
                decoded = vae.decode(out["samples"])
            r.update(mse=(out["samples"] - latent["samples"]).pow(2).mean().item(), peak=mem.peak_mb,
                     psnr=psnr(decoded.movedim(-1, 1), reference.movedim(-1, 1)).item(), inversion=t_inv)
            rows.append(r)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--size", type=int, default=64, help="photo side for the tiny model (latent = size / 8)")
    args = parser.parse_args()
    decode = taesd_decoder()
    rows = analytic_rows(args.steps, decode)
    if os.environ.get("COMFYUI_PATH"):
        rows += tiny_rows(args.steps, args.size)
    print(f"device: {device_name()}; {memory_note()}; guidance {W}; {WEIGHTS_NOTE}\n")
    print(table(rows, [("model", "model", "s"), ("steps", "steps", "d"), ("method", "method", "s"),
                       ("mse", "latent MSE", ".3e"), ("psnr", "decoded PSNR dB", ".2f"),
                       ("seconds", "method time s", ".2f"), ("peak", "method peak MiB", ".1f")]))
    for model_name in dict.fromkeys(r["model"] for r in rows):
        for n in args.steps:
            sel = {r["method"]: r for r in rows if r["model"] == model_name and r["steps"] == n}
            print(f"{model_name}, {n} steps: latent MSE plain / null-text = "
                  f"{sel['plain DDIM']['mse'] / sel['null-text']['mse']:.0f}x, "
                  f"plain / negative-prompt = {sel['plain DDIM']['mse'] / sel['negative-prompt']['mse']:.0f}x")


if __name__ == "__main__":
    main()
