"""CLIP image and text embeddings for the metrics, from a local folder in transformers format (never downloaded)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import SetupError
from .images import to_pil

log = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
HOW_TO_SAVE = (
    "Save one once on a machine with network access: python -c \"from transformers import CLIPModel, CLIPProcessor; "
    "n='openai/clip-vit-large-patch14'; CLIPModel.from_pretrained(n).save_pretrained('clip'); "
    "CLIPProcessor.from_pretrained(n).save_pretrained('clip')\", then pass --clip clip"
)
EXPECTED = ("config.json, model weights (model.safetensors or pytorch_model.bin), tokenizer files (vocab.json + "
            "merges.txt, or tokenizer.json) and optionally preprocessor_config.json / processor_config.json")


def missing_files(folder: Path) -> list[str]:
    """What a CLIP folder lacks, as file names ([] when it looks complete)."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES[:2]))
    if not any(all((folder / f).is_file() for f in group) for group in TOKENIZER_FILES):
        missing.append("vocab.json + merges.txt (or tokenizer.json)")
    return missing


def check_folder(folder: str | Path | None) -> Path:
    """``folder`` as a Path when it holds a CLIP in transformers format; otherwise an error naming what is missing."""
    if not folder:
        raise SetupError(f"the metrics need a CLIP folder: pass --clip DIR holding {EXPECTED}. {HOW_TO_SAVE}")
    folder = Path(folder)
    missing = missing_files(folder) if folder.is_dir() else ["the folder itself"]
    if missing:
        raise SetupError(f"--clip {folder} is not a CLIP folder in transformers format: missing "
                         f"{'; '.join(missing)} (expected {EXPECTED}). {HOW_TO_SAVE}")
    return folder


class ClipEmbedder:
    """``images([IMAGE, ...])`` and ``texts([str, ...])`` -> CLIP embeddings [N, D] (projected, not normalised)."""

    def __init__(self, folder: str | Path | None, device: str | torch.device = "cpu"):
        folder = check_folder(folder)
        self.device = torch.device(device)
        try:
            self.model, self.tokenizer, self.image_processor = _load(folder)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SetupError(f"could not load CLIP from {folder} ({exc}): it must hold {EXPECTED} of a CLIPModel. "
                             f"{HOW_TO_SAVE}") from exc
        self.model = self.model.eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def images(self, images: list[torch.Tensor]) -> torch.Tensor:
        inputs = self.image_processor(images=[to_pil(i) for i in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        return _tensor(self.model.get_image_features(pixel_values=pixels)).float().cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        limit = self.model.config.text_config.max_position_embeddings
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=limit)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return _tensor(self.model.get_text_features(**inputs)).float().cpu()


def _load(folder: Path):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    size = model.config.vision_config.image_size
    processor = None
    if any((folder / f).is_file() for f in PROCESSOR_FILES):
        processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        if (processor.crop_size or {}).get("height") != size:
            log.warning("%s: the image processor crops to %s but the model takes %d px: using CLIP's defaults",
                        folder, processor.crop_size, size)
            processor = None
    if processor is None:  # CLIP's own preprocessing at the model's resolution
        log.info("%s: no image processor config, using CLIP's preprocessing at %d px", folder, size)
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, tokenizer, processor


def _tensor(out) -> torch.Tensor:
    """transformers 4.x returns the projected features; 5.x a model output whose pooler_output holds them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
