"""Paired differences between rows of a toy_edit table, over the same edits, with 95% bootstrap intervals.

    python benchmarks/toy_paired.py DIR/edits.csv "perceptual_full:textopt" "flowedit@1,3:textopt" ...

Each ``A:B`` prints the mean over the edits both rows ran of A's value minus B's (background PSNR, background LPIPS,
edit success), with the percentile bootstrap interval of that mean (``psedit_toy.stats``, resampling edits). A
difference whose interval excludes 0 is outside the noise of these edits; the rows' own intervals in ``table.md``
overlap far more often, since they also carry the edits' spread.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psedit_toy import stats  # noqa: E402

COLUMNS = (("bg_psnr", "bg PSNR, dB", "+.2f"), ("bg_lpips", "bg LPIPS", "+.3f"),
           ("edit_success", "edit success", "+.2f"))


def paired(rows: list[dict], a: str, b: str) -> dict[str, tuple[float, float, float]]:
    """{column: (mean, lo, hi)} of ``a - b`` over the edits both configurations ran."""
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["config"], {})[int(r["edit"])] = r
    for name in (a, b):
        if name not in by:
            raise SystemExit(f"no rows for {name!r}; the file has {', '.join(by)}")
    edits = sorted(set(by[a]) & set(by[b]))
    out = {}
    for col, _, _ in COLUMNS:
        d = np.array([float(by[a][e][col]) - float(by[b][e][col]) for e in edits])
        lo, hi = stats.bootstrap_ci(d)
        out[col] = (float(d.mean()), float(lo), float(hi))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("edits", type=Path, help="a toy_edit run's edits.csv")
    p.add_argument("pairs", nargs="+", help="A:B, configuration names as in the table")
    a = p.parse_args()
    rows = list(csv.DictReader(a.edits.open()))
    print("| comparison | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for pair in a.pairs:
        first, sep, second = pair.partition(":")
        if not sep:
            p.error(f"{pair!r}: write a pair as A:B")
        d = paired(rows, first, second)
        cells = [f"{d[c][0]:{f}} [{d[c][1]:{f}}, {d[c][2]:{f}}]" for c, _, f in COLUMNS]
        print(f"| {first} - {second} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
