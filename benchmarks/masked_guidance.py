"""Localised perceptual guidance: inside/outside-the-edit LPIPS and PSNR for no, whole-image and masked guidance.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/masked_guidance.py [--size 256] [--strength 0.03]

* analytic: the edit model moves a known box far (the edit) and everything a little (background drift); a fixed
  linear decoder; pixel-MSE guidance. "To the edit" compares the inside with the edit model's mean.
* tiny: a tiny SD1.5 UNet (random weights) through ComfyUI's nodes on a real photo's TAESD latent, real TAESD and
  LPIPS (vgg guides, alex measures); the edit region is the left half; "to the edit" compares the inside with
  the unguided result. Needs COMFYUI_PATH and ../shared/weights.
All rows come from this one run.
"""

from __future__ import annotations

import argparse
import os

import torch
from _common import device_name, table, tiny

from psedit_core.analytic import GaussianData
from psedit_core.inversion import ddim_invert, euler_sample
from psedit_core.masks import masked_perceptual_loss
from psedit_core.perceptual import PerceptualGuidanceConfig, perceptual_guidance


def masked_psnr(a, b, m):
    return (10 * torch.log10(m.sum() * a.shape[1] / ((a - b).pow(2) * m).sum())).item()


def analytic_rows(strength: float):
    g = torch.Generator().manual_seed(0)
    h = 16
    region = torch.zeros(1, 1, h, h)
    region[..., 4:12, 4:12] = 1
    z_src = torch.randn(1, 4, h, h, generator=g)
    edit_mu = z_src + 2.0 * torch.randn(1, 4, h, h, generator=g) * region + 0.3 * torch.randn(1, 4, h, h, generator=g)
    s = torch.full((1, 4, h, h), 0.3)
    weight = torch.randn(3, 4, 1, 1, generator=g) * 0.5

    def decode(z):
        return torch.sigmoid(torch.nn.functional.conv2d(z, weight))

    ramp = torch.linspace(0, 1, 20)
    sigmas = torch.cat([(14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7, torch.zeros(1)])
    x_T = ddim_invert(GaussianData(z_src, s).denoiser, z_src, sigmas, refine=5).inverted
    src_img, edit_img = decode(z_src), decode(edit_mu)
    rows = []
    for name, edit_region in (("none", None), ("whole image", torch.zeros_like(region)), ("masked", region)):
        d = GaussianData(edit_mu, s).denoiser
        if edit_region is not None:
            loss = masked_perceptual_loss(None, src_img, edit_region, pixel_weight=1.0)
            d = perceptual_guidance(d, decode, loss, PerceptualGuidanceConfig(strength, step="normalized"))
        img = decode(euler_sample(d, x_T, sigmas))
        rows.append({"model": "analytic (pixel MSE)", "guidance": name,
                     "psnr_out": masked_psnr(img, src_img, 1 - region), "psnr_in": masked_psnr(img, src_img, region),
                     "psnr_in_edit": masked_psnr(img, edit_img, region)})
    return rows


def tiny_rows(size: int, strength: float):
    tiny.load_pack()
    tiny.register_shared_weights()
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs
    from psedit_pack.nodes.guidance import PerceptualGuidanceNode, TripleGuiderNode
    from psedit_pack.nodes.inversion import DDIMInvert
    from psedit_pack.psedit_core.lpips_loader import get_lpips

    model, vae = tiny.build_tiny("sd15"), tiny.taesd_vae("sd15")
    null, source, edit = (tiny.conditioning("sd15", s) for s in range(3))
    image = tiny.photo(size)
    half = size // 2
    region = torch.zeros(1, size, size)
    region[:, :, :half] = 1
    alex = get_lpips("alex", search_dirs=[tiny.WEIGHTS / "lpips"], spatial=True)
    with torch.inference_mode():
        latent = {"samples": vae.encode(image)}
        sigmas = ncs.BasicScheduler().get_sigmas(model, "normal", 10, 1.0)[0]
        inverted, _ = DDIMInvert.execute(model, latent, sigmas, source, 1.0, 2)
        triple = TripleGuiderNode.execute(model, null, source, edit, 7.5, 3.0)[0]
        guiders = {"none": triple,
                   "whole image": PerceptualGuidanceNode.execute(triple, vae, image, strength, "vgg", "x0", "taesd",
                                                                 "normalized")[0],
                   "masked": PerceptualGuidanceNode.execute(triple, vae, image, strength, "vgg", "x0", "taesd",
                                                            "normalized", mask=region)[0]}
    src = image.movedim(-1, 1)
    inside = region[:, None]
    rows, unguided = [], None
    for name, guider in guiders.items():
        with torch.inference_mode():
            out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), guider,
                                                     comfy.samplers.sampler_object("euler"), sigmas, inverted)[0]
            img = vae.decode(out["samples"]).movedim(-1, 1)
            d = alex(img * 2 - 1, src * 2 - 1)
        unguided = img if unguided is None else unguided
        rows.append({"model": f"tiny SD1.5 + TAESD ({size}px, LPIPS)", "guidance": name,
                     "lpips_in": d[..., :half].mean().item(), "lpips_out": d[..., half:].mean().item(),
                     "psnr_in": masked_psnr(img, src, inside), "psnr_out": masked_psnr(img, src, 1 - inside),
                     "psnr_in_edit": masked_psnr(img, unguided, inside)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--strength", type=float, default=0.03, help="normalised step for the tiny model")
    args = parser.parse_args()
    rows = analytic_rows(0.05)
    if os.environ.get("COMFYUI_PATH"):
        rows += tiny_rows(args.size, args.strength)
    print(f"device: {device_name()}\n")
    print(table(rows, [("model", "model", "s"), ("guidance", "guidance", "s"),
                       ("lpips_in", "LPIPS inside (to source)", ".4f"), ("lpips_out", "LPIPS outside", ".4f"),
                       ("psnr_in", "PSNR inside dB (to source)", ".2f"), ("psnr_out", "PSNR outside dB", ".2f"),
                       ("psnr_in_edit", "PSNR inside dB (to the edit)", ".2f")]))


if __name__ == "__main__":
    main()
