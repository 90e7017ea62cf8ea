"""Photos in and out: loading (optionally resized), centre-cropping to the VAE's multiple of 8, atomic PNG writes,
labelled side-by-side grids. Images are ComfyUI IMAGEs: float tensors [1, H, W, 3] in [0, 1]."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import SetupError

log = logging.getLogger(__name__)

MULTIPLE = 8  # image pixels per latent pixel (SD1.x / SDXL VAEs and TAESD)
LABEL_HEIGHT = 12


def load_photo(path: str | os.PathLike, resize: int = 0) -> torch.Tensor:
    """The photo at ``path`` as an IMAGE: its shorter side scaled to ``resize`` px (Lanczos; 0 keeps the size), then
    centre-cropped so both sides are multiples of 8 (at most 7 px are cut from each dimension)."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"image {path} does not exist: pass an existing photo (PNG, JPEG, ...)")
    img = Image.open(path).convert("RGB")
    if resize > 0:
        scale = resize / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        if size != img.size:
            log.info("%s: resized %dx%d -> %dx%d (shorter side %d px)", path.name, *img.size, *size, resize)
            img = img.resize(size, Image.LANCZOS)
    return crop_to_multiple(to_image(img), name=path.name)


def crop_to_multiple(image: torch.Tensor, multiple: int = MULTIPLE, name: str = "image") -> torch.Tensor:
    """Centre-crop an IMAGE so both sides are multiples of ``multiple`` (as ComfyUI's VAEEncode crops)."""
    height, width = image.shape[1], image.shape[2]
    h, w = height // multiple * multiple, width // multiple * multiple
    if h == 0 or w == 0:
        raise SetupError(f"{name} is {width}x{height}: it must be at least {multiple} px on each side")
    if (h, w) != (height, width):
        log.info("%s: centre-cropped %dx%d -> %dx%d (sides must be multiples of %d)", name, width, height, w, h,
                 multiple)
    top, left = (height - h) // 2, (width - w) // 2
    return image[:, top:top + h, left:left + w]


def to_image(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255)[None]


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(image))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0, ..., :3].detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def quantize(image: torch.Tensor) -> torch.Tensor:
    """The image exactly as an 8-bit PNG stores it (metrics are computed on what is written)."""
    return torch.from_numpy(to_uint8(image).astype(np.float32) / 255)[None]


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a PNG atomically (a temporary file renamed into place), so an interruption leaves no half image."""
    save_pil(to_pil(image), path)


def save_pil(img: Image.Image, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def grid(images: list[torch.Tensor], labels: list[str] | None = None) -> Image.Image:
    """Images side by side (each resized to the first one's size), each with its label in a band above."""
    tiles = [to_pil(i) for i in images]
    w, h = tiles[0].size
    band = LABEL_HEIGHT if labels else 0
    out = Image.new("RGB", (w * len(tiles), h + band), "black")
    font = ImageFont.load_default()
    for k, tile in enumerate(tiles):
        out.paste(tile if tile.size == (w, h) else tile.resize((w, h)), (k * w, band))
        if labels:
            label = Image.new("RGB", (w, band), "black")
            ImageDraw.Draw(label).text((2, 0), labels[k], fill="white", font=font)
            out.paste(label, (k * w, 0))
    return out
