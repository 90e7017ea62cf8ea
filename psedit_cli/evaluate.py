"""``psedit eval``: the paper's three configurations over a folder, with metrics, grids and a resumable table."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from psedit_core.lpips_loader import get_lpips
from psedit_core.metrics import clip_directional_similarity, clip_score, lpips_distance, psnr

from .pipeline import CONFIG_NAMES, CONFIGS, Models, Settings, SetupError, prepare, run_config

log = logging.getLogger(__name__)
FIELDS = ["image", "config", "psnr", "lpips", "clip_score", "clip_dir"]
CLIP_FILES = "config.json, model.safetensors (or pytorch_model.bin), and tokenizer files (vocab.json, merges.txt)"


@dataclass(frozen=True)
class Item:
    image: Path
    source: str
    edit: str


def read_captions(path: Path, images: Path) -> list[Item]:
    if not path.is_file():
        raise SetupError(f"captions file {path} does not exist: a CSV with header image,source,edit")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "source", "edit"} <= set(reader.fieldnames):
            raise SetupError(f"{path} must have the header image,source,edit (got {reader.fieldnames})")
        items = [Item(images / row["image"], row["source"], row["edit"]) for row in reader]
    missing = [str(i.image) for i in items if not i.image.is_file()]
    if missing:
        raise SetupError(f"images listed in {path} are missing: {missing[:5]}")
    return items


def load_image(path: Path) -> torch.Tensor:
    """IMAGE [1, H, W, 3] in [0, 1]."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)[None]


def save_image(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)


class ClipEmbedder:
    """CLIP image/text embeddings from a local transformers folder (no downloads)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        folder = Path(folder) if folder else None
        if folder is None or not (folder / "config.json").is_file():
            raise SetupError(
                f"CLIP for the metrics must be a local transformers folder with {CLIP_FILES}; {folder} is not. "
                "Save one with CLIPModel.from_pretrained('openai/clip-vit-large-patch14').save_pretrained(DIR) "
                "and the matching CLIPProcessor, then pass --clip DIR"
            )
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise SetupError(f"could not load CLIP from {folder} ({exc}); it needs {CLIP_FILES}") from exc
        self.device = device

    @torch.no_grad()
    def images(self, images: list[torch.Tensor]) -> torch.Tensor:
        pil = [Image.fromarray((i[0].numpy() * 255).round().astype(np.uint8)) for i in images]
        inputs = self.processor(images=pil, return_tensors="pt").to(self.device)
        return _tensor(self.model.get_image_features(**inputs)).float().cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, return_tensors="pt", padding=True).to(self.device)
        return _tensor(self.model.get_text_features(**inputs)).float().cpu()


def _tensor(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def done_rows(results: Path) -> dict[tuple[str, str], dict]:
    if not results.is_file():
        return {}
    with results.open(newline="") as f:
        return {(r["image"], r["config"]): r for r in csv.DictReader(f)}


def write_tables(rows: list[dict], out: Path) -> list[dict]:
    means = []
    for config in CONFIGS:
        sel = [r for r in rows if r["config"] == config]
        if sel:
            mean = {k: sum(float(r[k]) for r in sel) / len(sel) for k in FIELDS[2:]}
            means.append({"method": CONFIG_NAMES[config], "images": len(sel), **mean})
    with (out / "table.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "images", *FIELDS[2:]])
        w.writeheader()
        w.writerows(means)
    lines = ["| method | images | PSNR | LPIPS | CLIPScore | CLIP directional |", "|---|---|---|---|---|---|"]
    lines += [f"| {m['method']} | {m['images']} | {m['psnr']:.2f} | {m['lpips']:.3f} | {m['clip_score']:.2f} | "
              f"{m['clip_dir']:.4f} |" for m in means]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return means


def grid(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(images, dim=2)


def evaluate(models: Models, items: list[Item], out: Path, settings: Settings, clip: ClipEmbedder,
             lpips_dirs=(), progress=None, on_row=None) -> list[dict]:
    """Run every (image, configuration) not yet in ``out/results.csv``; rows are appended as they finish."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.csv"
    done = done_rows(results)
    metric = get_lpips("alex", search_dirs=lpips_dirs)
    new_file = not results.is_file()
    with results.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
            f.flush()
        for item in items:
            stem = item.image.stem
            todo = [c for c in CONFIGS if (stem, c) not in done or not (out / c / f"{stem}.png").is_file()]
            if not todo:
                if progress:
                    progress.update(len(CONFIGS))
                continue
            source_img = load_image(item.image)
            prepared = prepare(models, source_img, item.source, item.edit, settings)
            src = prepared.image
            e_src_img, e_txt = clip.images([src]), clip.texts([item.source, item.edit])
            for config in CONFIGS:
                path = out / config / f"{stem}.png"
                if config not in todo:
                    if progress:
                        progress.update(1)
                    continue
                edited = run_config(config, models, prepared, settings)
                save_image(edited, path)
                e_edit = clip.images([edited])
                row = {
                    "image": stem, "config": config,
                    "psnr": float(psnr(edited.movedim(-1, 1), src.movedim(-1, 1))[0]),
                    "lpips": float(lpips_distance(metric, edited.movedim(-1, 1), src.movedim(-1, 1))[0]),
                    "clip_score": float(clip_score(e_edit, e_txt[1:2])[0]),
                    "clip_dir": float(clip_directional_similarity(e_src_img, e_edit, e_txt[0:1], e_txt[1:2])[0]),
                }
                if not all(math.isfinite(row[k]) for k in FIELDS[2:]):
                    log.warning("non-finite metric for %s / %s: %s", stem, config, row)
                writer.writerow(row)
                f.flush()
                done[(stem, config)] = row
                if on_row:
                    on_row(row)
                if progress:
                    progress.update(1)
            edits = [load_image(out / c / f"{stem}.png") for c in CONFIGS]
            save_image(grid([src, *edits]), out / "grids" / f"{stem}.png")
    rows = [done[(i.image.stem, c)] for i in items for c in CONFIGS if (i.image.stem, c) in done]
    write_tables(rows, out)
    return rows
