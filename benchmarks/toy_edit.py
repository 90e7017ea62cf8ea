"""The paper's table on the toy world: edits with ground truth, on the trained toy model, through the nodes.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/toy_edit.py [--seed 0] [--n 8] [--out bench_out/toy_edit]

For ``--n`` held-out scenes and edits (colour, shape, background, toward an unseen colour x shape pair, in turn;
``psedit_toy.edits``), every row below shares one DDIM inversion (refine 2) of the source photo's TAESD latent
and the workflow defaults (50 steps, gamma 7.5, beta 3, text window 0-0.4, perceptual strength 1.0 normalized
in 0.2-0.8, vgg LPIPS through TAESD, 10 null-text iterations):

| config | what runs |
|---|---|
| ddim_cfg | plain DDIM inversion, CFG 7.5 on the edit caption |
| nulltext | null-text inversion, CFG 7.5 on the edit caption (the paper's "Null-text" row) |
| textopt | + triple guidance in the text window ("Text optimization") |
| perceptual_x0 / perceptual_full | + perceptual guidance, x0 / full gradient ("Perceptual Similarity + text opt.") |
| masked_estimated / masked_true | + perceptual guidance outside PSEdit Edit Mask's estimate / the true edit region |
| negprompt | the perceptual_x0 row with negative-prompt inversion in place of null-text |

Metrics per row (means over the edits): edit_success (the target attribute is reached, by the scene
classifiers), PSNR and LPIPS (AlexNet) outside the ground-truth edit region and over the whole image, both
against the source photo; mask_iou of the estimated Edit Mask with the true region; seconds per edit (inversion,
null-text or negative-prompt, mask estimate and sampling: what that row costs from the photo). Writes
``table.csv`` / ``table.md`` (one row per config), ``edits.csv`` (one row per edit and config), a grid PNG per
edit, and unless ``--sweep-n 0`` a sweep over beta and perceptual strength (target x0, and target latent) on the
first edits (``sweep.csv``, ``sweep.png``: edit success against preserved-background PSNR).
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

import numpy as np
import torch
from _common import device_name, table

from psedit_cli.pipeline import Settings
from psedit_core.perceptual import TARGETS
from psedit_toy import edits as E
from psedit_toy import run as R
from psedit_toy import scenes as S
from psedit_toy.model import SHARED_TAESD

COLUMNS = ["config", "edit_success", "bg_psnr", "bg_lpips", "psnr", "lpips", "mask_iou", "seconds"]
BETAS = (0.0, 1.0, 2.0, 3.0, 5.0, 7.5)
STRENGTHS = (0.1, 0.3, 1.0, 3.0)
LATENT_STRENGTHS = (0.03, 0.1, 0.3)  # target "latent": the latent moves this far (RMS) every window step


def run_row(world, inv, edit, config, s, metrics, src, masks, extra_seconds, target="x0"):
    from psedit_toy import control_rows as CR

    t = time.perf_counter()
    inv = CR.inversion_for(config, world, inv, s)
    g = row_guider(config, world, inv, edit, s, masks, target)
    img = R.sample(world, inv, g)
    row = metrics.row(edit, src, img)
    row["seconds"] = time.perf_counter() - t + extra_seconds
    return row, img


# --- Prompt-to-Prompt and Plug-and-Play rows (issue 10) --------------------------------------------------------------
# Opt-in: --configs p2p_replace p2p_refine pnp p2p_replace+perceptual p2p_refine+perceptual pnp+perceptual (and
# p2p_replace_noblend / p2p_refine_noblend). psedit_toy/control_rows.py says what each runs; the node time (the local
# blend's probe) counts in the row's seconds.

def row_guider(config, world, inv, edit, s, masks, target):
    """The GUIDER of one row: a control row from psedit_toy.control_rows, else the table's own rows."""
    from psedit_toy import control_rows as CR

    if config.split("+")[0].startswith(("p2p_", "pnp")):
        return CR.guider(config, world, inv, edit, s, target=target)
    return R.guider(config, world, inv, s, mask=masks.get(config), target=target)


# --- end of the control rows ---------------------------------------------------------------------------------------


def mean_rows(rows: list[dict], key: str) -> list[dict]:
    out = []
    for name in dict.fromkeys(r[key] for r in rows):
        group = [r for r in rows if r[key] == name]
        agg = {key: name}
        for c in COLUMNS[1:]:
            vals = [r[c] for r in group if r.get(c) is not None]
            agg[c] = float(np.mean(vals)) if vals else None
        out.append(agg)
    return out


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r[c], float) else r[c]))
                        for c in columns})


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for family, marker in (("beta", "o"), ("strength", "s"), ("latent strength", "^")):
        pts = [r for r in rows if r["family"] == family]
        if not pts:
            continue
        ax.plot([r["bg_psnr"] for r in pts], [r["edit_success"] for r in pts], marker=marker,
                label={"beta": "triple guidance: beta (no perceptual)",
                       "strength": "perceptual strength, target x0 (beta 3)",
                       "latent strength": "perceptual strength, target latent (beta 3)"}[family])
        for r in pts:
            ax.annotate(f"{r['value']:g}", (r["bg_psnr"], r["edit_success"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("background PSNR vs the photo, dB (outside the true edit region)")
    ax.set_ylabel("edit success (fraction)")
    ax.set_title("Toy world: edit strength vs what is kept")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="which held-out scenes and edits")
    p.add_argument("--n", type=int, default=8, help="how many edits (kinds in turn)")
    p.add_argument("--out", type=Path, default=Path("bench_out/toy_edit"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sweep-n", type=int, default=4, help="edits in the beta/strength sweep (0: no sweep)")
    p.add_argument("--configs", nargs="*", default=list(R.CONFIGS))
    p.add_argument("--perceptual-target", choices=list(TARGETS), default="x0",
                   help="Perceptual Guidance's target (the node's default is x0)")
    p.add_argument("--comfyui", default=None)
    a = p.parse_args()
    if a.sweep_n > 0:
        try:
            import matplotlib  # noqa: F401  (the sweep's plot; checked before an hour of sampling)
        except ImportError:
            p.error("the sweep plot needs matplotlib: pip install matplotlib (or pass --sweep-n 0)")
    logging.basicConfig(level=logging.WARNING)
    a.out.mkdir(parents=True, exist_ok=True)
    world = R.load_world(a.comfyui)
    import folder_paths

    from psedit_cli.pipeline import nodes

    nodes()._comfy.register_lpips_dirs([SHARED_TAESD.parent / "lpips"])  # ../shared/weights, then models/lpips
    lpips_dirs = nodes()._comfy.lpips_search_dirs()
    folder_paths.add_model_folder_path("vae_approx", str(SHARED_TAESD))
    metrics = R.Metrics(lpips_dirs)
    s = Settings(steps=a.steps)
    print(f"# toy_edit: {a.n} edits, seed {a.seed}, {a.steps} steps, perceptual target {a.perceptual_target}, "
          f"{device_name()}")
    rows, sweep_rows = [], []
    t_all = time.perf_counter()
    for i, edit in enumerate(E.make_edits(a.seed, a.n)):
        src = S.render(edit.source)[0]
        inv = R.invert(world, src, edit.source_caption, edit.edit_caption, s)
        t = time.perf_counter()
        est = R.edit_mask(world, inv)
        mask_seconds = time.perf_counter() - t
        truth = torch.from_numpy(edit.region()).float()[None]
        masks = {"masked_estimated": est, "masked_true": truth}
        iou = E.iou(est[0].numpy() > 0.5, edit.region())
        images = [src, S.render(edit.target)[0]]
        for config in a.configs:
            method = "negative-prompt" if config == "negprompt" else (None if config == "ddim_cfg" else "null-text")
            extra = inv.seconds["invert"] + (inv.seconds[method] if method else 0.0)
            extra += mask_seconds if config == "masked_estimated" else 0.0
            row, img = run_row(world, inv, edit, config, s, metrics, src, masks, extra, a.perceptual_target)
            row.update(config=config, edit=i, kind=edit.kind, source=edit.source_caption, target=edit.edit_caption,
                       mask_iou=iou if config == "masked_estimated" else None)
            rows.append(row)
            images.append(img)
        from PIL import Image

        Image.fromarray(np.concatenate(images, axis=1)).save(a.out / f"edit_{i:02d}_{edit.kind}.png")
        print(f"edit {i} ({edit.kind}: {edit.source_caption!r} -> {edit.edit_caption!r}) "
              f"success {[int(r['edit_success']) for r in rows[-len(a.configs):]]} "
              f"mask IoU {iou:.2f} ({time.perf_counter() - t_all:.0f} s)", flush=True)
        if i < a.sweep_n:
            variants = [("beta", b, "textopt", Settings(steps=a.steps, beta=b), a.perceptual_target) for b in BETAS]
            variants += [("strength", v, "perceptual_x0", Settings(steps=a.steps, strength=v), a.perceptual_target)
                         for v in STRENGTHS]
            variants += [("latent strength", v, "perceptual_x0", Settings(steps=a.steps, strength=v), "latent")
                         for v in LATENT_STRENGTHS]
            for family, value, config, sv, target in variants:
                row, _ = run_row(world, inv, edit, config, sv, metrics, src, masks, 0.0, target)
                row.update(family=family, value=value, edit=i)
                sweep_rows.append(row)
    table_rows = mean_rows(rows, "config")
    write_csv(a.out / "table.csv", table_rows, COLUMNS)
    write_csv(a.out / "edits.csv", rows, ["edit", "kind", "source", "target", *COLUMNS])
    md = table(table_rows, [("config", "config", "s"), ("edit_success", "edit success", ".2f"),
                            ("bg_psnr", "bg PSNR", ".2f"), ("bg_lpips", "bg LPIPS", ".3f"), ("psnr", "PSNR", ".2f"),
                            ("lpips", "LPIPS", ".3f"), ("mask_iou", "mask IoU", ".2f"), ("seconds", "s/edit", ".1f")])
    kinds = sorted({r["kind"] for r in rows})
    by_kind = table([{"config": c, **{k: np.mean([r["edit_success"] for r in rows if r["config"] == c
                                                  and r["kind"] == k]) for k in kinds}} for c in a.configs],
                    [("config", "config", "s"), *[(k, k, ".2f") for k in kinds]])
    text = (f"{md}\n\nEdit success by kind:\n\n{by_kind}\n\n{a.n} edits, seed {a.seed}, {a.steps} steps; "
            f"{device_name()}; total {time.perf_counter() - t_all:.0f} s\n")
    if sweep_rows:
        agg = []
        for family in dict.fromkeys(r["family"] for r in sweep_rows):
            for value in dict.fromkeys(r["value"] for r in sweep_rows if r["family"] == family):
                group = [r for r in sweep_rows if r["family"] == family and r["value"] == value]
                agg.append({"family": family, "value": value,
                            **{c: float(np.mean([g[c] for g in group])) for c in ("edit_success", "bg_psnr",
                                                                                   "bg_lpips", "psnr")}})
        write_csv(a.out / "sweep.csv", agg, ["family", "value", "edit_success", "bg_psnr", "bg_lpips", "psnr"])
        plot_sweep(agg, a.out / "sweep.png")
        text += "\nSweep (first {} edits):\n\n{}\n".format(a.sweep_n, table(
            agg, [("family", "knob", "s"), ("value", "value", "g"), ("edit_success", "edit success", ".2f"),
                  ("bg_psnr", "bg PSNR", ".2f"), ("bg_lpips", "bg LPIPS", ".3f"), ("psnr", "PSNR", ".2f")]))
    (a.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
