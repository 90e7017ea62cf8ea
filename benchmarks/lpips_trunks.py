"""Which LPIPS trunk can stand in for VGG in the toy tables: rank agreement and cost on real edit results.

    python benchmarks/lpips_trunks.py --grids bench_out/toy_edit [--size 128]

Reads the grid PNGs ``benchmarks/toy_edit.py`` writes (each: source photo, right answer, then one result per row of
the table, 128 px side by side), and scores every result against its source photo with LPIPS on the AlexNet,
SqueezeNet and VGG16 trunks (the real weights in ``../shared/weights/lpips``), over the whole image (the grids do
not carry the edit region). Prints, per trunk, Spearman's rank correlation with
VGG over all results and within each edit (does it order the rows of one edit as VGG does), and milliseconds per
call. On the 72 results of the toy world's P2P / PnP rows (8 edits, 9 rows): alex 0.866 over all, 0.896 within an edit;
squeeze 0.911 / 0.873. On the 256 results of the first 32-edit table (8 rows): alex 0.816 / 0.632, squeeze
0.916 / 0.775, at 22 and 24 ms a call against vgg's 344 ms. So squeeze is the stand-in for vgg in the toy tables'
Perceptual Guidance (``toy_edit.py --lpips-net``); their LPIPS metric stays AlexNet, the LPIPS authors' metric.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import table

from psedit_core.lpips_loader import get_lpips
from psedit_toy.model import SHARED_TAESD

TRUNKS = ("alex", "squeeze", "vgg")


def spearman(a, b) -> float:
    """Spearman's rho: Pearson correlation of the ranks (no ties expected in real-valued distances)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def load_grids(folder: Path, size: int) -> list[list[np.ndarray]]:
    """Per grid: [source, result 1, result 2, ...] (the right answer dropped), uint8 [H, W, 3]."""
    from PIL import Image

    grids = []
    for path in sorted(folder.glob("edit_*.png")):
        img = np.array(Image.open(path).convert("RGB"))
        tiles = [img[:, i:i + size].copy() for i in range(0, img.shape[1], size)]
        grids.append([tiles[0], *tiles[2:]])
    if not grids:
        raise SystemExit(f"no edit_*.png grids in {folder}: run benchmarks/toy_edit.py --out {folder} first")
    return grids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grids", type=Path, default=Path("bench_out/toy_edit"))
    p.add_argument("--size", type=int, default=128)
    a = p.parse_args()
    grids = load_grids(a.grids, a.size)
    nets = {t: get_lpips(t, search_dirs=[SHARED_TAESD.parent / "lpips"]) for t in TRUNKS}

    def tensor(x):
        return torch.from_numpy(x).float().permute(2, 0, 1)[None] / 127.5 - 1

    scores = {t: [] for t in TRUNKS}
    ms = {}
    with torch.no_grad():
        for t, net in nets.items():
            start = time.perf_counter()
            for g in grids:
                src = tensor(g[0])
                scores[t].append([float(net(tensor(r), src)) for r in g[1:]])
            ms[t] = 1000 * (time.perf_counter() - start) / sum(len(g) - 1 for g in grids)
    ref = np.concatenate(scores["vgg"])
    rows = []
    for t in TRUNKS:
        flat = np.concatenate(scores[t])
        within = [spearman(s, v) for s, v in zip(scores[t], scores["vgg"], strict=True) if len(s) > 2]
        rows.append({"trunk": t, "rho": spearman(flat, ref), "within": float(np.mean(within)) if within else None,
                     "ms": ms[t]})
    print(f"# LPIPS trunks vs VGG on {len(ref)} results of {len(grids)} edits ({a.grids})\n")
    print(table(rows, [("trunk", "trunk", "s"), ("rho", "Spearman vs VGG, all results", ".3f"),
                       ("within", "mean Spearman within an edit", ".3f"), ("ms", "ms / call (128 px)", ".1f")]))


if __name__ == "__main__":
    main()
