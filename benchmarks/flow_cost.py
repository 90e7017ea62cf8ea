"""Per-step cost and memory of every flow-model guidance on the full-size SD3.5 Medium and Flux.1 dev architectures,
estimated on a CPU from full-width slices of them (issue 27).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/flow_cost.py [--family sd35 flux] [--size 512]

The full models do not fit a small machine's RAM (Flux.1 dev: 12 B parameters) and one of their steps takes minutes
on a CPU, so each family is built three times at its full width with only a few blocks (random weights, fp32, the
real LPIPS VGG trunk, ComfyUI's TAESD3 / TAEF1 architecture with random weights), every guidance is timed for one
Euler step through the stock SamplerCustomAdvanced as a graph runs it, and its cost is fitted as

    cost = a + b_1 n_1 + b_2 n_2

over the block counts: SD3.5 Medium's blocks with the extra image self-attention (n_1, 13 of them) and without (n_2,
11); Flux's double-stream (n_1, 19) and single-stream blocks (n_2, 38). ``a`` is what does not grow with depth (the
embedders, the decoder and LPIPS of perceptual guidance); the fit evaluated at the real block counts is the estimate
for the full model. Three slices determine the three numbers exactly (no residual to report): (1, 0), (2, 0), (1, 1)
for SD3.5 and (1, 1), (2, 1), (1, 2) for Flux. The same fit gives the parameter count (checked against the published
2.5 B / 12 B) and the step's extra memory: the process's peak resident memory above the step's start (glibc set to
return every tensor-sized block on free), fp32 activations; a GPU in bf16 holds about half of it, plus the weights
(bf16: 2 bytes per parameter).

What transfers to a GPU is the ratio to stock sampling (the model evaluations per step and what perceptual guidance
adds); the seconds are this CPU's. Model evaluations per edit, from the paper's step counts: FlowEdit on SD3.5 runs
n_max = 33 of 50 steps with 4 evaluations each (both captions at real CFG) = 132; on Flux 24 of 28 with 2 = 48.
PSEdit's inversion + Triple Guider on SD3.5: 50 inversion steps (1 evaluation; refine adds its iterations) + 50
sampling steps of 3 = 200; inversion + Flux Guider on Flux: 28 + 28 x 2 = 84.
``benchmarks/step_cost.py --flow sd35 flux --flow-size full`` measures the full models themselves (a GPU's job).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

import numpy as np
import torch
from _common import PeakMemory, device_name, table, timed, tiny

SLICES = {"sd35": [(1, 0), (2, 0), (1, 1)], "flux": [(1, 1), (2, 1), (1, 2)]}
FULL_BLOCKS = {"sd35": (13, 11), "flux": (19, 38)}
BLOCK_NAMES = {"sd35": ("joint blocks with image self-attention", "joint blocks"),
               "flux": ("double-stream blocks", "single-stream blocks")}


def fit(slices: list[tuple[int, int]], values: list[float], full: tuple[int, int]) -> float:
    """Solve ``value = a + b_1 n_1 + b_2 n_2`` on the three slices; evaluate it at the full block counts."""
    design = np.array([[1.0, n1, n2] for n1, n2 in slices])
    coef = np.linalg.solve(design, np.array(values, dtype=np.float64))
    return float(coef @ np.array([1.0, *full]))


def guiders(family: str, model, size: int):
    """(name, guider, uses_flowedit) for every mode on this slice, as the nodes build them."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs
    from psedit_pack.nodes.flowedit import FlowEditFluxGuiderNode, FlowEditGuiderNode
    from psedit_pack.nodes.flux import FluxGuiderNode
    from psedit_pack.nodes.guidance import PerceptualGuidanceNode, TripleGuiderNode

    flux = family == "flux"
    arch = "flux" if flux else "sd3"
    vae = tiny.random_sd3_vae()
    image = tiny.photo(size)
    null, source, edit = (tiny.flow_conditioning(arch, s, guidance=3.5 if flux else None) for s in range(3))

    def perceptual(guider, gradient, step="normalized"):
        return PerceptualGuidanceNode.execute(guider, vae, image, 0.1, "vgg", gradient, "taesd", step)[0]

    if flux:
        stock = ncs.BasicGuider().get_guider(model, edit)[0]
        text = FluxGuiderNode.execute(model, source, edit, 3.5, 1.4)[0]
        flowedit = FlowEditFluxGuiderNode.execute(model, source, edit, 1.5, 5.5, 1, 0, 1, 0)[0]
        named = [("stock BasicGuider (1 evaluation, distilled guidance)", stock, False),
                 ("PSEdit Flux Guider (2)", text, False)]
        fe = "PSEdit FlowEdit Flux Guider (2)"
    else:
        stock = comfy.samplers.CFGGuider(model)
        stock.set_conds(edit, null)
        stock.set_cfg(4.5)
        text = TripleGuiderNode.execute(model, null, source, edit, 4.5, 1.8)[0]
        flowedit = FlowEditGuiderNode.execute(model, null, source, edit, 3.5, 13.5, 1, 0, 1, 0)[0]
        named = [("stock CFG (2 evaluations)", stock, False), ("PSEdit Triple Guider (3)", text, False)]
        fe = "PSEdit FlowEdit Guider (4)"
    short = named[1][0].split(" (")[0]
    named += [(f"{short} + Perceptual (TAESD, x0)", perceptual(text, "x0"), False),
              (f"{short} + Perceptual (TAESD, full)", perceptual(text, "full"), False),
              (fe, flowedit, True),
              (f"{fe.split(' (')[0]} + Perceptual (TAESD, x0, step plain)", perceptual(flowedit, "x0", "plain"), True)]
    return named


def measure(family: str, blocks: tuple[int, int], size: int, repeat: int) -> tuple[float, list[dict]]:
    """Parameters (millions) of this slice and one timed Euler step of each guidance on it, after an untimed
    warm-up of the first three on every slice alike (the fit takes differences between slices, so a first-call
    allocation measured on some slices and not on others would be multiplied into the estimate)."""
    import comfy.model_management as mm
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs

    mm.unload_all_models()  # the previous slice's model leaves before this one's step is measured
    gc.collect()
    arch = "flux" if family == "flux" else "sd3"
    model = tiny.build_tiny_flow(arch, size="full", std=0.02, blocks=blocks)
    params = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
    euler = comfy.samplers.sampler_object("euler")
    with torch.inference_mode():
        latent = {"samples": torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))}
        sigmas = ncs.BasicScheduler().get_sigmas(model, "simple", 4, 1.0)[0][-3:-1]  # one step, mid-schedule
    def step(guider, is_flowedit):
        noise = ncs.Noise_EmptyNoise() if is_flowedit else ncs.Noise_RandomNoise(0)
        with torch.inference_mode():
            ncs.SamplerCustomAdvanced().sample(noise, guider, euler, sigmas, latent)

    named = guiders(family, model, size)
    for _, guider, is_flowedit in named[:3]:  # load LPIPS and the decoder, run the shared code paths once, untimed
        step(guider, is_flowedit)
    rows = []
    for name, guider, is_flowedit in named:
        r = {"name": name}
        for _ in range(repeat):  # the fastest of ``repeat`` (a busy machine), the largest memory
            t = {}
            with PeakMemory() as mem, timed(t):
                step(guider, is_flowedit)
            r["seconds"] = min(r.get("seconds", t["seconds"]), t["seconds"])
            r["extra"] = max(r.get("extra", 0.0), mem.extra_mb)
        rows.append(r)
        print(f"  {family} slice {blocks}: {name}: {r['seconds']:.1f} s, +{r['extra']:.0f} MiB", flush=True)
    return params, rows


def main() -> None:
    if not torch.cuda.is_available() and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc then maps every tensor-sized block on its own and returns it on free (see benchmarks/memory.py)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=["sd35", "flux"], default=["sd35", "flux"])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="time each step this many times and keep the fastest (a busy machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny.load_pack()
    tiny.register_shared_weights()
    import folder_paths

    folder = tempfile.mkdtemp(prefix="psedit-taesd-")
    for name in ("taesd3_decoder", "taef1_decoder"):
        tiny.random_taesd_decoder(folder, name)
    folder_paths.add_model_folder_path("vae_approx", folder)

    for family in args.family:
        slices, full = SLICES[family], FULL_BLOCKS[family]
        measured = [measure(family, blocks, args.size, repeat=args.repeat) for blocks in slices]
        params = fit(slices, [p for p, _ in measured], full)
        rows = []
        for i, name in enumerate(r["name"] for r in measured[0][1]):
            seconds = fit(slices, [m[1][i]["seconds"] for m in measured], full)
            extra = fit(slices, [m[1][i]["extra"] for m in measured], full)
            rows.append({"name": name, "seconds": seconds, "extra": extra / 1024, "bf16": extra / 2048 + params * 2e6
                         / 2**30, "slice": measured[0][1][i]["seconds"]})
        for r in rows:
            r["ratio"] = r["seconds"] / rows[0]["seconds"]
        label = {"sd35": "SD3.5 Medium (MMDiT-X)", "flux": "Flux.1 dev"}[family]
        print(f"\n{label}: estimated from full-width slices {slices} ({BLOCK_NAMES[family][0]}, "
              f"{BLOCK_NAMES[family][1]}) at {full}; {params / 1e3:.2f} B transformer parameters (fit); "
              f"{args.size}x{args.size} image, one euler step; device: {device_name()}, "
              f"{torch.get_num_threads()} thread(s)\n")
        print(table(rows, [("name", "guidance", "s"), ("slice", "s, 1st slice", ".1f"),
                           ("seconds", "s / step, full (est.)", ".0f"), ("ratio", "x stock", ".2f"),
                           ("extra", "extra GiB fp32 (est.)", ".2f"),
                           ("bf16", "GPU GiB bf16: weights + extra/2 (est.)", ".1f")]))


if __name__ == "__main__":
    main()
