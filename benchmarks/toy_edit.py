"""The paper's table on the toy world: edits with ground truth, on the trained toy model, through the nodes.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/toy_edit.py [--seed 0] [--n 32] [--jobs 2] [--out DIR]

For ``--n`` held-out scenes and edits (colour, shape, background, toward an unseen colour x shape pair, in turn;
``psedit_toy.edits``), every row below shares one DDIM inversion (refine 2) of the source photo's TAESD latent and
the workflow defaults (50 steps, gamma 7.5, beta 3, text window 0-0.4, perceptual strength 1 with the x0 gradient or
3 with full, normalized, in 0.2-0.8, LPIPS through TAESD, 10 null-text iterations), except Perceptual Guidance's
LPIPS trunk: squeeze, not the workflows' vgg (``--lpips-net vgg``), at 24 ms a call instead of 344 ms (128 px, one
thread), called forward and backward at 30 of each perceptual row's 50 steps. ``benchmarks/lpips_trunks.py`` on the
256 results of the first 32-edit table: squeeze orders them as vgg does at Spearman 0.92 over all results and 0.78
within an edit, alex at 0.82 and 0.63 (that table ran with alex, chosen from 8 edits where the two were even):

| config | what runs |
|---|---|
| ddim_cfg | plain DDIM inversion, CFG 7.5 on the edit caption |
| nulltext | null-text inversion, CFG 7.5 on the edit caption (the paper's "Null-text" row) |
| textopt | + triple guidance in the text window ("Text optimization") |
| perceptual_x0 / perceptual_full | + perceptual guidance, x0 / full gradient ("Perceptual Similarity + text opt.") |
| masked_estimated / masked_true | + perceptual guidance outside PSEdit Edit Mask's estimate / the true edit region |
| negprompt | the perceptual_x0 row with negative-prompt inversion in place of null-text |
| flowedit (+perceptual, _masked_true) | ``--model flow``: FlowEdit from the photo's latent (``psedit_toy.flow_rows``) |

Metrics per row (means over the edits, with 95% bootstrap intervals over the edits for edit success and background
PSNR / LPIPS, ``psedit_toy.stats``): edit_success (the asked attribute is reached *and* the object's other
attributes, the background colour and the object's place and size are kept: ``psedit_toy.edits.judge``),
attribute_reached (the former success test: the asked attribute only), object_iou (the result's object vs the right
answer's), PSNR and LPIPS (AlexNet: ranks the results as VGG does at Spearman 0.87-0.90 for 1/15 of the cost,
``benchmarks/lpips_trunks.py``) outside the ground-truth edit region and over the whole image, both against the
source photo; mask_iou of the estimated Edit Mask with the true region; seconds per edit (inversion, null-text or
negative-prompt, mask estimate and sampling: what that row costs from the photo) and model_evals, the network
evaluations that costs (a forward pre-hook counts batch elements). ``--model flow`` runs the flow-matching twin.
``--jobs 2`` shares the edits between two processes (one torch thread each: the 2-core machine's fastest setting).
Writes ``table.csv`` / ``table.md`` (one row per config), ``edits.csv`` (one row per edit and config), a grid PNG per
edit, and unless ``--sweep-n 0`` a sweep on the first ``--sweep-n`` edits, one knob moved at a time from the
defaults (``--sweep-knobs``: beta, perceptual strength with the x0 or full gradient or target latent, the end of
triple guidance's window, null-text inversion's iterations, beta under full-gradient perceptual guidance at
``--strength``, and with ``--model flow`` FlowEdit's edit-caption CFG, the source's at the paper's ratio):
``sweep.csv`` (each setting's means and 95% intervals), ``sweep_edits.csv`` (one row per edit and setting, named
``FAMILY=VALUE``, for paired differences: ``toy_paired.py DIR/sweep_edits.csv "beta=1:beta=3"``) and ``sweep.png``
(edit success and the asked attribute alone against preserved-background PSNR).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from _common import device_name, table

from psedit_cli.pipeline import Settings
from psedit_core.perceptual import TARGETS
from psedit_toy import edits as E
from psedit_toy import flow_model as F
from psedit_toy import flow_rows as FR
from psedit_toy import model as M
from psedit_toy import run as R
from psedit_toy import scenes as S
from psedit_toy import stats
from psedit_toy.model import SHARED_TAESD

COLUMNS = ["config", "edit_success", "attribute_reached", "object_iou", "bg_psnr", "bg_lpips", "psnr", "lpips",
           "mask_iou", "seconds", "model_evals"]
INTERVALS = ("edit_success", "bg_psnr", "bg_lpips", "attribute_reached")  # 95% bootstrap: table.csv's _lo / _hi
TABLE_COLUMNS = COLUMNS[:1] + [f"{c}{x}" for c in COLUMNS[1:] for x in ("", "_lo", "_hi")
                               if not x or c in INTERVALS]
BETAS = (0.0, 1.0, 2.0, 3.0, 5.0, 7.5)
STRENGTHS = (0.1, 0.3, 1.0, 3.0)
LATENT_STRENGTHS = (0.03, 0.1, 0.3)  # target "latent": the latent moves this far (RMS) every window step
FLOWEDIT_EDIT_CFGS = (2.0, 3.0, 4.5, 7.5, 13.5)  # --model flow: FlowEdit's edit-caption CFG (the paper's: 13.5)
TEXT_WINDOW_ENDS = (0.2, 0.4, 0.6, 1.0)  # triple guidance's window 0-END (the workflows': 0.4)
NULLTEXT_ITERATIONS = (2, 5, 10, 20)  # null-text inversion's inner iterations per step (the workflows': 10)
FULL_BETAS = (0.0, 1.0, 3.0)  # beta under full-gradient perceptual guidance (at --strength)
# the sweep's knobs: --sweep-knobs KEY ...; each key's family name is its legend and sweep.csv's `family`
KNOBS = {"beta": "beta", "strength": "strength", "full_strength": "full strength",
         "latent_strength": "latent strength", "text_window": "text window end",
         "nulltext_iterations": "null-text iterations", "full_beta": "beta, full gradient",
         "flowedit_cfg": "flowedit edit CFG"}
DEFAULT_KNOBS = ("beta", "strength", "latent_strength")  # + flowedit_cfg with --model flow


def run_row(world, inv, edit, config, s, metrics, src, masks, extra_seconds, target="x0", extra_evals=0):
    """One row's edit of one photo and its metrics, sampled from ``inv``, the row's own inversion
    (``control_rows.inversion_for``); ``seconds`` and ``model_evals`` (network evaluations) count what the row costs
    from the photo, its share of the inversion (``extra_*``) included."""
    t = time.perf_counter()
    with R.count_evals(world) as counter:
        if FR.is_flowedit(config):  # no inversion: from the photo's own latent
            img = FR.sample(world, inv, FR.guider(config, world, inv, s, mask=masks.get("masked_true"), target=target))
        else:
            img = R.sample(world, inv, row_guider(config, world, inv, edit, s, masks, target))
    row = metrics.row(edit, src, img)
    row["seconds"] = time.perf_counter() - t + extra_seconds
    row["model_evals"] = counter.n + extra_evals
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
    """One row per ``key`` value: each column's mean over its edits, with a 95% bootstrap interval (``_lo``,
    ``_hi``) for the columns in :data:`INTERVALS`."""
    out = []
    for name in dict.fromkeys(r[key] for r in rows):
        group = [r for r in rows if r[key] == name]
        agg = {key: name, **stats.summarise(group, COLUMNS[1:])}
        out.append({k: v for k, v in agg.items() if not k.endswith(("_lo", "_hi")) or k[:-3] in INTERVALS})
    return out


def with_interval(row: dict, column: str, fmt: str) -> str:
    """'0.62 [0.44, 0.78]': a table cell with its 95% interval."""
    if row.get(column) is None:
        return ""
    return f"{row[column]:{fmt}} [{row[f'{column}_lo']:{fmt}}, {row[f'{column}_hi']:{fmt}}]"


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r[c], float) else r[c]))
                        for c in columns})


LEGEND = {"beta": "triple guidance: beta (no perceptual)", "strength": "perceptual strength, x0 gradient (beta 3)",
          "full strength": "perceptual strength, full gradient (beta 3)",
          "latent strength": "perceptual strength, target latent (beta 3)",
          "text window end": "triple guidance's window end (beta 3)",
          "null-text iterations": "null-text inversion's iterations (beta 3)",
          "beta, full gradient": "beta, with full-gradient perceptual guidance",
          "flowedit edit CFG": "FlowEdit edit-caption CFG (source at 3.5 : 13.5 of it)"}
MARKERS = dict(zip(LEGEND, "os*^vPXD", strict=True))


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Each knob's settings as a line: edit success (left) and attribute reached (right, the asked attribute alone)
    against preserved-background PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharex=True)
    for ax, column, label in ((axes[0], "edit_success", "edit success (fraction)"),
                              (axes[1], "attribute_reached", "asked attribute reached (fraction)")):
        for family in dict.fromkeys(r["family"] for r in rows):
            pts = [r for r in rows if r["family"] == family]
            ax.plot([r["bg_psnr"] for r in pts], [r[column] for r in pts], marker=MARKERS.get(family, "x"),
                    label=LEGEND.get(family, family))
            for r in pts:
                ax.annotate(f"{r['value']:g}", (r["bg_psnr"], r[column]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("background PSNR vs the photo, dB (outside the true edit region)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("Toy world: edit strength vs what is kept")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def world_weights(a: argparse.Namespace) -> Path:
    """The weights file a run measures: ``--weights`` or the committed file of ``--model``."""
    return a.weights or (F.WEIGHTS if a.model == "flow" else M.WEIGHTS)


def inversion_method(config: str) -> str | None:
    """The null schedule a row samples (its inversion computed once per photo): none for plain DDIM + CFG, for
    Plug-and-Play (plain CFG against the empty prompt on its own inversion) and for FlowEdit, which needs no
    inversion."""
    if config == "ddim_cfg" or config.startswith("pnp") or FR.is_flowedit(config):
        return None
    return "negative-prompt" if config == "negprompt" else "null-text"


def run_edits(a: argparse.Namespace, indices: list[int], threads: int | None = None) -> tuple[list[dict], list[dict]]:
    """The table's rows (and the sweep's) for the edits numbered ``indices`` of ``make_edits(a.seed, a.n)``: one
    process's share. Loads ComfyUI and the model itself, so it runs in a worker process as well."""
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    world = R.load_world(a.comfyui, weights=a.weights, family=a.model)
    version = M.manifest(world_weights(a)).get("data_version")  # the world whose scenes this model was trained on
    import folder_paths
    from PIL import Image

    from psedit_cli.pipeline import nodes
    from psedit_toy import control_rows as CR

    nodes()._comfy.register_lpips_dirs([SHARED_TAESD.parent / "lpips"])  # ../shared/weights, then models/lpips
    lpips_dirs = nodes()._comfy.lpips_search_dirs()
    folder_paths.add_model_folder_path("vae_approx", str(SHARED_TAESD))
    metrics = R.Metrics(lpips_dirs)
    s = Settings(steps=a.steps, lpips_net=a.lpips_net, strength=a.strength)
    rows, sweep_rows = [], []
    t_all = time.perf_counter()
    edits = E.make_edits(a.seed, a.n, version=version)
    methods = tuple(dict.fromkeys(inversion_method(c) for c in a.configs if inversion_method(c)))
    for i in indices:
        edit = edits[i]
        src = S.render(edit.source)[0]
        # the sweep's rows (its first sweep_n edits) sample null-text schedules
        need = methods + ("null-text",) if i < a.sweep_n and "null-text" not in methods else methods
        inv = R.invert(world, src, edit.source_caption, edit.edit_caption, s, methods=need)
        truth = torch.from_numpy(edit.region()).float()[None]
        masks, iou, mask_seconds = {"masked_true": truth}, None, 0.0
        if "masked_estimated" in a.configs:  # the estimated Edit Mask, once per photo
            t = time.perf_counter()
            masks["masked_estimated"] = R.edit_mask(world, inv)
            mask_seconds = time.perf_counter() - t
            iou = E.iou(masks["masked_estimated"][0].numpy() > 0.5, edit.region())
        images = [src, S.render(edit.target)[0]]
        for config in a.configs:
            method = inversion_method(config)
            # the DDIM inversion the row samples: the shared one, or Plug-and-Play's own with the empty prompt
            # (computed here once per photo, so its cost counts in every PnP row and the shared one's in none)
            own = CR.inversion_for(config, world, inv, s)
            extra = own.seconds["invert"] + (inv.seconds[method] if method else 0.0)
            extra += mask_seconds if config == "masked_estimated" else 0.0
            evals = own.evals["invert"] + (inv.evals[method] if method else 0)
            if FR.is_flowedit(config):
                extra, evals = 0.0, 0
            row, img = run_row(world, own, edit, config, s, metrics, src, masks, extra, a.perceptual_target, evals)
            row.update(config=config, edit=i, kind=edit.kind, source=edit.source_caption, target=edit.edit_caption,
                       mask_iou=iou if config == "masked_estimated" else None)
            rows.append(row)
            images.append(img)
        Image.fromarray(np.concatenate(images, axis=1)).save(a.out / f"edit_{i:02d}_{edit.kind}.png")
        mask_note = f"mask IoU {iou:.2f} " if iou is not None else ""
        print(f"edit {i} ({edit.kind}: {edit.source_caption!r} -> {edit.edit_caption!r}) "
              f"success {[int(r['edit_success']) for r in rows[-len(a.configs):]]} "
              f"{mask_note}({time.perf_counter() - t_all:.0f} s)", flush=True)
        if i < a.sweep_n:
            for family, value, config, sv, target in sweep_variants(a, s):
                row_inv, extra = inv, 0.0
                if family == KNOBS["nulltext_iterations"]:  # its own null-text schedule, its time in the row's
                    extra = inv.seconds["null-text"]
                    if sv.inner_iterations != s.inner_iterations:
                        t = time.perf_counter()
                        row_inv = R.with_null_text(world, inv, sv)
                        extra = time.perf_counter() - t
                row, _ = run_row(world, row_inv, edit, config, sv, metrics, src, masks, extra, target)
                row.update(family=family, value=value, edit=i, config=f"{family}={value:g}", kind=edit.kind)
                sweep_rows.append(row)
    return rows, sweep_rows


def sweep_variants(a: argparse.Namespace, s: Settings) -> list[tuple[str, float, str, Settings, str]]:
    """(family, value, config, settings, perceptual target) of each sweep row: one knob moved from the defaults."""
    variants = []
    for knob in a.sweep_knobs:
        family = KNOBS[knob]
        if knob == "beta":
            variants += [(family, b, "textopt", dataclasses.replace(s, beta=b), a.perceptual_target) for b in BETAS]
        elif knob in ("strength", "full_strength"):
            config = "perceptual_full" if knob == "full_strength" else "perceptual_x0"
            variants += [(family, v, config, dataclasses.replace(s, strength=v), a.perceptual_target)
                         for v in STRENGTHS]
        elif knob == "latent_strength":
            variants += [(family, v, "perceptual_x0", dataclasses.replace(s, strength=v), "latent")
                         for v in LATENT_STRENGTHS]
        elif knob == "text_window":
            variants += [(family, v, "textopt", dataclasses.replace(s, text_window=(0.0, v)), a.perceptual_target)
                         for v in TEXT_WINDOW_ENDS]
        elif knob == "full_beta":  # beta with full-gradient perceptual guidance on, at the run's strength
            variants += [(family, b, "perceptual_full", dataclasses.replace(s, beta=b), a.perceptual_target)
                         for b in FULL_BETAS]
        elif knob == "nulltext_iterations":  # the textopt row on a null-text schedule of other iterations
            variants += [(family, k, "textopt", dataclasses.replace(s, inner_iterations=k), a.perceptual_target)
                         for k in NULLTEXT_ITERATIONS]
        elif knob == "flowedit_cfg":  # FlowEdit's edit-caption CFG, the source's at the paper's ratio (3.5 : 13.5)
            variants += [(family, v, f"flowedit@{round(v * 3.5 / 13.5, 3):g},{v:g}", s, a.perceptual_target)
                         for v in FLOWEDIT_EDIT_CFGS]
    return variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="which held-out scenes and edits")
    p.add_argument("--n", type=int, default=32, help="how many edits (kinds in turn)")
    p.add_argument("--out", type=Path, default=Path("bench_out/toy_edit"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sweep-n", type=int, default=4, help="edits in the beta/strength sweep (0: no sweep)")
    p.add_argument("--strength", type=float, default=None,
                   help="Perceptual Guidance's strength in every perceptual row and the sweep's base (default: the "
                   "workflows', 3 with the full gradient, 1 with x0: psedit_cli.pipeline.STRENGTH)")
    p.add_argument("--sweep-knobs", nargs="+", choices=list(KNOBS), default=None,
                   help=f"the sweep's knobs, each moved alone from the defaults (default: {' '.join(DEFAULT_KNOBS)}; "
                   "--model flow adds flowedit_cfg); full_strength is the strength sweep with the full gradient, "
                   "text_window the end of triple guidance's window")
    p.add_argument("--configs", nargs="*", default=None,
                   help=f"rows (default: {' '.join(R.CONFIGS)}; --model flow adds {' '.join(FR.FLOW_CONFIGS)}; "
                   "a FlowEdit row's CFG scales: flowedit@SOURCE,EDIT, default the paper's 3.5,13.5)")
    p.add_argument("--perceptual-target", choices=list(TARGETS), default="x0",
                   help="Perceptual Guidance's target (the node's default is x0)")
    p.add_argument("--lpips-net", choices=("alex", "squeeze", "vgg"), default="squeeze",
                   help="Perceptual Guidance's LPIPS trunk in every perceptual row (the workflows use vgg; squeeze "
                   "ranks results most as vgg does, at 1/14 of the cost per call: benchmarks/lpips_trunks.py)")
    p.add_argument("--model", choices=("eps", "flow"), default="eps",
                   help="the eps model or its flow-matching twin (whose default rows add FlowEdit's)")
    p.add_argument("--weights", type=Path, default=None, help="the model's weights (default: the committed file)")
    p.add_argument("--jobs", type=int, default=1,
                   help="processes, each with its own model and one torch thread, sharing the edits (2 on 2 cores)")
    p.add_argument("--comfyui", default=None)
    a = p.parse_args()
    if a.configs is None:
        a.configs = list(R.CONFIGS) + (list(FR.FLOW_CONFIGS) if a.model == "flow" else [])
    if a.sweep_knobs is None:
        a.sweep_knobs = list(DEFAULT_KNOBS) + (["flowedit_cfg"] if a.model == "flow" else [])
    flowedit = [c for c in a.configs if FR.is_flowedit(c)] + (["--sweep-knobs flowedit_cfg"]
                                                              if "flowedit_cfg" in a.sweep_knobs else [])
    if flowedit and a.model != "flow":
        p.error(f"{', '.join(flowedit)}: FlowEdit runs on flow models only; pass --model flow")
    if a.sweep_n > 0:
        try:
            import matplotlib  # noqa: F401  (the sweep's plot; checked before an hour of sampling)
        except ImportError:
            p.error("the sweep plot needs matplotlib: pip install matplotlib (or pass --sweep-n 0)")
    logging.basicConfig(level=logging.WARNING)
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"# toy_edit: {a.n} edits, seed {a.seed}, {a.steps} steps, perceptual target {a.perceptual_target}, "
          f"guidance LPIPS {a.lpips_net}, {a.jobs} process(es), {device_name()}", flush=True)
    t_all = time.perf_counter()
    shares = [list(range(j, a.n, a.jobs)) for j in range(a.jobs)]
    if a.jobs == 1:
        rows, sweep_rows = run_edits(a, shares[0])
    else:  # one process per share of the edits, each with its own ComfyUI and model, one torch thread each
        import multiprocessing
        import signal
        import sys

        # a kill (SIGTERM) leaves the pool's context through SystemExit, which terminates the workers; without this
        # they go on computing, orphaned, on the cores the next run needs
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

        with multiprocessing.get_context("spawn").Pool(a.jobs) as pool:
            parts = pool.starmap(run_edits, [(a, share, 1) for share in shares])
        rows = sorted((r for part in parts for r in part[0]), key=lambda r: (r["edit"], a.configs.index(r["config"])))
        sweep_rows = sorted((r for part in parts for r in part[1]), key=lambda r: r["edit"])
    table_rows = mean_rows(rows, "config")
    write_csv(a.out / "table.csv", table_rows, TABLE_COLUMNS)
    write_csv(a.out / "edits.csv", rows, ["edit", "kind", "source", "target", *COLUMNS])
    cells = [{**r, **{f"{c}_ci": with_interval(r, c, f) for c, f in (("edit_success", ".2f"), ("bg_psnr", ".2f"),
                                                                     ("bg_lpips", ".3f"))}} for r in table_rows]
    md = table(cells, [("config", "config", "s"), ("edit_success_ci", "edit success [95% CI]", "s"),
                       ("attribute_reached", "attribute reached", ".2f"), ("object_iou", "object IoU", ".2f"),
                       ("bg_psnr_ci", "bg PSNR [95% CI]", "s"), ("bg_lpips_ci", "bg LPIPS [95% CI]", "s"),
                       ("psnr", "PSNR", ".2f"), ("mask_iou", "mask IoU", ".2f"), ("seconds", "s/edit", ".1f"),
                       ("model_evals", "model evals/edit", ".0f")])
    kinds = sorted({r["kind"] for r in rows})
    by_kind = table([{"config": c, **{k: np.mean([r["edit_success"] for r in rows if r["config"] == c
                                                  and r["kind"] == k]) for k in kinds}} for c in a.configs],
                    [("config", "config", "s"), *[(k, k, ".2f") for k in kinds]])
    text = (f"{md}\n\nEdit success by kind:\n\n{by_kind}\n\n{a.n} edits, seed {a.seed}, {a.steps} steps; "
            f"{device_name()}; total {time.perf_counter() - t_all:.0f} s\n")
    if sweep_rows:
        agg = []
        for config in dict.fromkeys(r["config"] for r in sweep_rows):  # FAMILY=VALUE, with intervals
            group = [r for r in sweep_rows if r["config"] == config]
            agg.append({"family": group[0]["family"], "value": group[0]["value"], **mean_rows(group, "config")[0]})
        write_csv(a.out / "sweep.csv", agg, ["family", "value", *TABLE_COLUMNS[1:]])
        # one row per edit and setting, named FAMILY=VALUE: benchmarks/toy_paired.py DIR/sweep_edits.csv "beta=1:beta=3"
        write_csv(a.out / "sweep_edits.csv", sweep_rows, ["edit", "kind", "family", "value", *COLUMNS])
        plot_sweep(agg, a.out / "sweep.png")
        cells = [{**r, **{f"{c}_ci": with_interval(r, c, f) for c, f in (("edit_success", ".2f"), ("bg_psnr", ".2f"),
                                                                         ("bg_lpips", ".3f"))}} for r in agg]
        text += "\nSweep (first {} edits; paired differences: toy_paired.py DIR/sweep_edits.csv):\n\n{}\n".format(
            a.sweep_n, table(cells, [("family", "knob", "s"), ("value", "value", "g"),
                                     ("edit_success_ci", "edit success [95% CI]", "s"),
                                     ("bg_psnr_ci", "bg PSNR [95% CI]", "s"), ("bg_lpips_ci", "bg LPIPS [95% CI]", "s"),
                                     ("psnr", "PSNR", ".2f")]))
    (a.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
