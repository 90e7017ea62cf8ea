"""The one place that knows ComfyUI internals: model/latent plumbing, input checks, gradients under inference mode.

Everything here turns ComfyUI objects (ModelPatcher, CONDITIONING lists, VAE, IMAGE) into what the core expects
(``denoiser(x, sigma) -> x0`` in model latent space, ``decode(x0) -> image NCHW in [0, 1]``) and back.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os

import comfy.model_management
import comfy.patcher_extension
import comfy.utils
import folder_paths
import torch
import torch.utils.checkpoint

log = logging.getLogger(__name__)

LPIPS_FOLDER = "lpips"
SPATIAL_RATIO = 8  # image pixels per latent pixel for SD1.x / SDXL VAEs and TAESD


# --- model facts -------------------------------------------------------------------------------------------------

def latent_format(model):
    return model.get_model_object("latent_format")


def model_family(model) -> str:
    """A short name for messages: the latent format's class (SD15, SDXL, ...); Qwen-Image by its own name (its
    latent format, Wan21, is the Wan video models')."""
    name = type(model.model.model_config).__name__
    if name in EXTRA_FLOW_MODELS:
        return EXTRA_FLOW_MODELS[name]
    return type(latent_format(model)).__name__


def context_dim(model) -> int | None:
    """The width of the text token sequence the model takes (SD1.x 768, SDXL 2048, SD3 and Flux 4096 (T5-XXL))."""
    unet_config = model.model.model_config.unet_config
    embedder = (unet_config.get("context_embedder_config") or {}).get("params", {})  # SD3's MMDiT
    return unet_config.get("context_dim") or embedder.get("in_features") or unet_config.get("context_in_dim")


def pooled_dim(model) -> int | None:
    """The width of the pooled text vector where the model takes it as it is (SD3: CLIP-L + CLIP-G, 2048; Flux:
    CLIP-L, 768); None where it is part of a larger vector (SDXL adds size embeddings) or not used."""
    unet_config = model.model.model_config.unet_config
    if is_flow(model):
        return unet_config.get("adm_in_channels") or unet_config.get("vec_in_dim")
    return None


def needs_pooled(model) -> bool:
    unet_config = model.model.model_config.unet_config
    return unet_config.get("adm_in_channels") is not None or unet_config.get("vec_in_dim") is not None


# --- model families ----------------------------------------------------------------------------------------------
#
# The checkpoint families PSEdit has been shown to handle (tests/host: tiny models of each built from ComfyUI's own
# classes), by ComfyUI's model config class; every other family (video and audio models, Stable Cascade, AuraFlow,
# Flux Fill / schnell, Chroma, ...) stops at the first PSEdit node with a message that names these.
SUPPORTED_MODELS = {"SD15": "SD1.x", "SD20": "SD2.x", "SDXL": "SDXL", "SD3": "SD3 / SD3.5", "Flux": "Flux.1 dev"}
SUPPORTED_TEXT = "SD1.x, SD2.x, SDXL (also Playground v2.5), SD3 / SD3.5 and Flux.1 dev"


def model_sampling(model):
    return model.get_model_object("model_sampling")


def is_flow(model) -> bool:
    """Whether the model samples in the flow-matching parameterisation ``x = (1 - sigma) x0 + sigma eps``
    (ComfyUI's ``CONST``: SD3 / SD3.5, Flux)."""
    import comfy.model_sampling

    return isinstance(model_sampling(model), comfy.model_sampling.CONST)


def is_guidance_distilled(model) -> bool:
    """Whether the guidance strength is an input of the model (Flux.1 dev) rather than a CFG over two predictions."""
    return bool(model.model.model_config.unet_config.get("guidance_embed"))


# Flow-matching families some nodes run on beyond those every PSEdit node handles: Qwen-Image has real CFG and flow
# matching like SD3, with video-style latents [B, 16, 1, h, w] (Wan 2.1 VAE). The nodes named below run on it (their
# checks pass extra_flow=True); null-text inversion, Prompt-to-Prompt, Plug-and-Play and the Flux guider do not.
EXTRA_FLOW_MODELS = {"QwenImage": "Qwen-Image"}
EXTRA_FLOW_NODES = ("PSEdit FlowEdit Guider, DDIM Invert with Inverted Noise, Triple Guider, Edit Mask and Perceptual "
                    "Guidance (decoder 'vae')")


def is_extra_flow_model(model) -> bool:
    """Whether ``model`` is one of :data:`EXTRA_FLOW_MODELS` sampling in flow matching."""
    return type(model.model.model_config).__name__ in EXTRA_FLOW_MODELS and is_flow(model)


def check_supported(model, node: str, extra_flow: bool = False) -> None:
    """Raise, naming the supported families, unless ``model`` belongs to one PSEdit has been shown to handle: an
    SD1.x/SD2.x/SDXL UNet with eps, v or EDM (Playground v2.5) prediction, or SD3 / Flux dev in flow matching;
    with ``extra_flow``, also one of :data:`EXTRA_FLOW_MODELS` (the nodes tested on it say so)."""
    import comfy.model_sampling

    name = type(model.model.model_config).__name__
    if is_extra_flow_model(model):
        if extra_flow:
            return
        family = EXTRA_FLOW_MODELS[name]
        raise ValueError(
            f"{node} supports {SUPPORTED_TEXT} checkpoints, not {family}; on {family} PSEdit runs "
            f"{EXTRA_FLOW_NODES}: edit with those, or load a checkpoint of a supported family"
        )
    sampling = model_sampling(model)
    kind = type(sampling).__bases__[-1].__name__  # ModelSampling(schedule, prediction): EPS, V_PREDICTION, CONST...
    flow_family = name in ("SD3", "Flux")
    fits = isinstance(sampling, comfy.model_sampling.CONST if flow_family else comfy.model_sampling.EPS)
    if name in SUPPORTED_MODELS and fits and getattr(latent_format(model), "latent_dimensions", 2) == 2:
        return
    raise ValueError(
        f"{node} supports {SUPPORTED_TEXT} checkpoints; this MODEL is {name} ({model_family(model)} latents, {kind} "
        "prediction), a family PSEdit has not been shown to handle: load a checkpoint of one of those families"
    )


def inversion_input_scale(model):
    """``s(sigma_from, sigma_to)`` of DDIM inversion's target convention (psedit_core.inversion eq. 4-5) from the
    model's own input scaling ``c_in`` (``calculate_input``): ``c_in(sigma_from) / c_in(sigma_to)``, so the model
    sees the same input at the target level (eps/v: ``sqrt((1 + sigma_to^2) / (1 + sigma_from^2))``; flow: 1)."""
    sampling = model_sampling(model)

    def scale(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
        one = torch.ones((), dtype=torch.float32, device=sigma_to.device)
        return sampling.calculate_input(sigma_from, one) / sampling.calculate_input(sigma_to, one)

    return scale


def check_flow_handover(model, noise: torch.Tensor, sigmas: torch.Tensor) -> None:
    """Raise where a flow model would start sampling from nothing: at ``sigma = 1`` ComfyUI's ``noise_scaling`` is
    ``sigma * noise + (1 - sigma) * latent_image``, so DisableNoise with DDIM Invert's LATENT starts from zeros."""
    if not is_flow(model) or sigmas.numel() < 2 or float(sigmas[0]) < 1.0 - 1e-6 or noise.any():
        return
    raise ValueError(
        "this flow model (SD3 / Flux / Qwen-Image) would start sampling from an all-zero latent: at sigma 1 ComfyUI "
        "replaces latent_image by the noise, so DisableNoise hands the inverted latent over as nothing. Connect PSEdit "
        "Inverted Noise (from DDIM Invert's inversion) to SamplerCustomAdvanced's noise instead of DisableNoise"
    )


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
        pooled = pooled_dim(model)
        if pooled is not None and extra["pooled_output"].shape[-1] != pooled:
            raise ValueError(
                f"{name} conditioning has a pooled output of width {extra['pooled_output'].shape[-1]} but this "
                f"{model_family(model)} model expects {pooled}: encode the prompt with the CLIP of the same checkpoint "
                "as the MODEL"
            )


def check_latent(model, samples: torch.Tensor, name: str = "latent") -> None:
    fmt = latent_format(model)
    channels, ndim = fmt.latent_channels, 2 + getattr(fmt, "latent_dimensions", 2)  # Qwen-Image: [B, 16, 1, h, w]
    if samples.ndim != ndim or samples.shape[1] != channels:
        raise ValueError(
            f"{name} has shape {tuple(samples.shape)} but this {model_family(model)} model works on {channels}-channel "
            f"latents of {ndim} dimensions: VAE-encode the image with this checkpoint's VAE"
        )
    if not torch.isfinite(samples).all():
        raise ValueError(f"{name} contains NaN/inf: re-encode the image (an fp16 VAE can overflow; use fp32/bf16)")
    warn_if_off_native(model, samples)


# The image side each family was trained at (its latent side is this / 8): a latent of far another size is slow and
# out of the model's training distribution.
NATIVE_SIDE = {"SD15": 512, "SDXL": 1024, "SDXL_Playground_2_5": 1024, "SD3": 1024, "Flux": 1024, "Qwen-Image": 1328}
_warned_sizes: set = set()


def warn_if_off_native(model, samples: torch.Tensor) -> None:
    """Log once per family and size when a latent's area is over 2.5x or under a quarter of the model's native
    one (e.g. a 4000x3000 phone photo VAE-encoded as it is)."""
    family = model_family(model)
    side = NATIVE_SIDE.get(family)
    if side is None:
        return
    pixels = samples.shape[-2] * samples.shape[-1] * SPATIAL_RATIO**2
    key = (family, tuple(samples.shape[-2:]))
    if 0.25 <= pixels / side**2 <= 2.5 or key in _warned_sizes:
        return
    _warned_sizes.add(key)
    log.warning(
        "the latent is %dx%d pixels, far from %s's native %dx%d: scale the photo first (e.g. ImageScaleToTotalPixels, "
        "%.2f megapixels) or expect a slow edit the model was not trained for",
        samples.shape[-1] * SPATIAL_RATIO, samples.shape[-2] * SPATIAL_RATIO, family, side, side, side**2 / 2**20,
    )


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
    VAE latent) to model space, exactly as for sampling. ``fn`` gets that model-space latent itself (for flow models
    the sampler's own start, ``noise_scaling``'s ``(1 - sigma_0) * latent``, is not it). Returns what ``fn`` returned
    (a model-space latent), converted back to a raw latent (``process_out`` only: flow models'
    ``inverse_noise_scaling`` would divide it by ``1 - sigmas[-1]``), and the dict ``store`` that ``fn`` filled.
    """
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    store = {}
    result = {}

    def sampler_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        start = getattr(model_k, "latent_image", None)  # KSamplerX0Inpaint holds the model-space latent
        result["x"] = fn(model_k, x if start is None else start.to(x), sigmas, extra_args or {}, store)
        return result["x"]

    guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(sampler_fn), sigmas,
                  disable_pbar=True, seed=0)
    return latent_format(model).process_out(result["x"].to(torch.float32)), store


def run_on_trajectory(model, payload, positive, negative, cfg: float, fn):
    """:func:`run_in_sampler` for work over an inversion trajectory (``payload.inversion``) rather than a latent;
    returns the dict ``fn`` filled."""
    inversion = payload.inversion
    latent = latent_format(model).process_out(inversion.latents[0].detach().cpu().float())
    _, store = run_in_sampler(model, positive, negative, cfg, latent, inversion.sigmas.cpu(), fn)
    return store


# --- sampling hooks (ComfyUI's documented extension points, one place) ------------------------------------------------

def add_wrapper(patcher, kind: str, key: str, fn) -> None:
    """Register ``fn(executor, *args, **kwargs)`` as a ``patcher_extension`` wrapper of ``kind`` (OUTER_SAMPLE,
    PREDICT_NOISE, APPLY_MODEL, ...) on a ModelPatcher, under ``key``."""
    patcher.add_wrapper_with_key(getattr(comfy.patcher_extension.WrappersMP, kind), key, fn)


def clone_options(model_options: dict) -> dict:
    """A model-options dict a pass may change without touching the sampler's (ComfyUI's own clone)."""
    import comfy.model_patcher

    return comfy.model_patcher.create_model_options_clone(model_options)


def calc_cond_batch(inner_model, conds: list, x: torch.Tensor, sigma: torch.Tensor, model_options: dict) -> list:
    """The denoised predictions of each cond list, batched into as few model calls as ComfyUI batches them."""
    import comfy.samplers

    return comfy.samplers.calc_cond_batch(inner_model, conds, x, sigma, model_options)


def prepared_cond(conditioning) -> list:
    """A CONDITIONING as ``CFGGuider.conds`` holds it before ComfyUI prepares it for sampling."""
    import comfy.sampler_helpers

    return comfy.sampler_helpers.convert_cond(conditioning)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra: dict) -> torch.Tensor:
    """ComfyUI's own attention for a replace patch's ``(q, k, v, extra_options)``."""
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"), transformer_options=extra)


# --- progress and cancel -----------------------------------------------------------------------------------------

def throw_if_interrupted() -> None:
    """Stop here if the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


class Progress:
    """A ComfyUI progress bar whose every step also honours the user's Cancel."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, *_args, **_kwargs) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update(1)


# --- gradients under inference mode --------------------------------------------------------------------------------
#
# ComfyUI builds and loads every model under ``torch.inference_mode()``; autograd cannot save such tensors for
# backward. Nothing here copies a model: each ``comfy.ops`` layer on a gradient path gets a weight wrapper,
# which makes ComfyUI's own cast (``cast_bias_weight``) hand the layer a fresh ordinary copy of its weight at each
# forward. The copies live only as long as the autograd graph that saved them.

def differentiable_patcher(patcher, unet: bool = True):
    """A clone of ``patcher`` through which gradients can flow, whatever ComfyUI attached to it.

    - every ``comfy.ops`` layer of the model casts a fresh ordinary, detached copy of its weight and bias (a weight
      wrapper), and parameters no such layer casts (TAESD's scale and shift) are object-patched with ordinary copies;
    - with ``unet``: control models on the conds evaluated with gradients enabled (ControlNets, T2I adapters) take
      part without gradients of their own for the call (a CALC_COND_BATCH wrapper, :func:`frozen_for_grad`); each
      skip connection is handed on as a new tensor (an ``input_block_patch_after_skip``), so the ControlNet
      residuals ComfyUI's UNet adds to the skips in place do not modify a tensor autograd saved; and ComfyUI's
      memory estimate for the sampling counts the weight copies and the activations kept for backward (a
      ``memory_required`` object patch).
    """
    clone = patcher.clone()
    n = 0
    for name, module in clone.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        if getattr(module, "weight", None) is not None:
            clone.add_weight_wrapper(f"{name}.weight", _frozen)
            n += 1
        if getattr(module, "bias", None) is not None:
            clone.add_weight_wrapper(f"{name}.bias", _frozen)
    for name, param in _loose_inference_params(clone.model, clone.object_patches_backup):
        with torch.inference_mode(False):
            clone.add_object_patch(name, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
    if unet:
        clone.add_object_patch("memory_required", _grad_memory(clone))
        add_grad_options(clone.model_options)
    log.debug("gradient-enabled patcher: %d layers wrapped", n)
    return clone


def add_grad_options(model_options: dict) -> None:
    """Add, in place, the sampling options a gradient-enabled UNet patcher needs (a guider keeps its own copy of
    the model options, so a guider sampling such a patcher gets them too): the ControlNet CALC_COND_BATCH wrapper,
    the fresh-skip block patch, and a PREPARE_SAMPLING wrapper that loads the models with the larger memory
    estimate, so ComfyUI offloads (lowvram) rather than running out of memory in backward."""
    add = comfy.patcher_extension.add_wrapper_with_key
    add(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "psedit_grad_controls", _controls_with_grad,
        model_options, is_model_options=True)
    add(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "psedit_grad_memory", _prepare_with_grad_memory,
        model_options, is_model_options=True)
    add(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "psedit_grad_forward", _grad_forward, model_options,
        is_model_options=True)
    patches = model_options.setdefault("transformer_options", {}).setdefault("patches", {})
    if _fresh_skip not in patches.get("input_block_patch_after_skip", []):
        patches["input_block_patch_after_skip"] = [*patches.get("input_block_patch_after_skip", []), _fresh_skip]


def _modifies_saved_tensors(base_model) -> bool:
    """Whether the diffusion model adds into tensors it has saved for backward: Flux's blocks do ``x += ...`` after a
    norm of ``x`` (the double blocks on the text stream, the single blocks on the joint stream)."""
    import comfy.ldm.flux.model

    return isinstance(getattr(base_model, "diffusion_model", None), comfy.ldm.flux.model.Flux)


def _copy_if_grad(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone() if tensor.requires_grad else tensor


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _grad_forward(executor, *args, **kwargs):
    """An APPLY_MODEL wrapper for forwards with gradients on (a pass-through otherwise):

    - ComfyUI's differentiable kernels: with ``comfy.model_management.in_training`` set (what the stock training node
      sets), 0.33's Flux and other models take plain torch ops (RoPE) instead of comfy-kitchen kernels that have no
      backward;
    - a model that modifies saved tensors in place (:func:`_modifies_saved_tensors`) runs with autograd saving a copy
      of each tensor on the gradient path, so backward sees the values the forward used (more activation memory,
      only then)."""
    if not torch.is_grad_enabled():
        return executor(*args, **kwargs)
    with contextlib.ExitStack() as stack:
        stack.enter_context(training_kernels())
        if _modifies_saved_tensors(executor.class_obj):
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_copy_if_grad, _unpack))
        return executor(*args, **kwargs)


@contextlib.contextmanager
def training_kernels():
    """Within the block ComfyUI's models pick differentiable implementations (``model_management.in_training``,
    ComfyUI 0.33; ComfyUI versions without the flag have only those)."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


def _prepare_with_grad_memory(executor, model, noise_shape, conds, *args, **kwargs):
    """After ComfyUI's own preparation (the model is loaded, so its ``memory_required`` is the gradient one), load
    the same models again with that estimate: ``load_models_gpu`` then frees memory or partially offloads (with
    ComfyUI 0.33's dynamic VRAM it evicts other models' weights for it). What this wrapper does not use (ComfyUI
    0.33's ``force_full_load`` / ``force_offload``, anything later) is passed through unchanged."""
    import comfy.sampler_helpers

    prepared = executor(model, noise_shape, conds, *args, **kwargs)
    if kwargs.get("force_offload"):  # ComfyUI already asked for the most offloading there is
        return prepared
    conds_out, models = prepared[1], prepared[2]
    memory, minimum = comfy.sampler_helpers.estimate_memory(model, noise_shape, conds_out)
    load = comfy.model_management.load_models_gpu
    extra = {k: v for k, v in kwargs.items() if k == "force_full_load" and _accepts(load, k)}
    load([model] + list(models), memory_required=memory, minimum_memory_required=minimum, **extra)
    return prepared


def _accepts(fn, name: str) -> bool:
    import inspect

    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _loose_inference_params(model: torch.nn.Module, backup: dict | None = None):
    """``(name, parameter)`` for the inference-tensor parameters no ``comfy.ops`` layer casts (e.g. TAESD's
    ``vae_scale`` / ``vae_shift``, the RMS norms of SD3's and Flux's q/k): they are small, and an object patch swaps
    each for an ordinary copy while the patcher is loaded. A parameter another clone has object-patched (and left in
    place: ComfyUI detaches a clone without unpatching) is judged by its original in the clones' shared ``backup``,
    which ComfyUI puts back when this clone loads."""
    for prefix, module in model.named_modules():
        if hasattr(module, "weight_function"):
            continue
        for name, param in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            original = (backup or {}).get(full, param)
            if isinstance(original, torch.Tensor) and original.is_inference():
                yield full, original


def _frozen(tensor: torch.Tensor) -> torch.Tensor:
    """The weight wrapper: the weight ComfyUI's cast hands the layer, detached (a layer whose parameters still ask
    for gradients, as ControlNets do, records no weight gradient and never has to save an inference-tensor input,
    a ControlNet's cached hint, for backward) and private to this forward.

    ComfyUI 0.3.x copies a weight that has a function; 0.33 may instead hand a view of a cast buffer that the next
    layer overwrites (lowvram offload streams, dynamic VRAM) or the resident inference tensor itself (dynamic VRAM,
    ``.to`` of the same dtype copies nothing). Autograd would save either for backward, so those are copied here;
    a fresh copy (no base, not an inference tensor) and any weight of a forward without gradients are handed on
    as they are."""
    shared = tensor.is_inference() or tensor._base is not None  # (a detached view no longer names its base)
    out = tensor.detach()
    return out.clone() if shared and torch.is_grad_enabled() else out


def _fresh_skip(h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    return h.clone() if h.requires_grad else h


GRAD_ACTIVATION_FACTOR = 3.0  # backward keeps about this many forward estimates of activations (benchmarks/)


def weight_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s floating-point parameters, stored as ``dtype`` (default: as they are)."""
    return sum(p.numel() * (dtype.itemsize if dtype else p.element_size())
               for p in module.parameters() if p.dtype.is_floating_point)


def _grad_memory(patcher):
    """``memory_required`` that adds what a gradient evaluation holds: the weight copies (in the compute dtype)
    and the activations saved for backward (``GRAD_ACTIVATION_FACTOR`` x the forward estimate)."""
    base = patcher.get_model_object("memory_required")
    model = patcher.model
    compute = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    copies = weight_bytes(model.diffusion_model, compute)

    def memory_required(input_shape, *args, **kwargs):
        known = {k: v for k, v in kwargs.items() if _accepts(base, k)}  # a newer caller's extras the model lacks
        return GRAD_ACTIVATION_FACTOR * base(input_shape, *args, **known) + copies

    return memory_required


CONTROL_MODULE_ATTRS = ("control_model", "t2i_model")  # ControlNet / ControlLora, T2IAdapter


def control_modules(conds) -> list[torch.nn.Module]:
    """The control models (ControlNets, T2I adapters, with their chains) attached to a list of cond lists."""
    found, seen = [], set()
    for cond in conds:
        for entry in cond or ():
            control = entry.get("control") if isinstance(entry, dict) else None
            while control is not None and id(control) not in seen:
                seen.add(id(control))
                for attr in CONTROL_MODULE_ATTRS:
                    module = getattr(control, attr, None)
                    if isinstance(module, torch.nn.Module):
                        found.append(module)
                control = getattr(control, "previous_controlnet", None)
    return found


@contextlib.contextmanager
def frozen_for_grad(modules):
    """Within the block, ``modules`` take part in a gradient evaluation without gradients of their own: every
    ``comfy.ops`` layer casts an ordinary, detached copy of its weight (wrapper appended; a ControlNet is
    differentiated with respect to its input), and no parameter asks for a gradient (a T2I adapter's plain torch
    layers then build no graph over their inference-tensor weights). Everything is put back on exit."""
    saved, asking = [], []
    for root in modules:
        for m in root.modules():
            if hasattr(m, "weight_function"):
                saved.append((m, m.weight_function, m.bias_function))
                m.weight_function = [*m.weight_function, _frozen]
                m.bias_function = [*m.bias_function, _frozen]
        asking += [p for p in root.parameters() if p.requires_grad]
    for p in asking:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, weight_fns, bias_fns in saved:
            m.weight_function, m.bias_function = weight_fns, bias_fns
        with torch.inference_mode(any(p.is_inference() for p in asking)):  # inference tensors only change there
            for p in asking:
                p.requires_grad_(True)


def _controls_with_grad(executor, model, conds, *args, **kwargs):
    if not torch.is_grad_enabled():
        return executor(model, conds, *args, **kwargs)
    with frozen_for_grad(control_modules(conds)):
        return executor(model, conds, *args, **kwargs)


_GRAD_FAILURES = ("Inference tensors cannot be saved for backward", "modified by an inplace operation",
                  "does not require grad and does not have a grad_fn")


@contextlib.contextmanager
def explain_grad_failure(what: str, alternative: str):
    """Turn autograd's refusal to differentiate a model part that ComfyUI attached (a patch or control model PSEdit
    cannot make differentiable) into an error that names the part's kind and ``alternative``."""
    try:
        yield
    except RuntimeError as exc:
        if not any(m in str(exc) for m in _GRAD_FAILURES):
            raise
        raise RuntimeError(
            f"{what} needs gradients through the model, and a patch or control model attached to it cannot be "
            f"differentiated ({str(exc).splitlines()[0]}): {alternative}, or remove that patch"
        ) from exc


def ordinary_latent_format(fmt):
    """A copy of a latent format whose tensors (per-channel means, stds, ...) are ordinary tensors: nodes such as
    ModelSamplingContinuousEDM build them under inference mode, and ``process_out`` multiplies by them."""
    with torch.inference_mode(False):
        out = copy.copy(fmt)
        for k, v in vars(fmt).items():
            if isinstance(v, torch.Tensor):
                setattr(out, k, v.clone())
    return out


# --- decoders --------------------------------------------------------------------------------------------------------

AUTO_TAESD, VAE_DECODER = "taesd", "vae"  # decoder choices besides a file of models/vae_approx


def is_taesd(choice: str) -> bool:
    """Whether a decoder choice is a TAESD decoder ("taesd": the model's own, or a file name) rather than the VAE."""
    return choice != VAE_DECODER


def taesd_decoder_files() -> list[str]:
    """The TAESD decoders in ``models/vae_approx`` (``*_decoder.*``), for a node's decoder choice."""
    return sorted(f for f in folder_paths.get_filename_list("vae_approx")
                  if os.path.splitext(os.path.basename(f))[0].endswith("_decoder"))


def taesd_decoder_path(model, choice: str = AUTO_TAESD) -> str:
    """The TAESD decoder file for ``model``: the one its latent format names ("taesd"), or the file ``choice`` names
    in ``models/vae_approx`` (checked against the model's latents where its name is a known TAESD decoder's)."""
    wanted = getattr(latent_format(model), "taesd_decoder_name", None)
    if choice != AUTO_TAESD:
        stem = os.path.splitext(os.path.basename(choice))[0]
        if stem in TAESD_LATENTS and wanted is not None and stem != wanted:
            raise ValueError(
                f"decoder {choice} decodes {TAESD_LATENTS[stem]} latents but this model's are {model_family(model)}: "
                f"choose {wanted}.safetensors (or 'taesd', which picks it)"
            )
        path = folder_paths.get_full_path("vae_approx", choice)
        if path is None:
            raise FileNotFoundError(
                f"decoder {choice} is not in {folder_paths.get_folder_paths('vae_approx')}: download it from the "
                "madebyollin/taesd repository (a workflow's missing-models dialog offers it), or choose decoder 'vae'"
            )
        return path
    if wanted is None:
        raise ValueError(f"no TAESD decoder exists for {model_family(model)} latents: choose decoder 'vae'")
    for f in folder_paths.get_filename_list("vae_approx"):
        if f.startswith(f"{wanted}."):
            return folder_paths.get_full_path_or_raise("vae_approx", f)
    raise FileNotFoundError(
        f"decoder 'taesd' needs {wanted}.safetensors (or .pth) in {folder_paths.get_folder_paths('vae_approx')}: "
        "download it from the madebyollin/taesd repository, or choose decoder 'vae'"
    )


# The latents each TAESD decoder was trained on (its input is that format's model-space latent).
TAESD_LATENTS = {"taesd_decoder": "SD15", "taesdxl_decoder": "SDXL", "taesd3_decoder": "SD3",
                 "taef1_decoder": "Flux"}
_taesd_patchers: dict[str, object] = {}


def taesd_patcher(model, choice: str = AUTO_TAESD):
    """A ModelPatcher (gradient-enabled) around TAESD's decoder alone, fp32, cached per file: ComfyUI loads it with
    the sampling (memory accounted, offloaded when memory is short) and unloads it like any model."""
    import comfy.model_patcher
    from comfy.taesd.taesd import Decoder

    path = taesd_decoder_path(model, choice)
    if path not in _taesd_patchers:
        with torch.inference_mode(False):
            decoder = Decoder(latent_channels=latent_format(model).latent_channels)
            decoder.load_state_dict(comfy.utils.load_torch_file(path, safe_load=True))
            decoder = decoder.float().eval().requires_grad_(False)
        # ComfyUI's own patcher class for models it loads (0.33: the dynamic-VRAM patcher where comfy-aimdo runs, so
        # the decoder shares its memory management with the UNet; the plain ModelPatcher on CPUs and before 0.33)
        core = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
        patcher = core(decoder, load_device=comfy.model_management.get_torch_device(),
                       offload_device=comfy.model_management.unet_offload_device())
        _taesd_patchers[path] = differentiable_patcher(patcher, unet=False)
    return _taesd_patchers[path]


def _taesd_input(model):
    """``x0 -> TAESD input``: the model's latent taken to the latent space its TAESD decoder was trained on (the
    identity for SD1.x and SDXL; Playground v2.5's per-channel latents go through the raw VAE latent)."""
    import comfy.latent_formats

    fmt = latent_format(model)
    trained = getattr(comfy.latent_formats, TAESD_LATENTS.get(fmt.taesd_decoder_name, ""), None)
    if trained is None or type(fmt) is trained:
        return lambda x0: x0
    fmt, ref = ordinary_latent_format(fmt), ordinary_latent_format(trained())
    return lambda x0: ref.process_in(fmt.process_out(x0))


def decoder_patcher(model, vae, choice: str):
    """The ModelPatcher whose weights the guidance decoder uses, gradient-enabled: TAESD's decoder ("taesd" or a
    file of models/vae_approx), or a clone of the checkpoint VAE's own patcher (no copy of the VAE is made)."""
    if is_taesd(choice):
        return taesd_patcher(model, choice)
    if vae is None:
        raise ValueError("decoder 'vae' needs a VAE connected (or choose decoder 'taesd')")
    return differentiable_patcher(vae.patcher, unet=False)


def make_decoder(model, vae, choice: str, patcher=None):
    """``decode(x0) -> image NCHW in [0, 1]`` for model-space latents, differentiable.

    TAESD runs in fp32 (it is tiny); the VAE in the dtype ComfyUI chose for it (``vae.vae_dtype``), on its device.
    Uses ``first_stage_model.decode`` rather than ``VAE.decode`` (which clamps, writes into a preallocated tensor
    and may fall back to an inference-mode tiled path).
    """
    patcher = patcher or decoder_patcher(model, vae, choice)
    module, device = patcher.model, patcher.load_device
    if is_taesd(choice):
        to_input = _taesd_input(model)

        def decode(x0: torch.Tensor) -> torch.Tensor:
            z = to_input(x0).to(device, torch.float32)
            if torch.is_grad_enabled() and z.requires_grad:
                # Gradient checkpointing, one segment per layer (20): backward recomputes each block's inner
                # activations instead of keeping them. With the checkpointed LPIPS trunk, a 512-px decode + VGG
                # LPIPS gradient holds 1.1 GiB instead of 1.6 (CPU, fp32); the layers are cheap next to the UNet.
                out = torch.utils.checkpoint.checkpoint_sequential(module, len(module), z, use_reentrant=False)
            else:
                out = module(z)
            return out.to(x0.device, torch.float32)

        return decode

    fmt = ordinary_latent_format(latent_format(model))
    dtype = getattr(vae, "vae_dtype", torch.float32)
    scale, shift = vae_output_map(vae)

    def decode(x0: torch.Tensor) -> torch.Tensor:
        z = fmt.process_out(x0.float()).to(device, dtype)
        out = module.decode(z).to(x0.device, torch.float32)
        if out.ndim == 5:  # video-style VAEs (Qwen-Image's Wan 2.1 VAE, a TAEHV): [B, C, T, H, W], one frame
            if out.shape[2] != 1:
                raise ValueError(f"the VAE decoded {out.shape[2]} frames; perceptual guidance compares one image")
            out = out[:, :, 0]
        return out * scale + shift

    return decode


def vae_output_map(vae) -> tuple[float, float]:
    """``(a, b)`` with ``image = a * out + b``: the affine part of the VAE's own ``process_output`` (which clamps
    in place, so it is measured on two values inside its range rather than applied to a tensor with gradients).
    ``(0.5, 0.5)`` for the VAEs whose decoder outputs [-1, 1] (SD, SDXL, SD3, Flux, Wan 2.1), ``(1, 0)`` for those
    that output [0, 1] (TAEHV / lighttaew2_1 loaded by Load VAE)."""
    process = getattr(vae, "process_output", None)
    if process is None:
        return 0.5, 0.5
    with torch.inference_mode(False):
        lo, hi = process(torch.tensor([-0.25, 0.25])).tolist()
    return (hi - lo) / 0.5, (hi + lo) / 2


def vae_ratio(vae, choice: str) -> int:
    """Image pixels per latent pixel (a video VAE's ``downscale_ratio`` is ``(time, h, w)``: its spatial ``w``)."""
    if is_taesd(choice) or vae is None:
        return SPATIAL_RATIO
    ratio = getattr(vae, "downscale_ratio", SPATIAL_RATIO)
    return int(ratio[-1] if isinstance(ratio, (tuple, list)) else ratio)


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
