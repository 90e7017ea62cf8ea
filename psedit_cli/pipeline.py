"""The edit pipeline, built from the same node classes as the example workflows (the repository imported as ComfyUI
imports a custom node folder) and stock ComfyUI pieces. Everything takes already-loaded objects (:class:`Models`),
so tests can hand in tiny models."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SetupError
from .images import crop_to_multiple

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PACK = "psedit_pack"
CONFIGS = ("nulltext", "textopt", "perceptual")  # the paper's table, in its order
CONFIG_NAMES = {"nulltext": "Null-text", "textopt": "Text optimization", "perceptual": "Perceptual + text optimization"}
FAMILIES = ("SD15", "SDXL")  # latent formats of the SD1.x and SDXL families

__all__ = ["CONFIGS", "CONFIG_NAMES", "Models", "Prepared", "Settings", "SetupError", "guider_for", "load_checkpoint",
           "load_pack", "prepare", "run_config", "setup_comfy"]


# --- ComfyUI as a library ---------------------------------------------------------------------------------------------

def setup_comfy(path: str | os.PathLike | None):
    """Make ComfyUI importable (CPU mode when torch sees no GPU, decided before ``comfy.model_management`` is
    imported) and import this pack's nodes; returns the pack module."""
    path = path or os.environ.get("COMFYUI_PATH")
    if not path:
        raise SetupError("ComfyUI not found: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH")
    root = Path(path).expanduser().resolve()
    if not (root / "comfy" / "model_management.py").is_file():
        raise SetupError(f"{root} is not a ComfyUI checkout (no comfy/model_management.py): fix --comfyui / "
                         "COMFYUI_PATH")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    import comfy.model_management  # noqa: F401  (initialised in the mode chosen above)

    return load_pack()


def load_pack(repo: Path | None = None):
    """Import the repository as ComfyUI imports a custom node folder; needs the checkout (pip install -e .)."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    repo = repo or REPO
    if not (repo / "nodes" / "__init__.py").is_file() or not (repo / "__init__.py").is_file():
        raise SetupError(f"PSEdit's nodes/ are not beside {Path(__file__).parent}: run psedit from a checkout of the "
                         "repository installed with `pip install -e .` (e.g. in ComfyUI/custom_nodes/psedit)")
    spec = importlib.util.spec_from_file_location(PACK, repo / "__init__.py", submodule_search_locations=[str(repo)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    try:
        spec.loader.exec_module(module)
        importlib.import_module(f"{PACK}.nodes")
    except BaseException:
        del sys.modules[PACK]
        raise
    return module


def nodes():
    return sys.modules[PACK].nodes


# --- what the pipeline works with -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    steps: int = 50
    scheduler: str = "ddim_uniform"  # the workflows' (tools/make_workflows.py SCHEDULER)
    gamma: float = 7.5  # text guidance scale (CFG)
    beta: float | None = None  # edit strength (source -> edit caption); None: beta_for's
    text_window: tuple[float, float] = (0.0, 0.4)
    perceptual_window: tuple[float, float] = (0.2, 0.8)
    strength: float | None = None  # perceptual guidance step (normalised, target x0); None: strength_for's
    gradient: str = "auto"  # perceptual guidance gradient: x0, full, or auto (the workflows': full on SD1.x / SD2.x)
    lpips_net: str = "vgg"
    decoder: str = "taesd"
    method: str = "null-text"  # or negative-prompt, none
    inner_iterations: int = 10
    refine: int = 2
    resize: int = 0  # shorter side in px before cropping; 0 keeps the photo's size
    seed: int = 0


@dataclass
class Models:
    model: object  # ComfyUI MODEL (ModelPatcher)
    vae: object  # ComfyUI VAE
    encode: Callable[[str], list]  # text -> CONDITIONING


@dataclass
class Prepared:
    """One photo, inverted once and shared by every configuration."""

    image: torch.Tensor  # the cropped source IMAGE
    sigmas: torch.Tensor
    inverted: dict  # LATENT
    null: list
    source: list
    edit: list
    schedule: object | None  # null-text / negative-prompt schedule, or None (method 'none')


def load_checkpoint(path: str | os.PathLike) -> Models:
    """MODEL, VAE and a CLIPTextEncode-equivalent encoder from an SD1.x or SDXL checkpoint file."""
    import comfy.sd
    import folder_paths

    if not Path(path).is_file():
        raise SetupError(f"checkpoint {path} does not exist: pass an SD1.x or SDXL .safetensors/.ckpt file")
    try:
        model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
    except RuntimeError as exc:
        raise SetupError(f"ComfyUI cannot load {path} ({str(exc).strip().splitlines()[0]}): pass a full SD1.x or "
                         "SDXL checkpoint (UNet + text encoder + VAE)") from exc
    if model is None or clip is None or vae is None:
        raise SetupError(f"{path} lacks a UNet, text encoder or VAE: pass a full SD1.x or SDXL checkpoint")
    check_family(model)

    def encode(text: str):  # as the stock CLIPTextEncode node
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    return Models(model, vae, encode)


def check_family(model) -> None:
    family = type(model.get_model_object("latent_format")).__name__
    if family not in FAMILIES:
        raise SetupError(f"this checkpoint is a {family} model; PSEdit's method runs on SD1.x and SDXL checkpoints")


# --- the method -------------------------------------------------------------------------------------------------------

def prepare(models: Models, image: torch.Tensor, source: str, edit: str, s: Settings) -> Prepared:
    """Encode the captions and the photo, DDIM-invert it and run null-text (or negative-prompt) inversion, once."""
    import comfy_extras.nodes_custom_sampler as ncs

    image = crop_to_multiple(image)
    torch.manual_seed(s.seed)
    with torch.inference_mode():
        null, src, edt = models.encode(""), models.encode(source), models.encode(edit)
        latent = {"samples": models.vae.encode(image[..., :3])}
        sigmas = ncs.BasicScheduler().get_sigmas(models.model, s.scheduler, s.steps, 1.0)[0]
        inverted, payload = nodes().inversion.DDIMInvert.execute(models.model, latent, sigmas, src, 1.0, s.refine)
        schedule = None
        if s.method != "none":
            schedule = nodes().nulltext.NullTextInversion.execute(
                models.model, payload, null, src, s.gamma, s.method, s.inner_iterations, 1e-5, 0.01)[0]
    return Prepared(image, sigmas, inverted, null, src, edt, schedule)


def guider_for(config: str, models: Models, p: Prepared, s: Settings):
    """The GUIDER of one of the paper's configurations, built by the nodes."""
    n = nodes().guidance
    if config == "nulltext":  # beta = gamma: e_null + gamma (e_edit - e_null), plain CFG on the edit caption
        return n.TripleGuiderNode.execute(models.model, p.null, p.source, p.edit, s.gamma, s.gamma, None,
                                          p.schedule)[0]
    if config not in ("textopt", "perceptual"):
        raise ValueError(f"unknown configuration {config!r}: use one of {', '.join(CONFIGS)}")
    window = n.StepWindowNode.execute(*s.text_window)[0]
    gradient = gradient_for(models.model, s.gradient)
    guider = n.TripleGuiderNode.execute(models.model, p.null, p.source, p.edit, s.gamma, beta_for(gradient, s.beta),
                                        window, p.schedule)[0]
    if config == "textopt":
        return guider
    pwindow = n.StepWindowNode.execute(*s.perceptual_window)[0]
    return n.PerceptualGuidanceNode.execute(guider, models.vae, p.image, strength_for(gradient, s.strength),
                                            s.lpips_net, gradient, s.decoder, "normalized", window=pwindow)[0]


def gradient_for(model, gradient: str) -> str:
    """``auto``: the workflows' choice (tools/make_workflows.py ``GRADIENT``, where the reasons are): ``full`` on
    SD1.x / SD2.x models (their config classes and subclasses), whose gradient through the UNet fits 6.4 GiB at
    512 px, ``x0`` on the others; anything else as given."""
    if gradient != "auto":
        return gradient
    import comfy.supported_models as sm

    return "full" if isinstance(model.model.model_config, (sm.SD15, sm.SD20)) else "x0"


# Perceptual Guidance's strength with each gradient, as the workflows set it (tools/make_workflows.py STRENGTH). On the
# toy world's 32-edit sweep (README, *The toy world*) full-gradient guidance at 3 keeps +1.3 dB [0.5, 2.2] more
# background than at 1 (LPIPS -0.05, edit success +0.06 [0.00, 0.16]); x0 keeps 1, the node's default.
STRENGTH = {"full": 3.0, "x0": 1.0}


def strength_for(gradient: str, strength: float | None) -> float:
    """``strength`` as given, or where it is ``None`` the workflows' strength for the (resolved) ``gradient``."""
    return STRENGTH[gradient] if strength is None else strength


# Triple Guider's beta with each Perceptual Guidance gradient, as the workflows set it (tools/make_workflows.py BETA):
# the paper's 3, and 1 in the SD1.5 pipeline (full gradient), which on the toy world's 64 sweep edits keeps +1.4 dB
# [0.6, 2.2] more background than 3 at edit success +0.12 [0.00, 0.25] (README, *The toy world*).
BETA = {"full": 1.0, "x0": 3.0}


def beta_for(gradient: str, beta: float | None) -> float:
    """``beta`` as given, or where it is ``None`` the workflows' beta for the (resolved) ``gradient``."""
    return BETA[gradient] if beta is None else beta


def run_config(config: str, models: Models, p: Prepared, s: Settings) -> torch.Tensor:
    """One configuration's edited image, IMAGE [1, H, W, 3] in [0, 1], sampled by the stock SamplerCustomAdvanced
    from the inverted latent (no added noise) with the same SIGMAS."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs

    with torch.inference_mode():
        guider = guider_for(config, models, p, s)
        out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), guider,
                                                 comfy.samplers.sampler_object("euler"), p.sigmas, p.inverted)[0]
        return models.vae.decode(out["samples"])[..., :3].clamp(0, 1).float().cpu()
