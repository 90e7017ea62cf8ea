"""Where does the flow twin lose the shapes it is asked for? Sample with the twin on one side of a switch sigma and
the eps model on the other.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/toy_flow_hybrid.py [--weights FILE] [--n 32] [--seed 1]
        [--switch 0 0.4 0.6 0.8 1.01]

Sampling runs in flow time (the twin's ``simple`` schedule, shift 3, 50 euler steps, CFG 7.5 on both models) from
the same noise for ``--n`` held-in single-object captions of ``--seed``'s stream (``toy_quality.py``'s). At a flow
point ``x = (1 - s) z0 + s eps`` the eps model sees ``x_k = x sqrt(1 + k^2) / sqrt((1 - s)^2 + s^2)`` at its sigma
``k = s / (1 - s)`` (clamped to its 14.6, so ``x_k / sqrt(1 + k^2)`` is exactly what it would see), and its
velocity is ``eps_hat - z0_hat`` with ``z0_hat = (x - s eps_hat) / (1 - s)`` (``psedit_toy.train.Teacher``'s T1;
at ``s >= 0.93`` its own denoised estimate). For each switch ``w``: "twin above w, eps below" and "eps above w, twin
below" (``w = 0``: the twin alone; ``w > 1``: the eps model alone); printed, the fraction of generations whose
object has the caption's shape (``psedit_toy.scenes.classify_object``).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from psedit_cli.pipeline import setup_comfy
from psedit_toy import flow_model as F
from psedit_toy import model as M
from psedit_toy import scenes as S
from psedit_toy import train as T

GAMMA, STEPS, EPS_SIGMA_MAX = 7.5, 50, 14.6


def encode(clip, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token sequences [N, 77, C] and pooled vectors (None for the eps model's CLIP) by the stock CLIPTextEncode."""
    import nodes

    toks, pooled = [], []
    for t in texts:
        c = nodes.CLIPTextEncode().encode(clip, t)[0]
        toks.append(c[0][0])
        pooled.append(c[0][1].get("pooled_output"))
    return torch.cat(toks), (torch.cat(pooled) if pooled[0] is not None else None)


def twin_velocity(model, x, s: float, cond, uncond):
    """The twin's CFG velocity ``(x - denoised) / s``."""
    sv = torch.full((x.shape[0],), s)
    dc = model.apply_model(x, sv, c_crossattn=cond[0], y=cond[1])
    du = model.apply_model(x, sv, c_crossattn=uncond[0], y=uncond[1])
    return (x - (du + GAMMA * (dc - du))) / s


def eps_velocity(model, x, s: float, cond, uncond):
    """The eps model's CFG velocity at the flow point (module docstring)."""
    k = min(s / max(1 - s, 1e-9), EPS_SIGMA_MAX)
    xk = x * (1 + k**2) ** 0.5 / ((1 - s) ** 2 + s**2) ** 0.5
    kt = torch.full((x.shape[0],), k)
    dc = model.apply_model(xk, kt, c_crossattn=cond)
    du = model.apply_model(xk, kt, c_crossattn=uncond)
    d = du + GAMMA * (dc - du)
    eps_hat = (xk - d) / k
    if s < 0.93:  # T1 (its eps model's sigma covers s)
        return T.velocity_from_eps(eps_hat, x, torch.full((x.shape[0],), s))
    return eps_hat - d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(F.WEIGHTS), help="the flow twin's weights")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--switch", type=float, nargs="+", default=[0.0, 0.4, 0.6, 0.8, 1.01])
    p.add_argument("--comfyui", default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    setup_comfy(a.comfyui)
    import comfy.samplers

    fm, fclip, vae = F.load(a.weights)
    em, eclip, _ = M.load()
    rng = np.random.default_rng([a.seed, 0x6E4, 0])
    scenes = [S.random_scene(rng, two_objects=0.0, held_out=False) for _ in range(a.n)]
    caps = [S.caption(s) for s in scenes]
    with torch.inference_mode():
        f_cond, f_uncond = encode(fclip, caps), encode(fclip, [""] * a.n)
        e_cond, e_uncond = encode(eclip, caps)[0], encode(eclip, [""] * a.n)[0]
        sigmas = comfy.samplers.calculate_sigmas(fm.get_model_object("model_sampling"), "simple", STEPS)
        for w in a.switch:
            for twin_high in (True, False):
                if not twin_high and (w <= 0 or w > 1):
                    continue  # the same sampling as the other order
                x = torch.randn(a.n, 4, 16, 16, generator=torch.Generator().manual_seed(0))
                for i in range(STEPS):
                    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
                    if (s > w) == twin_high:
                        v = twin_velocity(fm.model, x, s, f_cond, f_uncond)
                    else:
                        v = eps_velocity(em.model, x, s, e_cond, e_uncond)
                    x = x + (s_next - s) * v
                images = vae.decode(fm.model.latent_format.process_out(x))
                right = sum(S.classify_object((images[j].clamp(0, 1) * 255).round().byte().numpy())[1]
                            == scenes[j].objects[0].shape for j in range(a.n))
                label = f"twin above {w:g}, eps below" if twin_high else f"eps above {w:g}, twin below"
                print(f"{label}: shape right {right / a.n:.2f} ({right} of {a.n})", flush=True)


if __name__ == "__main__":
    main()
