"""The one place that knows ComfyUI internals: model/latent plumbing, input checks, gradients under inference mode.

Everything here turns ComfyUI objects (ModelPatcher, CONDITIONING lists, VAE, IMAGE) into what the core expects
(``denoiser(x, sigma) -> x0`` in model latent space, ``decode(x0) -> image NCHW in [0, 1]``) and back.
"""

from __future__ import annotations

import copy
import logging
import os
import weakref

import comfy.model_management
import comfy.utils
import folder_paths
import torch

log = logging.getLogger(__name__)

LPIPS_FOLDER = "lpips"
SPATIAL_RATIO = 8  # image pixels per latent pixel for SD1.x / SDXL VAEs and TAESD


# --- model facts -------------------------------------------------------------------------------------------------

def latent_format(model):
    return model.get_model_object("latent_format")


def model_family(model) -> str:
    """A short name for messages: the latent format's class (SD15, SDXL, ...)."""
    return type(latent_format(model)).__name__


def context_dim(model) -> int | None:
    return model.model.model_config.unet_config.get("context_dim")


def needs_pooled(model) -> bool:
    return model.model.model_config.unet_config.get("adm_in_channels") is not None


def sample_sigmas(model_options: dict) -> torch.Tensor | None:
    """The schedule being sampled, as ``CFGGuider.inner_sample`` records it."""
    return model_options.get("transformer_options", {}).get("sample_sigmas")


# --- input checks (errors that name the fix) ------------------------------------------------------------------------

def check_conditioning(model, conditioning, name: str) -> None:
    """Raise if ``conditioning`` was not encoded for this model's family (e.g. SD1 text on an SDXL model)."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{name}: expected a CONDITIONING (from CLIPTextEncode), got {type(conditioning).__name__}")
    want = context_dim(model)
    for tensor, extra in conditioning:
        width = tensor.shape[-1]
        if want is not None and width != want:
            raise ValueError(
                f"{name} conditioning has width {width} but this {model_family(model)} model expects {want}: "
                "encode the prompt with the CLIP of the same checkpoint as the MODEL"
            )
        if needs_pooled(model) and extra.get("pooled_output") is None:
            raise ValueError(
                f"{name} conditioning has no pooled output, which this {model_family(model)} model needs: "
                "encode it with this checkpoint's CLIPTextEncode"
            )


def check_latent(model, samples: torch.Tensor, name: str = "latent") -> None:
    channels = latent_format(model).latent_channels
    if samples.ndim != 4 or samples.shape[1] != channels:
        raise ValueError(
            f"{name} has shape {tuple(samples.shape)} but this {model_family(model)} model works on {channels}-channel "
            "2D latents: VAE-encode the image with this checkpoint's VAE"
        )
    if not torch.isfinite(samples).all():
        raise ValueError(f"{name} contains NaN/inf: re-encode the image (an fp16 VAE can overflow; use fp32/bf16)")


def match_image_to_latent(image: torch.Tensor, latent_hw: tuple[int, int], batch: int, ratio: int) -> torch.Tensor:
    """The source IMAGE (NHWC) cropped as VAEEncode crops it; an error that names the fix if it cannot be the image
    the latent came from (other size, or a batch that is neither 1 nor the latent's)."""
    want = (latent_hw[0] * ratio, latent_hw[1] * ratio)
    for d in (0, 1):  # VAEEncode centre-crops each side down to a multiple of the VAE's ratio
        size = image.shape[d + 1]
        if size != want[d] and (size // ratio) * ratio == want[d]:
            image = image.narrow(d + 1, (size % ratio) // 2, want[d])
    if tuple(image.shape[1:3]) != want:
        raise ValueError(
            f"source image is {image.shape[2]}x{image.shape[1]} but the latent decodes to {want[1]}x{want[0]}: "
            "connect the same image you VAE-encoded (or resize it to that size with an ImageScale node)"
        )
    if image.shape[0] not in (1, batch):
        raise ValueError(
            f"source image batch is {image.shape[0]} but the latent batch is {batch}: use one image, or one per latent"
        )
    return image


# --- running inside ComfyUI's sampling set-up -------------------------------------------------------------------------

def run_in_sampler(model, positive, negative, cfg: float, latent: torch.Tensor, sigmas: torch.Tensor, fn):
    """Run ``fn(model_k, x, sigmas, extra_args, store)`` as a custom sampler inside ``CFGGuider.sample``.

    ComfyUI then loads the model, prepares the conditionings, applies model patches and converts ``latent`` (raw
    VAE latent) to model space, exactly as for sampling. Returns what ``fn`` returned (a model-space latent),
    converted back to a raw latent, and the dict ``store`` that ``fn`` filled.
    """
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    store = {}

    def sampler_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        return fn(model_k, x, sigmas, extra_args or {}, store)

    out = guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(sampler_fn), sigmas,
                        disable_pbar=True, seed=0)
    return out, store


def run_on_trajectory(model, payload, positive, negative, cfg: float, fn):
    """:func:`run_in_sampler` for work over an inversion trajectory (``payload.inversion``) rather than a latent;
    returns the dict ``fn`` filled."""
    inversion = payload.inversion
    latent = latent_format(model).process_out(inversion.latents[0].detach().cpu().float())
    _, store = run_in_sampler(model, positive, negative, cfg, latent, inversion.sigmas.cpu(), fn)
    return store


# --- progress and cancel -----------------------------------------------------------------------------------------

class Progress:
    """A ComfyUI progress bar whose every step also honours the user's Cancel."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, *_args, **_kwargs) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update(1)


# --- gradients under inference mode --------------------------------------------------------------------------------

_grad_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grad_copy(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A frozen fp32 copy of ``module`` whose tensors are ordinary (not inference) tensors, cached per module.

    ComfyUI loads weights under ``torch.inference_mode()``; autograd cannot save such tensors for backward.
    """
    cached = _grad_copies.get(module)
    if cached is None or next(cached.parameters()).device != device:
        with torch.inference_mode(False):
            cached = copy.deepcopy(module).to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        _grad_copies[module] = cached
    return cached


def differentiable_patcher(patcher):
    """A clone of ``patcher`` whose every ``comfy.ops`` layer casts a fresh non-inference copy of its weight and
    bias at each forward (an identity weight wrapper forces the copy), so gradients can flow through the model."""
    clone = patcher.clone()
    n = 0
    for name, module in clone.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        if getattr(module, "weight", None) is not None:
            clone.add_weight_wrapper(f"{name}.weight", _identity)
            n += 1
        if getattr(module, "bias", None) is not None:
            clone.add_weight_wrapper(f"{name}.bias", _identity)
    log.debug("gradient-enabled patcher: %d layers wrapped", n)
    return clone


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# --- decoders --------------------------------------------------------------------------------------------------------

def taesd_decoder_path(model) -> str:
    name = getattr(latent_format(model), "taesd_decoder_name", None)
    if name is None:
        raise ValueError(f"no TAESD decoder exists for {model_family(model)} latents: choose decoder 'vae'")
    for f in folder_paths.get_filename_list("vae_approx"):
        if f.startswith(f"{name}."):
            return folder_paths.get_full_path_or_raise("vae_approx", f)
    raise FileNotFoundError(
        f"decoder 'taesd' needs {name}.safetensors (or .pth) in {folder_paths.get_folder_paths('vae_approx')}: "
        "download it from the madebyollin/taesd repository, or choose decoder 'vae'"
    )


_taesd_cache: dict[str, torch.nn.Module] = {}


def load_taesd(model) -> torch.nn.Module:
    """ComfyUI's TAESD module with only its decoder loaded, scaled for this model's latents."""
    from comfy.taesd.taesd import TAESD

    path = taesd_decoder_path(model)
    if path not in _taesd_cache:
        fmt = latent_format(model)
        with torch.inference_mode(False):
            taesd = TAESD(decoder_path=path, latent_channels=fmt.latent_channels)
            taesd.vae_scale.data.fill_(fmt.scale_factor)
            taesd.vae_shift.data.fill_(getattr(fmt, "shift_factor", 0.0) or 0.0)
            _taesd_cache[path] = taesd.float().eval().requires_grad_(False)
    return _taesd_cache[path]


def make_decoder(model, vae, choice: str, device: torch.device):
    """``decode(x0) -> image NCHW in [0, 1]`` for model-space latents, differentiable, fp32.

    Uses ``first_stage_model.decode`` rather than ``VAE.decode`` (which clamps, writes into a preallocated tensor
    and may fall back to an inference-mode tiled path).
    """
    fmt = latent_format(model)
    if choice == "taesd":
        module = grad_copy(load_taesd(model), device)
    else:
        if vae is None:
            raise ValueError("decoder 'vae' needs a VAE connected (or choose decoder 'taesd')")
        module = grad_copy(vae.first_stage_model, device)

    def decode(x0: torch.Tensor) -> torch.Tensor:
        return (module.decode(fmt.process_out(x0.float())) + 1) / 2

    return decode


def vae_ratio(vae, choice: str) -> int:
    if choice == "taesd" or vae is None:
        return SPATIAL_RATIO
    return int(getattr(vae, "downscale_ratio", SPATIAL_RATIO))


# --- LPIPS --------------------------------------------------------------------------------------------------------

def register_lpips_dirs(dirs) -> None:
    """Add folders to ComfyUI's ``lpips`` model folder list (e.g. from a command line)."""
    lpips_search_dirs()
    for d in dirs:
        folder_paths.add_model_folder_path(LPIPS_FOLDER, str(d))


def lpips_search_dirs() -> list[str]:
    """``models/lpips`` (registered with ComfyUI, so extra_model_paths.yaml can add more) and its files' folders."""
    if LPIPS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(LPIPS_FOLDER, os.path.join(folder_paths.models_dir, LPIPS_FOLDER))
    return list(folder_paths.get_folder_paths(LPIPS_FOLDER))
