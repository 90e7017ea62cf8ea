"""``psedit eval``: the paper's three configurations over a folder of photos, with metrics, grids and a resumable
table. Each photo is inverted once; its three edits share that inversion."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from psedit_core.lpips_loader import get_lpips
from psedit_core.metrics import clip_directional_similarity, clip_score, lpips_distance, psnr

from .clip_metrics import ClipEmbedder
from .errors import SetupError
from .images import grid, load_photo, quantize, save_image, save_pil
from .pipeline import CONFIG_NAMES, CONFIGS, Models, Settings, prepare, run_config

log = logging.getLogger(__name__)

FIELDS = ["image", "config", "psnr", "lpips", "clip_score", "clip_dir"]
METRICS = FIELDS[2:]
GRID_LABELS = ["source", "Null-text", "Text opt.", "Perceptual+text"]


# --- inputs -----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    image: Path
    source: str
    edit: str

    @property
    def stem(self) -> str:
        return self.image.stem


def read_captions(path: Path, images: Path) -> list[Item]:
    """``image,source,edit`` rows (one per photo, file names relative to ``images``)."""
    if not path.is_file():
        raise SetupError(f"captions file {path} does not exist: pass a CSV with the header image,source,edit")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "source", "edit"} <= set(reader.fieldnames):
            raise SetupError(f"{path} must start with the header image,source,edit (got {reader.fieldnames})")
        items = []
        for line, row in enumerate(reader, start=2):
            if not all((row.get(k) or "").strip() for k in ("image", "source", "edit")):
                raise SetupError(f"{path} line {line}: image, source and edit must all be filled in")
            items.append(Item(images / row["image"].strip(), row["source"].strip(), row["edit"].strip()))
    if not items:
        raise SetupError(f"{path} lists no images: add one row per photo under the header image,source,edit")
    stems = [i.stem for i in items]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise SetupError(f"{path} lists photos with the same name stem {dupes[:5]}: outputs are named by stem, rename "
                         "them or list each photo once")
    missing = [str(i.image) for i in items if not i.image.is_file()]
    if missing:
        raise SetupError(f"{len(missing)} photos listed in {path} are not in {images}: {missing[:5]}")
    return items


# --- results.csv ------------------------------------------------------------------------------------------------------

class Results:
    """``OUT/results.csv``: one row per (image, configuration), appended and flushed as each finishes.

    On opening, rows that cannot be trusted are dropped and the file is rewritten (atomically): a last line cut short
    by an interruption, repeats, and rows whose edited image is gone. Those are then simply redone.
    """

    def __init__(self, out: Path):
        self.out, self.path = out, out / "results.csv"
        self.rows: dict[tuple[str, str], dict] = self._load() if self.path.is_file() else {}
        self._rewrite()

    def _load(self) -> dict[tuple[str, str], dict]:
        rows, dropped = {}, 0
        with self.path.open(newline="") as f:
            for row in csv.DictReader(f):
                if _valid(row) and (self.out / row["config"] / f"{row['image']}.png").is_file():
                    rows[(row["image"], row["config"])] = {k: row[k] for k in FIELDS}
                else:
                    dropped += 1
        if dropped:
            log.warning("%s: %d incomplete rows (or rows whose image is missing) dropped; they will be redone",
                        self.path, dropped)
        return rows

    def _rewrite(self) -> None:
        tmp = self.path.with_name(".results.csv.tmp")
        tmp.write_text(_csv_text(self.rows.values(), header=True))
        os.replace(tmp, self.path)

    def done(self, image: str, config: str) -> bool:
        return (image, config) in self.rows

    def append(self, row: dict) -> None:
        line = _csv_text([row], header=False)
        with self.path.open("a", newline="") as f:  # one write of one whole line, flushed at close
            f.write(line)
        self.rows[(row["image"], row["config"])] = row

    def reorder(self, items: list[Item]) -> None:
        """Rewrite the file with the rows of ``items`` first, in their order and the paper's, then any others (photos
        no longer in the captions) as they were."""
        keys = [(i.stem, c) for i in items for c in CONFIGS if (i.stem, c) in self.rows]
        ordered = {k: self.rows[k] for k in keys}
        ordered.update((k, v) for k, v in self.rows.items() if k not in ordered)
        if list(ordered) != list(self.rows):
            self.rows = ordered
            self._rewrite()

    def for_items(self, items: list[Item]) -> list[dict]:
        return [self.rows[(i.stem, c)] for i in items for c in CONFIGS if (i.stem, c) in self.rows]


def _valid(row: dict) -> bool:
    if any(row.get(k) in (None, "") for k in FIELDS) or row["config"] not in CONFIGS:
        return False
    try:
        [float(row[k]) for k in METRICS]
    except ValueError:
        return False
    return True


def _csv_text(rows, header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def check_run(out: Path, settings: Settings) -> None:
    """``OUT/run.json`` records the settings; resuming with other settings would mix two experiments in one table."""
    path = out / "run.json"
    want = json.loads(json.dumps(asdict(settings)))
    if path.is_file():
        had = json.loads(path.read_text())
        diff = {k: (had.get(k), v) for k, v in want.items() if had.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise SetupError(f"{out} holds results made with other settings ({changes}): pass the same options to "
                             "resume, or a new --out")
    else:
        path.write_text(json.dumps(want, indent=1) + "\n")


# --- metrics ----------------------------------------------------------------------------------------------------------

class Metrics:
    """PSNR and LPIPS (alex) against the source photo, CLIPScore and CLIP directional similarity."""

    def __init__(self, clip: ClipEmbedder, lpips_dirs=(), device: str | torch.device = "cpu"):
        self.clip = clip
        self.lpips = get_lpips("alex", search_dirs=[str(d) for d in lpips_dirs], device=device)

    def for_image(self, source: torch.Tensor, source_text: str, edit_text: str) -> ImageMetrics:
        source = quantize(source)
        return ImageMetrics(self, source, self.clip.images([source]), self.clip.texts([source_text, edit_text]))


@dataclass
class ImageMetrics:
    metrics: Metrics
    source: torch.Tensor  # IMAGE as stored
    e_source: torch.Tensor  # CLIP embedding of the source photo [1, D]
    e_texts: torch.Tensor  # CLIP embeddings of (source caption, edit caption) [2, D]

    def row(self, edited: torch.Tensor) -> dict[str, float]:
        """The metrics of an edit, computed on the image as written (8-bit)."""
        edited = quantize(edited)
        a, b = edited.movedim(-1, 1), self.source.movedim(-1, 1)
        e_edit = self.metrics.clip.images([edited])
        return {
            "psnr": float(psnr(a, b)[0]),
            "lpips": float(lpips_distance(self.metrics.lpips, a, b)[0]),
            "clip_score": float(clip_score(e_edit, self.e_texts[1:2])[0]),
            "clip_dir": float(clip_directional_similarity(self.e_source, e_edit, self.e_texts[0:1],
                                                          self.e_texts[1:2])[0]),
        }


# --- the run ----------------------------------------------------------------------------------------------------------

@dataclass
class Edit:
    """One configuration's result for one photo: the edited IMAGE and its ``results.csv`` row."""

    config: str
    image: torch.Tensor
    row: dict


def evaluate(models: Models, items: list[Item], out: Path, settings: Settings, metrics: Metrics, progress=None,
             on_row=None) -> list[dict]:
    """Run every (image, configuration) not yet in ``out/results.csv``, then write the tables; returns all rows."""
    results = open_run(out, settings)
    for item in items:
        todo = todo_for(results, item)
        advance(progress, len(CONFIGS) - len(todo))
        for edit in edit_photo(models, item, todo, settings, metrics):
            write_edit(item, edit, out, results)
            advance(progress, 1)
            if on_row:
                on_row(edit.row)
        if todo or not has_grid(item, out):
            write_grid(item, out, settings)
    return finish(items, out, results)


def open_run(out: Path, settings: Settings) -> Results:
    """The output folder, its settings checked against ``run.json`` and its trusted rows loaded."""
    out.mkdir(parents=True, exist_ok=True)
    check_run(out, settings)
    return Results(out)


def todo_for(results: Results, item: Item) -> list[str]:
    """The configurations of ``item`` that have no trusted row yet, in the paper's order."""
    return [c for c in CONFIGS if not results.done(item.stem, c)]


def edit_photo(models: Models, item: Item, todo: list[str], settings: Settings, metrics: Metrics) -> Iterator[Edit]:
    """The work of one photo: invert it once, then run each configuration in ``todo`` on that inversion, yielding
    each edit with its metrics as it finishes. The sequential run and every Ray worker call this; neither writes
    here (the caller does, with :func:`write_edit`)."""
    if not todo:
        return
    start = time.perf_counter()
    source = load_photo(item.image, settings.resize)
    prepared = prepare(models, source, item.source, item.edit, settings)
    log.info("%s: inverted in %.1f s", item.stem, time.perf_counter() - start)
    scorer = metrics.for_image(prepared.image, item.source, item.edit)
    for config in todo:
        start = time.perf_counter()
        edited = run_config(config, models, prepared, settings)
        row = {"image": item.stem, "config": config, **scorer.row(edited)}
        if not all(math.isfinite(row[k]) for k in METRICS):
            log.warning("non-finite metric for %s / %s: %s", item.stem, config, row)
        log.info("%s / %s: %.1f s, %s", item.stem, config, time.perf_counter() - start,
                 ", ".join(f"{k} {row[k]:.4g}" for k in METRICS))
        yield Edit(config, edited, row)


def write_edit(item: Item, edit: Edit, out: Path, results: Results) -> None:
    """Write one edit: its image first (atomically), then its row, so that every row has its image."""
    save_image(edit.image, out / edit.config / f"{item.stem}.png")
    results.append(edit.row)


def finish(items: list[Item], out: Path, results: Results) -> list[dict]:
    """``results.csv`` in the captions' order (so it does not depend on which edit finished first), the tables;
    returns the rows of ``items``."""
    results.reorder(items)
    rows = results.for_items(items)
    write_tables(rows, out)
    return rows


def advance(progress, n: int) -> None:
    if progress is not None and n:
        progress.update(n)


def has_grid(item: Item, out: Path) -> bool:
    return (out / "grids" / f"{item.stem}.png").is_file()


def write_grid(item: Item, out: Path, settings: Settings) -> None:
    """Source and the three edits side by side, labelled (from the written images)."""
    paths = [out / c / f"{item.stem}.png" for c in CONFIGS]
    if not all(p.is_file() for p in paths):
        return
    images = [load_photo(item.image, settings.resize)] + [load_photo(p) for p in paths]
    save_pil(grid(images, GRID_LABELS), out / "grids" / f"{item.stem}.png")


def means(rows: list[dict]) -> list[dict]:
    """Per-configuration means, in the paper's order."""
    table = []
    for config in CONFIGS:
        sel = [r for r in rows if r["config"] == config]
        if sel:
            mean = {k: math.fsum(float(r[k]) for r in sel) / len(sel) for k in METRICS}
            table.append({"method": CONFIG_NAMES[config], "config": config, "images": len(sel), **mean})
    return table


def write_tables(rows: list[dict], out: Path) -> list[dict]:
    table = means(rows)
    with (out / "table.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "config", "images", *METRICS], lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    lines = ["| method | images | PSNR ↑ | LPIPS ↓ | CLIPScore ↑ | CLIP directional ↑ |", "|---|---|---|---|---|---|"]
    lines += [f"| {m['method']} | {m['images']} | {m['psnr']:.2f} | {m['lpips']:.3f} | {m['clip_score']:.2f} | "
              f"{m['clip_dir']:.4f} |" for m in table]
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return table
