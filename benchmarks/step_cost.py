"""Per-step cost of PSEdit's guidance against stock CFG, and of inversion against one sampling pass.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/step_cost.py [--size 128] [--steps 3]
    COMFYUI_PATH=... python benchmarks/step_cost.py --flow sd35 flux [--flow-size small|full] [--skip-sd15]

``--flow`` adds the same tables for the flow-matching families (issue 11): SD3.5 (stock CFG, Triple Guider,
Perceptual Guidance through TAESD3 or the SD3 VAE) and Flux dev (stock: one prediction at its distilled guidance;
PSEdit Flux Guider: two, source and edit), with random weights. ``--flow-size small`` (the default, for a CPU) scales
the transformers down (SD3: 8 joint blocks, hidden 512; Flux: hidden 512, 2 double + 4 single blocks) and says so in
the header; ``full`` builds SD3.5 Medium (2.5 B) and Flux.1 dev (12 B) themselves, in bf16: a GPU's job. The TAESD3 /
TAEF1 decoders are ComfyUI's TAESD architecture with random weights (the real files cost the same).

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
    parser.add_argument("--flow", nargs="*", choices=["sd35", "flux"], default=[],
                        help="also measure these flow-matching families (after the SD1.5 tables)")
    parser.add_argument("--flow-size", choices=["small", "full"], default="small",
                        help="transformer size for --flow: small (CPU) or full (SD3.5 Medium / Flux.1 dev, bf16)")
    parser.add_argument("--skip-sd15", action="store_true", help="only the --flow tables")
    parser.add_argument("--repeat", type=int, default=1,
                        help="--flow tables: time each row this many times and keep the fastest (a busy machine)")
    args = parser.parse_args()
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = args.comfyui
    tiny.load_pack()
    tiny.register_shared_weights()
    if not args.skip_sd15:
        sd15_tables(args)
    for family in args.flow:
        flow_tables(args, family)


def sd15_tables(args) -> None:
    """The SD1.5 tables (full-size architecture), as before ``--flow`` existed."""
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


def flow_tables(args, family: str) -> None:
    """The per-step and inversion tables for SD3.5 or Flux dev (module docstring)."""
    import tempfile

    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs
    import folder_paths
    from psedit_pack.nodes.flux import FluxGuiderNode
    from psedit_pack.nodes.guidance import PerceptualGuidanceNode, TripleGuiderNode
    from psedit_pack.nodes.inversion import DDIMInvert, InvertedNoiseNode

    flux = family == "flux"
    arch = "flux" if flux else "sd3"
    dtype = torch.bfloat16 if args.flow_size == "full" else torch.float32
    model = tiny.build_tiny_flow(arch, size=args.flow_size, std=0.02, dtype=dtype)
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
    folder = tempfile.mkdtemp(prefix="psedit-taesd-")
    tiny.random_taesd_decoder(folder, "taef1_decoder" if flux else "taesd3_decoder")
    folder_paths.add_model_folder_path("vae_approx", folder)
    vae = tiny.random_sd3_vae()
    image = tiny.photo(args.size)
    null, source, edit = (tiny.flow_conditioning(arch, s, guidance=3.5 if flux else None) for s in range(3))
    euler = comfy.samplers.sampler_object("euler")
    with torch.inference_mode():
        latent = {"samples": torch.randn(1, 16, args.size // 8, args.size // 8,
                                         generator=torch.Generator().manual_seed(0))}
        sigmas = ncs.BasicScheduler().get_sigmas(model, "simple", args.steps, 1.0)[0]
        if flux:
            stock = ncs.BasicGuider().get_guider(model, edit)[0]
            text = FluxGuiderNode.execute(model, source, edit, 3.5, 1.4)[0]
            guiders = [("stock BasicGuider (1 prediction, distilled guidance)", stock),
                       ("PSEdit Flux Guider (2 predictions)", text)]
        else:
            stock = comfy.samplers.CFGGuider(model)
            stock.set_conds(edit, null)
            stock.set_cfg(4.5)
            text = TripleGuiderNode.execute(model, null, source, edit, 4.5, 1.8)[0]
            guiders = [("stock CFG (CFGGuider, 2 predictions)", stock),
                       ("PSEdit Triple Guider (3 predictions)", text)]
        taesd = "TAEF1" if flux else "TAESD3"
        for decoder, name in (("taesd", taesd), ("vae", "SD3/Flux VAE")):
            for gradient in ("x0", "full"):
                g = PerceptualGuidanceNode.execute(text, vae, image, 0.1, "vgg", gradient, decoder, "normalized")[0]
                guiders.append((f"{guiders[1][0].split(' (')[0]} + Perceptual ({name}, {gradient})", g))
        inverted, payload = DDIMInvert.execute(model, latent, sigmas, source, 1.0, 0)
        noise = InvertedNoiseNode.execute(payload)[0]

    def run(guider, steps_sigmas):
        with torch.inference_mode():
            return ncs.SamplerCustomAdvanced().sample(noise, guider, euler, steps_sigmas, inverted)[0]

    def fastest(name, fn) -> dict:
        best = {"name": name}
        for _ in range(max(1, args.repeat)):
            r = {}
            with PeakMemory() as mem, timed(r):
                fn()
            if "seconds" not in best or r["seconds"] < best["seconds"]:
                best["seconds"] = r["seconds"]
            best["peak"] = max(best.get("peak", 0.0), mem.peak_mb)
        return best

    rows = []
    warm = sigmas[-2:]
    for name, guider in guiders:
        run(guider, warm)
        r = fastest(name, lambda guider=guider: run(guider, sigmas))
        r["per_step"] = r["seconds"] / args.steps
        rows.append(r)
    for r in rows:
        r["ratio"] = r["per_step"] / rows[0]["per_step"]

    plain = ncs.BasicGuider().get_guider(model, source)[0]
    run(plain, warm)
    inv_rows = [fastest("one sampling pass (source, 1 prediction)", lambda: run(plain, sigmas))]

    def invert(refine):
        with torch.inference_mode():
            DDIMInvert.execute(model, latent, sigmas, source, 1.0, refine)

    for refine in (0, 2):
        inv_rows.append(fastest(f"PSEdit DDIM Invert, refine {refine}", lambda refine=refine: invert(refine)))
    for r in inv_rows:
        r["ratio"] = r["seconds"] / inv_rows[0]["seconds"]

    label = {"sd35": "SD3.5 (MMDiT-X)", "flux": "Flux.1 dev"}[family]
    print(f"\n{label}, {args.flow_size} size ({n_params:.0f} M transformer parameters, {str(dtype)[6:]}, random "
          f"weights); device: {device_name()}; {memory_note()}")
    print(f"{args.size}x{args.size} image, {args.steps} timed euler steps ('simple') after a 1-step warm-up, from "
          f"PSEdit Inverted Noise, fastest of {max(1, args.repeat)}; random {taesd} and SD3/Flux VAE architecture; "
          "LPIPS vgg\n")
    print(table(rows, [("name", "guidance", "s"), ("per_step", "s / step", ".2f"), ("ratio", "x stock", ".2f"),
                       ("peak", "peak MiB", ".0f")]))
    print()
    print(table(inv_rows, [("name", "pass", "s"), ("seconds", "s", ".2f"), ("ratio", "x one sampling pass", ".2f"),
                           ("peak", "peak MiB", ".0f")]))


if __name__ == "__main__":
    main()
