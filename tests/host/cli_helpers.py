"""Helpers for the ``psedit`` host tests: a fake text encoder, a tiny CLIP folder, a two-photo data set, and a
counter around pipeline functions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import tiny
import torch

PHOTOS = {"astronaut": "astronaut", "chelsea": "chelsea"}  # name -> scikit-image data function
CAPTIONS = {"astronaut": ("an astronaut", "an astronaut in a red suit"), "chelsea": ("a cat", "a tiger")}
CLIP_SIZE = 32


def fake_encode(text: str):
    """A deterministic stand-in for CLIPTextEncode: CONDITIONING seeded by the text."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return tiny.conditioning("sd15", seed)


def make_clip(folder: Path, processor: bool = True) -> Path:
    """A tiny randomly initialised CLIP in transformers format, with a tokenizer from ComfyUI's SD1 vocabulary."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok_dir = tiny.comfy_path() / "comfy" / "sd1_tokenizer"
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": tokenizer.vocab_size, "max_position_embeddings": 77},
        vision_config={**small, "image_size": CLIP_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)  # transformers initialises from the global generator
    model = CLIPModel(config)
    with torch.no_grad():  # with this seed photo/caption cosines come out negative; flipped, CLIPScore (clamped at
        model.text_projection.weight.neg_()  # 0) is positive, so the metric tests are not trivially 0 == 0
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE},
                                         crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    if not processor:
        for name in ("preprocessor_config.json", "processor_config.json"):
            (folder / name).unlink(missing_ok=True)
    return folder


def make_dataset(folder: Path, size: tuple[int, int] = (68, 64)) -> tuple[Path, Path]:
    """Two real photos (68x64 so the CLI has to crop them) and their captions.csv."""
    from PIL import Image
    from skimage import data

    images = folder / "images"
    images.mkdir(parents=True)
    lines = ["image,source,edit"]
    for name, fn in PHOTOS.items():
        Image.fromarray(getattr(data, fn)()).resize(size, Image.LANCZOS).save(images / f"{name}.png")
        lines.append(f"{name}.png,{CAPTIONS[name][0]},{CAPTIONS[name][1]}")
    captions = folder / "captions.csv"
    captions.write_text("\n".join(lines) + "\n")
    return images, captions


class Counter:
    """Wraps a function, counts its calls, and can raise ``KeyboardInterrupt`` on a given call (a simulated Ctrl-C)."""

    def __init__(self, fn, interrupt_on: int | None = None):
        self.fn, self.calls, self.interrupt_on = fn, 0, interrupt_on

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.interrupt_on is not None and self.calls == self.interrupt_on:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)
