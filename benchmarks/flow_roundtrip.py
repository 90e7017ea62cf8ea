"""Inversion and reconstruction in the flow-matching parameterisation (SD3 / SD3.5, Flux: ``x = (1 - s) x0 + s eps``)
on the analytic Gaussian models of ``psedit_core.analytic``, whose answers are known in closed form.

    python benchmarks/flow_roundtrip.py [--steps 10 25 50] [--refine 0 3 10] [--shift 3]

Table 1, round trip: DDIM (rectified-flow Euler) inversion, plain vs fixed-point refined, in both step conventions
(``start``; ``target``: the velocity at the target level on the latent unchanged, a flow model's input being the
latent itself), then Euler sampling back; RMS error against the input latent, and the inverted latent against the
exact flow map to sigma 1 (``FlowGaussianData.flow``). Schedule: SD3's ``sigma = shift t / (1 + (shift - 1) t)``.

Table 2, reconstruction at CFG 7.5 (the SD3.5 case: a conditioning of tokens and a pooled vector, with a mean that
depends on both): plain CFG with the empty conditioning, negative-prompt inversion, null-text inversion over the tokens
only and over tokens + pooled vector; RMS error of the regenerated latent against the input, and the time.
"""

from __future__ import annotations

import argparse
import time

import torch

from psedit_core.analytic import EmbeddingFlowGaussian, FlowGaussianData
from psedit_core.inversion import CONVENTIONS, ddim_invert, euler_sample, flow_input_scale, to_eps
from psedit_core.nulltext import negative_prompt_inversion, null_text_inversion


def flow_sigmas(n: int, shift: float) -> torch.Tensor:
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def rms(a: torch.Tensor) -> float:
    return a.pow(2).mean().sqrt().item()


def cfg_sample(model, x, sigmas, nulls, source, w):
    for i in range(sigmas.numel() - 1):
        s = sigmas[i] * x.new_ones([x.shape[0]])
        d_src, d_null = model.denoiser(x, s, cond=source), model.denoiser(x, s, cond=nulls[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * to_eps(x, s, d_null + w * (d_src - d_null))
    return x


def round_trip(args) -> None:
    g = torch.Generator().manual_seed(0)
    model = FlowGaussianData(torch.randn(1, 16, 64, 64, generator=g, dtype=torch.float64),
                             0.5 + torch.rand(1, 16, 64, 64, generator=g, dtype=torch.float64))
    x0 = model.sample((1, 16, 64, 64), g)
    exact = model.flow(x0, 0.0, 1.0)
    print(f"Round trip: analytic Gaussian model in the flow parameterisation, latent 1x16x64x64 (SD3/Flux at 512 px), "
          f"float64, SD3 schedule shift {args.shift:g} from sigma 1 to 0\n")
    print("| steps | refine | convention | round-trip RMS | inverted vs exact flow (RMS) | time s |")
    print("|---|---|---|---|---|---|")
    for n in args.steps:
        sigmas = flow_sigmas(n, args.shift)
        for r in args.refine:
            for convention in CONVENTIONS:
                t = time.perf_counter()
                inv = ddim_invert(model.denoiser, x0, sigmas, refine=r, convention=convention,
                                  input_scale=flow_input_scale)
                rec = euler_sample(model.denoiser, inv.inverted, sigmas)
                dt = time.perf_counter() - t
                print(f"| {n} | {r} | {convention} | {rms(rec - x0):.1e} | {rms(inv.inverted - exact):.1e} | "
                      f"{dt:.2f} |")


def reconstruction(args) -> None:
    g = torch.Generator().manual_seed(1)
    shape = (1, 4, 16, 16)
    size = 4 * 16 * 16
    model = EmbeddingFlowGaussian(torch.randn(8 * 16, size, generator=g, dtype=torch.float64) * 0.1,
                                  0.5 + torch.rand(*shape, generator=g, dtype=torch.float64),
                                  torch.randn(32, size, generator=g, dtype=torch.float64) * 0.1)
    source = (torch.randn(1, 8, 16, generator=g, dtype=torch.float64),
              torch.randn(1, 32, generator=g, dtype=torch.float64))
    null = (torch.zeros(1, 8, 16, dtype=torch.float64), torch.zeros(1, 32, dtype=torch.float64))
    x0 = FlowGaussianData(model.mean(source), model.s).sample(shape, g)
    print(f"\nReconstruction at CFG {args.guidance:g}: analytic flow model whose mean is linear in a token embedding "
          f"(8x16) and a pooled vector (32), latent 1x4x16x16; DDIM inversion refined 10x at CFG 1; null-text: "
          f"{args.inner} Adam iterations per step, lr {args.lr:g}, no early stop\n")
    print("| steps | plain CFG | negative-prompt | null-text, tokens | null-text, tokens + pooled | time s (t / t+p) |")
    print("|---|---|---|---|---|---|")
    for n in args.steps:
        sigmas = flow_sigmas(n, args.shift)
        inv = ddim_invert(lambda x, s: model.denoiser(x, s, cond=source), x0, sigmas, refine=10,
                          input_scale=flow_input_scale)
        plain = cfg_sample(model, inv.inverted, sigmas, [null] * n, source, args.guidance)
        npi = cfg_sample(model, inv.inverted, sigmas, negative_prompt_inversion(source, n), source, args.guidance)
        errors, times = [], []
        for start in (null[0], null):
            t = time.perf_counter()
            r = null_text_inversion(model.denoiser, inv.latents, sigmas, source, start, args.guidance,
                                    inner_steps=args.inner, lr=args.lr, early_stop=0.0, loss_weight=lambda s: 1.0)
            times.append(time.perf_counter() - t)
            nulls = [(p, null[1]) for p in r.nulls] if start is null[0] else list(r.nulls)
            errors.append(rms(cfg_sample(model, inv.inverted, sigmas, nulls, source, args.guidance) - x0))
        print(f"| {n} | {rms(plain - x0):.1e} | {rms(npi - x0):.1e} | {errors[0]:.1e} | {errors[1]:.1e} | "
              f"{times[0]:.1f} / {times[1]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--refine", type=int, nargs="+", default=[0, 3, 10])
    parser.add_argument("--shift", type=float, default=3.0, help="SD3's schedule shift")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--inner", type=int, default=10, help="null-text Adam iterations per step")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    round_trip(args)
    reconstruction(args)


if __name__ == "__main__":
    main()
