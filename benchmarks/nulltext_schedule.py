"""Null-text inversion's learning-rate schedule and the workflows' scheduler, measured on the trained toy model.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/nulltext_schedule.py [--n 4] [--steps 10 20 50]

For ``--n`` held-out toy scenes (their source captions), each of ``--steps`` and each scheduler the workflows could
use (``normal``, which starts at sigma_max like ComfyUI's default, and ``ddim_uniform``, the reference code's
timesteps), the photo is DDIM-inverted (refine 2, as the workflows), null-text inversion (10 Adam iterations per
step, early stop 1e-5, lr 1e-2) run with each learning-rate schedule (``reference``: the reference code's
``lr (1 - i / 100)``; ``relative``: PSEdit's earlier ``lr (1 - i / (2 n))``), and the photo reconstructed at CFG 7.5.
Prints the mean PSNR of the reconstruction against the photo (dB) per row, and the mean seconds of null-text
inversion.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from _common import device_name, table

from psedit_cli.pipeline import Settings, nodes
from psedit_toy import edits as E
from psedit_toy import run as R
from psedit_toy import scenes as S

SCHEDULERS = ("normal", "ddim_uniform")
LR_SCHEDULES = ("reference", "relative")


def reconstruct(world, rgb: np.ndarray, caption: str, steps: int, scheduler: str) -> dict:
    """``{lr schedule: (PSNR dB, null-text seconds)}`` for one photo."""
    n = nodes()
    s = Settings(steps=steps, scheduler=scheduler)
    inv = R.invert(world, rgb, caption, caption, s, methods=())
    out = {}
    for lr_schedule in LR_SCHEDULES:
        with torch.inference_mode():
            t = time.perf_counter()
            schedule = n.nulltext.NullTextInversion.execute(world.model, inv.payload, inv.null, inv.source, 7.5,
                                                           "null-text", 10, 1e-5, 0.01,
                                                           lr_schedule=lr_schedule)[0]
            seconds = time.perf_counter() - t
            guider = n.guidance.TripleGuiderNode.execute(world.model, inv.null, inv.source, inv.source, 7.5, 7.5,
                                                         None, schedule)[0]
        out[lr_schedule] = (E.psnr(R.sample(world, inv, guider), rgb), seconds)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4, help="held-out scenes")
    p.add_argument("--steps", type=int, nargs="*", default=[10, 20, 50])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--comfyui", default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    world = R.load_world(a.comfyui)
    results: dict = {}
    start = time.perf_counter()
    for edit in E.make_edits(a.seed, a.n):
        rgb = S.render(edit.source)[0]
        for steps in a.steps:
            for scheduler in SCHEDULERS:
                for lr_schedule, value in reconstruct(world, rgb, edit.source_caption, steps, scheduler).items():
                    results.setdefault((steps, scheduler, lr_schedule), []).append(value)
    rows = [{"steps": k[0], "scheduler": k[1], "lr": k[2], "psnr": float(np.mean([v[0] for v in vals])),
             "min": float(np.min([v[0] for v in vals])), "seconds": float(np.mean([v[1] for v in vals]))}
            for k, vals in sorted(results.items())]
    print(table(rows, [("steps", "steps", "d"), ("scheduler", "scheduler", "s"), ("lr", "lr schedule", "s"),
                       ("psnr", "PSNR dB (mean)", ".2f"), ("min", "PSNR dB (min)", ".2f"),
                       ("seconds", "null-text s", ".1f")]))
    print(f"\n{a.n} held-out scenes (seed {a.seed}), CFG 7.5, 10 Adam iterations per step; {device_name()}; "
          f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
