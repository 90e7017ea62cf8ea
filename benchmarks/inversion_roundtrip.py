"""Round-trip error of DDIM inversion, plain vs fixed-point refined, in both step conventions (the prediction at the
step's start, or at its target noise level on the rescaled latent), on the analytic Gaussian model.

    python benchmarks/inversion_roundtrip.py [--steps 10 25 50] [--refine 0 1 3 10]

Prints, per step count and refinement, the RMS error of invert-then-sample against the input latent and the
relative error of the inverted latent against the exact probability-flow ODE map (both have closed forms here).
"""

from __future__ import annotations

import argparse
import time

import torch

from psedit_core.analytic import GaussianData
from psedit_core.inversion import CONVENTIONS, ddim_invert, euler_sample


def karras(n: int, sigma_min=0.0292, sigma_max=14.6146, rho=7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--refine", type=int, nargs="+", default=[0, 1, 3, 10])
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    model = GaussianData(torch.randn(1, 4, 64, 64, generator=g, dtype=torch.float64),
                         0.5 + torch.rand(1, 4, 64, 64, generator=g, dtype=torch.float64))
    x0 = model.sample((1, 4, 64, 64), g)
    print("analytic Gaussian model, latent 1x4x64x64, float64, Karras schedule sigma 14.61 -> 0.029 -> 0")
    print(f"{'steps':>5} {'refine':>6} {'convention':>10} {'round-trip RMS':>15} {'vs exact ODE (rel)':>19} "
          f"{'time s':>7}")
    for n in args.steps:
        sigmas = karras(n)
        exact = model.flow(x0, 0.0, float(sigmas[0]))
        for r in args.refine:
            for convention in CONVENTIONS:
                t = time.perf_counter()
                inv = ddim_invert(model.denoiser, x0, sigmas, refine=r, convention=convention)
                rec = euler_sample(model.denoiser, inv.inverted, sigmas)
                dt = time.perf_counter() - t
                rt = (rec - x0).pow(2).mean().sqrt().item()
                rel = ((inv.inverted - exact).norm() / (exact - model.mu).norm()).item()
                print(f"{n:>5} {r:>6} {convention:>10} {rt:>15.3e} {rel:>19.3e} {dt:>7.3f}")


if __name__ == "__main__":
    main()
