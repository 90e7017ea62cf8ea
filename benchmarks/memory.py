"""Peak memory of each PSEdit mode, measured through the nodes, and its estimate at a real photo's size.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/memory.py [--family sd15|sdxl] [--sizes 128 256] [--at 512]

Full-size UNet architecture (SD1.5: 860 M parameters, SDXL: 2.6 B; random weights) stored and computed in bf16,
as ComfyUI runs it on a GPU (on the CPU with half-precision kernels), the SD VAE architecture in bf16, the real
TAESD (fp32, as PSEdit runs it) and VGG LPIPS (fp32). Each row is one sampling step (or one null-text step) through
``SamplerCustomAdvanced``, after a warm-up step at the same size.

What is measured: on a GPU, the CUDA allocator's peak above the step's start (the weights are already resident).
On the CPU (where the models sit in RAM from the start), the process's peak resident memory above the step's start
(glibc set to map and unmap every tensor-sized block, so resident memory follows the live tensors):
the activations, saved tensors and per-evaluation weight copies of that step. For the estimate at ``--at`` pixels,
each mode's measured extra memory is fitted as ``a + b * pixels`` over ``--sizes`` and evaluated there (attention
runs through PyTorch's SDPA here as on a GPU, so no term grows with pixels squared), and the bytes of the weights a
GPU holds during that mode (UNet in bf16, decoder, LPIPS) are added. "kept" is what a mode leaves resident once
ComfyUI has unloaded every model (copies made outside ComfyUI's memory management; on the CPU the models' own
weights stay in RAM as ComfyUI's offload device, so they do not count).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys

import torch
from _common import PeakMemory, device_name, table, tiny

GIB = 2**30


def resident_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main() -> None:
    if not torch.cuda.is_available() and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc then maps every tensor-sized block on its own and returns it on free, so the process's resident
        # memory follows the live tensors (its default adaptive threshold keeps freed blocks in the heap)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="measured image sides (pixels)")
    parser.add_argument("--at", type=int, default=None, help="side to estimate at (default: 512 sd15, 1024 sdxl)")
    parser.add_argument("--modes", nargs="+", default=None, help="only these modes (names as in the table)")
    parser.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH)")
    args = parser.parse_args()
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = args.comfyui
    at = args.at or (1024 if args.family == "sdxl" else 512)
    sys.path.insert(0, str(tiny.comfy_path()))
    from comfy.cli_args import args as comfy_args

    comfy_args.use_pytorch_cross_attention = True  # SDPA, as on a GPU (ComfyUI picks sub-quadratic on the CPU)
    tiny.load_pack()
    tiny.register_shared_weights()

    import comfy.model_management as mm
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs
    from psedit_pack.nodes.guidance import PerceptualGuidanceNode, TripleGuiderNode
    from psedit_pack.nodes.inversion import DDIMInvert
    from psedit_pack.nodes.nulltext import NullTextInversion
    from psedit_pack.psedit_core.lpips_loader import get_lpips

    family = args.family
    model = tiny.build_tiny(family, size="full", dtype=torch.bfloat16, std=0.02)
    vae = tiny.random_sd_vae()
    with torch.inference_mode():
        vae.first_stage_model.to(torch.bfloat16)
        vae.vae_dtype = torch.bfloat16
    null, source, edit = (tiny.conditioning(family, s) for s in range(3))
    euler = comfy.samplers.sampler_object("euler")
    unet_w = weight_bytes(model.model.diffusion_model)
    taesd_w = 2.4e6 * 4  # TAESD's decoder, fp32
    vae_w = weight_bytes(vae.first_stage_model.decoder) + weight_bytes(vae.first_stage_model.post_quant_conv)
    lpips_w = weight_bytes(get_lpips("vgg", search_dirs=[tiny.WEIGHTS / "lpips"], allow_download=False))

    def guiders():
        cfg = comfy.samplers.CFGGuider(model)
        cfg.set_conds(edit, null)
        cfg.set_cfg(7.5)
        triple = TripleGuiderNode.execute(model, null, source, edit, 7.5, 3.0)[0]
        out = [("stock CFG", cfg, unet_w), ("Triple Guider", triple, unet_w)]
        for decoder, dw in (("taesd", taesd_w), ("vae", vae_w)):
            for gradient in ("x0", "full"):
                g = PerceptualGuidanceNode.execute(triple, vae, image, 0.1, "vgg", gradient, decoder, "normalized")[0]
                out.append((f"perceptual {decoder} {gradient}", g, unet_w + dw + lpips_w))
        return out

    measured: dict[str, list[tuple[int, float]]] = {}
    weights: dict[str, float] = {}
    kept: dict[str, float] = {}

    def kept_after(before: float) -> float:
        """What the mode left in memory once ComfyUI unloaded every model (copies outside ComfyUI's account)."""
        mm.unload_all_models()
        gc.collect()
        return resident_mb() - before

    for size in args.sizes:
        image = tiny.photo(size)
        with torch.inference_mode():
            latent = {"samples": torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))}
            sigmas = ncs.BasicScheduler().get_sigmas(model, "normal", 10, 1.0)[0][4:6]  # one step, mid-schedule
            rows = guiders()
        for name, guider, w in rows:
            if args.modes and name not in args.modes:
                continue
            step = functools.partial(ncs.SamplerCustomAdvanced().sample, ncs.Noise_EmptyNoise(), guider, euler,
                                     sigmas, latent)
            before = resident_mb()
            with torch.inference_mode():
                step()  # warm-up: loads models, builds caches
                gc.collect()
                with PeakMemory() as mem:
                    step()
            measured.setdefault(name, []).append((size, mem.extra_mb))
            weights[name] = w
            kept[name] = kept_after(before)
            log(f"{family} {size}px {name}: +{mem.extra_mb:.0f} MiB, {kept[name]:.0f} MiB kept after unloading")
        name = "null-text inversion step"
        if not args.modes or name in args.modes:
            before = resident_mb()
            with torch.inference_mode():
                inv = DDIMInvert.execute(model, latent, sigmas, source, 1.0, 0)[1]
                NullTextInversion.execute(model, inv, null, source, 7.5, "null-text", 1, 0.0, 0.01)
                gc.collect()
                with PeakMemory() as mem:
                    NullTextInversion.execute(model, inv, null, source, 7.5, "null-text", 1, 0.0, 0.01)
            measured.setdefault(name, []).append((size, mem.extra_mb))
            weights[name] = unet_w
            kept[name] = kept_after(before)
            log(f"{family} {size}px {name}: +{mem.extra_mb:.0f} MiB, {kept[name]:.0f} MiB kept after unloading")
        mm.unload_all_models()
        gc.collect()

    rows = []
    for name, points in measured.items():
        row = {"name": name, "kept": kept[name], **{f"m{s}": v for s, v in points}}
        if len(points) >= 2:
            (p0, v0), (p1, v1) = points[0], points[-1]
            b = (v1 - v0) / (p1 * p1 - p0 * p0)
            extra = v0 + b * (at * at - p0 * p0)
            row.update(extra=extra, total=(extra * 2**20 + weights[name]) / GIB)
        rows.append(row)
    print(f"device: {device_name()}; {family} full-size UNet in bf16 ({unet_w / GIB:.2f} GiB of weights), one step")
    print(f"extra = memory above the step's start; estimate at {at}x{at} = linear fit in pixels over "
          f"{args.sizes} px + the weights a GPU holds for that mode\n")
    cols = [("name", "mode", "s")] + [(f"m{s}", f"extra at {s} px (MiB)", ".0f") for s in args.sizes]
    cols += [("extra", f"extra at {at} px (MiB, est.)", ".0f"), ("total", f"total at {at} px (GiB, est.)", ".2f"),
             ("kept", f"kept after unloading, {args.sizes[-1]} px (MiB)", ".0f")]
    print(table(rows, cols))


def log(msg: str) -> None:
    print(msg, flush=True)


if __name__ == "__main__":
    main()
