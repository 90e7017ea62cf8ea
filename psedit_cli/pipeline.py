"""The edit pipeline, built from the same node classes as the example workflows (imported as ComfyUI imports the
pack). Everything takes already-loaded objects, so tests can hand in tiny models."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACK = "psedit_pack"
CONFIGS = ("nulltext", "textopt", "perceptual")
CONFIG_NAMES = {"nulltext": "Null-text", "textopt": "Text optimization", "perceptual": "Perceptual + text optimization"}


class SetupError(RuntimeError):
    """Something the user must fix before anything runs (message names the fix)."""


def setup_comfy(path: str | os.PathLike | None):
    """Make ComfyUI importable as a library (CPU mode when torch sees no GPU) and import this pack's nodes."""
    path = path or os.environ.get("COMFYUI_PATH")
    if not path:
        raise SetupError("ComfyUI not found: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH")
    root = Path(path).expanduser().resolve()
    if not (root / "comfy" / "model_management.py").is_file():
        raise SetupError(f"{root} is not a ComfyUI checkout (no comfy/model_management.py): check --comfyui")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    import comfy.model_management  # noqa: F401  (initialised in the mode chosen above)

    return load_pack()


def load_pack():
    """Import the repository as ComfyUI imports a custom node folder; needs the checkout (pip install -e .)."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    if not (REPO / "nodes" / "__init__.py").is_file():
        raise SetupError(f"PSEdit's nodes/ are not beside {Path(__file__).parent}: run psedit from a checkout "
                         "installed with `pip install -e .` (e.g. ComfyUI/custom_nodes/psedit)")
    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    importlib.import_module(f"{PACK}.nodes")
    return module


@dataclass(frozen=True)
class Settings:
    steps: int = 50
    scheduler: str = "normal"
    gamma: float = 7.5
    beta: float = 3.0
    text_window: tuple[float, float] = (0.0, 0.4)
    perceptual_window: tuple[float, float] = (0.2, 0.8)
    strength: float = 0.1
    lpips_net: str = "vgg"
    decoder: str = "taesd"
    method: str = "null-text"  # or negative-prompt, none
    inner_iterations: int = 10
    refine: int = 2


@dataclass
class Models:
    model: object  # ComfyUI MODEL (ModelPatcher)
    vae: object  # ComfyUI VAE
    encode: Callable[[str], list]  # text -> CONDITIONING


@dataclass
class Prepared:
    image: torch.Tensor
    sigmas: torch.Tensor
    inverted: dict
    null: list
    source: list
    edit: list
    schedule: object | None


def load_checkpoint(path: str | os.PathLike) -> Models:
    import comfy.sd

    if not Path(path).is_file():
        raise SetupError(f"checkpoint {path} does not exist: pass an SD1.x or SDXL .safetensors/.ckpt file")
    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    if model is None or clip is None or vae is None:
        raise SetupError(f"{path} lacks a UNet, text encoder or VAE: use a full SD1.x or SDXL checkpoint")

    def encode(text: str):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    return Models(model, vae, encode)


def crop_to_multiple(image: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Centre-crop an IMAGE [B, H, W, C] so both sides are multiples of ``multiple`` (as VAEEncode does)."""
    h, w = image.shape[1] // multiple * multiple, image.shape[2] // multiple * multiple
    if h == 0 or w == 0:
        raise SetupError(f"image is {image.shape[2]}x{image.shape[1]}: it must be at least {multiple}px each side")
    top, left = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
    return image[:, top:top + h, left:left + w]


def prepare(models: Models, image: torch.Tensor, source: str, edit: str, s: Settings) -> Prepared:
    """Encode, invert and (null-text / negative-prompt) invert once; shared by every configuration."""
    import comfy_extras.nodes_custom_sampler as ncs

    nodes = sys.modules[PACK].nodes
    image = crop_to_multiple(image)
    with torch.inference_mode():
        null, src, edt = models.encode(""), models.encode(source), models.encode(edit)
        latent = {"samples": models.vae.encode(image[..., :3])}
        sigmas = ncs.BasicScheduler().get_sigmas(models.model, s.scheduler, s.steps, 1.0)[0]
        inverted, payload = nodes.inversion.DDIMInvert.execute(models.model, latent, sigmas, src, 1.0, s.refine)
        schedule = None
        if s.method != "none":
            schedule = nodes.nulltext.NullTextInversion.execute(
                models.model, payload, null, src, s.gamma, s.method, s.inner_iterations, 1e-5, 0.01)[0]
    return Prepared(image, sigmas, inverted, null, src, edt, schedule)


def guider_for(config: str, models: Models, p: Prepared, s: Settings):
    nodes = sys.modules[PACK].nodes
    window = nodes.guidance.StepWindowNode.execute(*s.text_window)[0]
    if config == "nulltext":
        return nodes.guidance.TripleGuiderNode.execute(models.model, p.null, p.source, p.edit, s.gamma, s.gamma,
                                                       None, p.schedule)[0]
    guider = nodes.guidance.TripleGuiderNode.execute(models.model, p.null, p.source, p.edit, s.gamma, s.beta,
                                                     window, p.schedule)[0]
    if config == "textopt":
        return guider
    if config == "perceptual":
        pwindow = nodes.guidance.StepWindowNode.execute(*s.perceptual_window)[0]
        return nodes.guidance.PerceptualGuidanceNode.execute(
            guider, models.vae, p.image, s.strength, s.lpips_net, "x0", s.decoder, "normalized", window=pwindow)[0]
    raise ValueError(f"unknown configuration {config!r}: use one of {CONFIGS}")


def run_config(config: str, models: Models, p: Prepared, s: Settings) -> torch.Tensor:
    """One configuration's edited image, IMAGE [1, H, W, 3] in [0, 1]."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs

    with torch.inference_mode():
        guider = guider_for(config, models, p, s)
        out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), guider,
                                                 comfy.samplers.sampler_object("euler"), p.sigmas, p.inverted)[0]
        return models.vae.decode(out["samples"]).clamp(0, 1).cpu()
