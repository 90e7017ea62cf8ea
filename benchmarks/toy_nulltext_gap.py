"""Why null-text inversion's edits keep less background than plain DDIM inversion's at the same CFG: model or method?

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/toy_nulltext_gap.py [--n 16] [--weights FILE] [--steps 50]

For ``--n`` held-out toy edits (kinds in turn), one DDIM inversion (refine 2) and one null-text inversion (10
iterations) of the source photo, then the edit caption sampled from the inverted latent with plain CFG,
``e = e_null + w (e_edit - e_null)``, for w in ``--cfgs``, once with the empty prompt's embedding as ``null``
(``ddim``) and once with the null-text schedule (``nulltext``); also the source caption (reconstruction). Background
PSNR (outside the true edit region, vs the photo) per arm, mean and 95% bootstrap interval of the per-edit
difference.

At w = 1 the null embedding drops out (``e = e_edit``), so both arms are the same sampling and any gap is zero by
construction; how the gap grows with w, on each model (``--weights`` of the first v1 model and of the v2 model), says
whether it is the method (the optimised null embeddings, tuned to cancel CFG's drift on the *source* caption,
amplify the edit caption's change at every step: a property of null-text + CFG) or one model's quirk.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from _common import device_name, table

from psedit_cli.pipeline import Prepared, Settings, nodes
from psedit_toy import edits as E
from psedit_toy import model as M
from psedit_toy import run as R
from psedit_toy import scenes as S
from psedit_toy import stats


def arm(world, inv: R.Inverted, cond, w: float, schedule) -> np.ndarray:
    """The photo's inverted latent sampled with plain CFG ``w`` on ``cond`` (null = ``schedule`` or the empty
    prompt)."""
    n = nodes().guidance
    p = Prepared(inv.image, inv.sigmas, inv.inverted, inv.null, inv.source, cond, schedule)
    with torch.inference_mode():
        g = n.TripleGuiderNode.execute(world.model, p.null, p.source, p.edit, w, w, None, p.schedule)[0]
    return R.sample(world, inv, g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfgs", type=float, nargs="*", default=[1.0, 3.0, 7.5])
    p.add_argument("--weights", type=Path, default=M.WEIGHTS)
    p.add_argument("--comfyui", default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    world = R.load_world(a.comfyui, weights=a.weights)
    version = M.manifest(a.weights).get("data_version")
    s = Settings(steps=a.steps)
    t0 = time.perf_counter()
    per_edit = []
    for i, edit in enumerate(E.make_edits(a.seed, a.n, version=version)):
        src = S.render(edit.source)[0]
        inv = R.invert(world, src, edit.source_caption, edit.edit_caption, s, methods=("null-text",))
        outside = ~edit.region()
        row = {}
        for w in a.cfgs:
            for name, schedule in (("ddim", None), ("nulltext", inv.schedules["null-text"])):
                row[f"{name}_{w:g}"] = E.psnr(arm(world, inv, inv.edit, w, schedule), src, outside)
        row["recon_nulltext"] = E.psnr(arm(world, inv, inv.source, a.cfgs[-1], inv.schedules["null-text"]), src)
        row["recon_ddim"] = E.psnr(arm(world, inv, inv.source, a.cfgs[-1], None), src)
        per_edit.append(row)
        print(f"edit {i} ({edit.kind}): " + ", ".join(f"{k} {v:.1f}" for k, v in row.items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for w in a.cfgs:
        gap = [r[f"nulltext_{w:g}"] - r[f"ddim_{w:g}"] for r in per_edit]
        lo, hi = stats.bootstrap_ci(gap)
        rows.append({"cfg": w, "ddim": np.mean([r[f"ddim_{w:g}"] for r in per_edit]),
                     "nulltext": np.mean([r[f"nulltext_{w:g}"] for r in per_edit]),
                     "gap": f"{np.mean(gap):+.2f} [{lo:+.2f}, {hi:+.2f}]"})
    print(f"\n# null-text vs plain inversion, edit caption at CFG w: background PSNR (dB); {a.weights.name} "
          f"({version}), {a.n} edits, seed {a.seed}, {a.steps} steps, {device_name()}\n")
    print(table(rows, [("cfg", "CFG w", "g"), ("ddim", "plain inversion", ".2f"), ("nulltext", "null-text", ".2f"),
                       ("gap", "null-text - plain [95% CI]", "s")]))
    recon = {k: np.mean([r[f"recon_{k}"] for r in per_edit]) for k in ("nulltext", "ddim")}
    print(f"\nreconstruction (source caption, CFG {a.cfgs[-1]:g}), whole-image PSNR: null-text "
          f"{recon['nulltext']:.2f}, plain {recon['ddim']:.2f}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
