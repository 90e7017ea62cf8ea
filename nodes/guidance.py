"""PSEdit Triple Guider, Perceptual Guidance and Step Window nodes.

Both guiders hand ``SamplerCustomAdvanced`` a GUIDER, so every stock sampler, scheduler, preview and Cancel works.
Windows are evaluated against the schedule being sampled (``transformer_options["sample_sigmas"]``).
"""

from __future__ import annotations

import copy
import logging
import math

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import node_helpers
import torch
from comfy_api.latest import io

from ..psedit_core.lpips_loader import LPIPS_NETS, get_lpips
from ..psedit_core.masks import fit_mask, masked_perceptual_loss
from ..psedit_core.perceptual import TARGETS, PerceptualGuidanceConfig, lpips_loss, perceptual_guidance
from ..psedit_core.schedule import StepWindow, step_index
from . import _comfy
from .nulltext import NullScheduleType

log = logging.getLogger(__name__)

WindowType = io.Custom("PSEDIT_WINDOW")


def window_active(window: StepWindow | None, model_options: dict, sigma: torch.Tensor) -> bool:
    """Whether a model evaluation at ``sigma`` lies in ``window`` of the schedule being sampled."""
    if window is None or window.is_full:
        return True
    sigmas = _comfy.sample_sigmas(model_options)
    if sigmas is None:
        raise RuntimeError("PSEdit step windows need the sampler's SIGMAS: sample with SamplerCustomAdvanced")
    window.check_not_empty(sigmas.numel() - 1)
    return window.contains(sigmas, sigma)


class StepWindowNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditStepWindow",
            display_name="PSEdit Step Window",
            category="PSEdit",
            description=(
                "A range of sampling steps, as fractions of the step count, in which a PSEdit guidance acts. "
                "start 0, end 0.4 = the first 40% of the steps (the paper's text guidance: first 20 of 50)."
            ),
            inputs=[
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step of the window, as a fraction of the steps (0 = the first step)."),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the window (exclusive), as a fraction of the steps (1 = the last)."),
            ],
            outputs=[WindowType.Output(
                "window", display_name="window", tooltip="Connect to a PSEdit guider's window input.")],
        )

    @classmethod
    def execute(cls, start, end) -> io.NodeOutput:
        return io.NodeOutput(StepWindow(float(start), float(end)))


# --- triple guidance -------------------------------------------------------------------------------------------------

class TripleGuider(comfy.samplers.CFGGuider):
    """``null + gamma (src - null) + beta (edit - src)`` inside the window, plain CFG(null, edit, gamma) outside and
    at ``beta = gamma`` (where the source cancels: two branches instead of three).

    It composes with model patches the way DualCFGGuider(cond1 = edit, cond2 = source, negative = null,
    cfg_conds = beta, cfg_cond2_negative = gamma) does, which computes the same sum:

    - the conds are keyed as ComfyUI's guiders key them (edit ``positive``, null ``negative``, source ``middle``
      with ``prompt_type`` negative, per-step nulls negative too), so ``process_conds`` copies an apply-to-uncond
      ControlNet or GLIGEN from the edit to every other branch;
    - one batched ``calc_cond_batch`` (or the model's ``sampler_calc_cond_batch_function``) in ComfyUI's cond-first
      order ``[edit, null, source]``: pre-CFG hooks (TCFG, APG) read ``conds_out[0]`` as the cond and ``[1]`` as the
      uncond, and ``cond_or_uncond`` is 0 for the edit, 1 for the null (what Self-Attention Guidance records) and
      2 for the source;
    - ``comfy.samplers.cfg_function(source, null, gamma)`` (so ``sampler_cfg_function`` patches such as RescaleCFG
      and the post-CFG hooks run there, on cond = source, uncond = null), plus ``beta (edit - src)``.
    """

    def set_conds(self, null, source, edit):
        source = node_helpers.conditioning_set_values(source, {"prompt_type": "negative"})
        self.inner_set_conds({"positive": edit, "negative": null, "middle": source})

    def set_params(self, gamma: float, beta: float, window: StepWindow | None, null_schedule=None):
        self.gamma, self.beta, self.window = gamma, beta, window
        self.null_schedule = null_schedule
        if null_schedule is not None:
            # One cond entry per step, so ComfyUI prepares every per-step null embedding like any other negative.
            self.inner_set_conds({k: node_helpers.conditioning_set_values(c, {"prompt_type": "negative"})
                                  for k, c in null_schedule.as_conds().items()})
            if abs(null_schedule.guidance - gamma) > 1e-6:
                log.warning("null schedule was optimised for guidance %.2f but gamma is %.2f: the photo is "
                            "reconstructed faithfully only when they match", null_schedule.guidance, gamma)

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        _comfy.check_flow_handover(self.model_patcher, noise, sigmas)
        return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def null_for(self, model_options, timestep):
        """The null conditioning for this step: the fixed one, or a per-step one from null-text inversion."""
        if self.null_schedule is None:
            return self.conds.get("negative")
        return self.conds.get(self.null_schedule.key_for(_comfy.sample_sigmas(model_options), timestep))

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        null = self.null_for(model_options, timestep)
        edit = self.conds.get("positive")
        if self.beta == self.gamma or not window_active(self.window, model_options, timestep):
            # beta = gamma: the source cancels (null + gamma (edit - null)), so CFG alone, one branch fewer
            return comfy.samplers.sampling_function(
                self.inner_model, x, timestep, null, edit, self.gamma, model_options=model_options, seed=seed
            )
        source = self.conds.get("middle")
        conds = [edit, null, source]
        if "sampler_calc_cond_batch_function" in model_options:
            out = model_options["sampler_calc_cond_batch_function"](
                {"conds": conds, "input": x, "sigma": timestep, "model": self.inner_model,
                 "model_options": model_options})
        else:
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": self.gamma, "timestep": timestep, "input": x,
                      "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        edit_pred, null_pred, source_pred = out[0], out[1], out[2]
        text = comfy.samplers.cfg_function(self.inner_model, source_pred, null_pred, self.gamma, x, timestep,
                                           model_options=model_options, cond=source, uncond=null)
        return text + (edit_pred - source_pred) * self.beta


class TripleGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditTripleGuider",
            display_name="PSEdit Triple Guider",
            category="PSEdit",
            description=(
                "Text guidance optimisation (arXiv 2312.06680 eq. 1-2): e = e_null + gamma (e_src - e_null) + "
                "beta (e_edit - e_src), from one batched model call. beta = 0 reconstructs the photo, larger beta "
                "edits more. Outside the window, and wherever beta = gamma (the source cancels), it is plain CFG "
                "on the edit prompt with scale gamma, from two branches. Model patches (RescaleCFG, TCFG, APG, "
                "SAG) and ControlNets apply as with DualCFGGuider (cond1 edit, cond2 source, negative null, "
                "cfg_conds beta, cfg_cond2_negative gamma), which gives the same sum."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL."),
                io.Conditioning.Input("null", tooltip="Unconditional conditioning (an empty prompt)."),
                io.Conditioning.Input("source", tooltip="The source caption: what the photo shows."),
                io.Conditioning.Input("edit", tooltip="The edit caption: what the photo should show."),
                io.Float.Input("gamma", default=7.5, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Text guidance scale (the usual CFG scale) toward the source caption."),
                io.Float.Input("beta", default=3.0, min=-10.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Edit strength: how far from the source caption toward the edit caption."),
                WindowType.Input("window", optional=True,
                                 tooltip="Steps where triple guidance acts (PSEdit Step Window); default all."),
                NullScheduleType.Input(
                    "null_schedule", optional=True,
                    tooltip="Per-step null embeddings from PSEdit Null-Text Inversion; replaces 'null' when given."),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced or PSEdit Perceptual Guidance.")],
        )

    @classmethod
    def execute(cls, model, null, source, edit, gamma, beta, window=None, null_schedule=None) -> io.NodeOutput:
        _comfy.check_supported(model, "PSEdit Triple Guider", extra_flow=True)
        if _comfy.is_guidance_distilled(model):
            raise ValueError(
                f"this {_comfy.model_family(model)} model is guidance-distilled (one prediction per step, no "
                "unconditional branch), so a null caption's prediction is not the unconditional one: use PSEdit Flux "
                "Guider, which gives the same triple guidance from the source and edit predictions"
            )
        for name, cond in (("null", null), ("source", source), ("edit", edit)):
            _comfy.check_conditioning(model, cond, name)
        if not (math.isfinite(gamma) and math.isfinite(beta)):
            raise ValueError("gamma and beta must be finite numbers")
        if null_schedule is not None:
            null_schedule.check_model(model)
        guider = TripleGuider(model)
        guider.set_conds(null, source, edit)
        guider.set_params(float(gamma), float(beta), window, null_schedule)
        return io.NodeOutput(guider)


# --- perceptual guidance ---------------------------------------------------------------------------------------------

class PerceptualWrapper:
    """A PREDICT_NOISE wrapper: the inner guider's prediction, corrected by perceptual guidance (core).

    What it builds for a sampling (the decoder function, the source photo and LPIPS on the sampling device) is
    dropped when the sampling ends (:meth:`release`, from an OUTER_SAMPLE wrapper); the decoder's weights belong to
    ``decoder_patcher``, which ComfyUI loads and offloads with the sampling.
    """

    def __init__(self, model, vae, image, config, net, decoder, window, mask=None, pixel_weight=0.0,
                 decoder_patcher=None):
        self.model, self.vae, self.image, self.config = model, vae, image, config
        self.net, self.decoder, self.window, self.mask = net, decoder, window, mask
        self.pixel_weight = pixel_weight
        self.decoder_patcher = decoder_patcher
        self._cache = {}

    def _setup(self, x: torch.Tensor):
        key = (x.shape, x.device)
        if key not in self._cache:
            ratio = _comfy.vae_ratio(self.vae, self.decoder)
            image = _comfy.match_image_to_latent(self.image, tuple(x.shape[-2:]), x.shape[0], ratio)
            decode = _comfy.make_decoder(self.model, self.vae, self.decoder, self.decoder_patcher)
            source = image[..., :3].movedim(-1, 1).to(x.device)
            region = self.region_for(tuple(image.shape[1:3]), ratio)
            region = None if region is None else region.to(x.device)
            self._cache = {key: (decode, self._loss(source, region))}
        return self._cache[key]

    def release(self) -> None:
        self._cache = {}

    def region_for(self, size: tuple[int, int], ratio: int) -> torch.Tensor | None:
        """The edit region at image ``size`` (``[B, 1, H, W]``), placed as Edit Mask places it, or None."""
        return None if self.mask is None else fit_mask(self.mask, size, ratio)

    def _lpips(self, spatial: bool, device: torch.device):
        """LPIPS on ``device``: the cached CPU copy, or a private copy on the sampling device (dropped with the
        sampling's cache, so no LPIPS stays in GPU memory outside ComfyUI's account)."""
        net = get_lpips(self.net, search_dirs=_comfy.lpips_search_dirs(), spatial=spatial, device="cpu")
        if device.type == "cpu":
            return net
        with torch.inference_mode(False):
            return copy.deepcopy(net).to(device)

    def _loss(self, source: torch.Tensor, region: torch.Tensor | None):
        if region is None and self.pixel_weight == 0:
            return lpips_loss(self._lpips(False, source.device), source)
        net = self._lpips(True, source.device)
        region = torch.zeros_like(source[:, :1]) if region is None else region
        return masked_perceptual_loss(net, source, region, pixel_weight=self.pixel_weight)

    def __call__(self, executor, x, timestep, model_options, seed):
        def inner(x_, sigma_):
            return executor(x_, sigma_, model_options, seed)

        if not window_active(self.window, model_options, timestep):
            return inner(x, timestep)
        def next_sigma(sigma):
            sigmas = _comfy.sample_sigmas(model_options)
            if sigmas is None:
                raise RuntimeError("perceptual target 'latent' needs the sampler's SIGMAS: sample with "
                                   "SamplerCustomAdvanced")
            return sigmas[step_index(sigmas, sigma) + 1]

        decode, loss = self._setup(x)
        guided = perceptual_guidance(inner, decode, loss, self.config, next_sigma=next_sigma)
        with _comfy.explain_grad_failure("PSEdit Perceptual Guidance with gradient 'full'", "use gradient 'x0'"):
            return guided(x, timestep)

    def outer_sample(self, executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            self.release()


def wrap_guider(guider, wrapper: PerceptualWrapper, differentiable: bool):
    """A shallow copy of ``guider`` with ``wrapper`` around its ``predict_noise``; the input guider is unchanged.

    The copy's patcher is a clone (gradient-enabled for ``differentiable``) that carries the decoder's patcher as an
    additional model, so ComfyUI loads it with the sampling and counts its memory.
    """
    wrapped = copy.copy(guider)
    options = comfy.model_patcher.create_model_options_clone(guider.model_options)
    wrapped.model_options = options
    add = comfy.patcher_extension.add_wrapper_with_key
    add(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "psedit_perceptual", wrapper, options, is_model_options=True)
    add(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "psedit_perceptual_release", wrapper.outer_sample, options,
        is_model_options=True)
    if differentiable:
        wrapped.model_patcher = _comfy.differentiable_patcher(guider.model_patcher)
        _comfy.add_grad_options(options)
    else:
        wrapped.model_patcher = guider.model_patcher.clone()
    if wrapper.decoder_patcher is not None:
        wrapped.model_patcher.set_additional_models("psedit_decoder", [wrapper.decoder_patcher])
    return wrapped


def check_perceptual_family(model, decoder: str) -> None:
    """Every family PSEdit supports, and Qwen-Image (FlowEdit or inversion path) with decoder 'vae': no TAESD decoder of
    the kind the 'taesd' choice loads exists for its Wan 2.1 latents."""
    _comfy.check_supported(model, "PSEdit Perceptual Guidance", extra_flow=True)
    if _comfy.is_extra_flow_model(model) and _comfy.is_taesd(decoder):
        raise ValueError(
            f"decoder '{decoder}' cannot decode {_comfy.model_family(model)} latents (Wan 2.1 VAE): choose decoder "
            "'vae' and connect the checkpoint's VAE, or, faster, lighttaew2_1.safetensors (madebyollin/taehv, in "
            "models/vae_approx) loaded with a Load VAE node (ComfyUI 0.33 and later)"
        )


class PerceptualGuidanceNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditPerceptualGuidance",
            display_name="PSEdit Perceptual Guidance",
            category="PSEdit",
            description=(
                "Wraps any GUIDER: each step the predicted clean latent is decoded, compared with the source photo "
                "by LPIPS, and the prediction is moved down that gradient (arXiv 2312.06680, sec. 3.2), keeping "
                "what the edit should not touch. Outside its window it passes the guider's prediction through."
            ),
            inputs=[
                io.Guider.Input("guider", tooltip="The guider to correct, e.g. PSEdit Triple Guider."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE (used when decoder is 'vae'); for Qwen-Image "
                             "also lighttaew2_1 loaded with Load VAE (ComfyUI 0.33+; a fast decoder of its latents)."),
                io.Image.Input("image", tooltip="The source photo, the same image you VAE-encoded (same size)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, round=0.001,
                               tooltip="Step size. With step 'normalized' it is the RMS of the correction per step, "
                               "in latent units (a photo's latent has RMS about 1): 1 changes the x0 prediction by "
                               "that much (target x0; a 50-step Euler step then moves the latent by about 7% of it, "
                               "about 3 over a 0.2-0.8 window), the predicted noise (target noise) or the latent "
                               "itself (target latent: use about 0.05-0.1 there). 0.3-3 typical with x0; larger "
                               "keeps more of the photo and can hold the edit back. 'plain' scales the LPIPS "
                               "gradient summed over the latent (size-independent)."),
                io.Combo.Input("lpips_net", options=list(LPIPS_NETS), default="vgg",
                               tooltip="LPIPS trunk: vgg is the recommended loss, alex the recommended metric, "
                               "squeeze the lightest. Weights are looked up in models/lpips first."),
                io.Combo.Input("gradient", options=["x0", "full"], default="x0",
                               tooltip="x0: gradient through the decoder only (fast). full: through the model too, "
                               "as in DPS (about 3x slower, more memory)."),
                io.Combo.Input("decoder", options=[_comfy.AUTO_TAESD, _comfy.VAE_DECODER,
                                                   *_comfy.taesd_decoder_files()], default=_comfy.AUTO_TAESD,
                               tooltip="Decoder for the guidance: a TAESD decoder from models/vae_approx (about 15x "
                               "cheaper than the VAE; 'taesd' picks the one for the model's latents, e.g. "
                               "taesd_decoder for SD1.x, taesdxl_decoder for SDXL, taesd3_decoder for SD3, "
                               "taef1_decoder for Flux), or the VAE connected (the checkpoint's: exact, slow "
                               "backward). Qwen-Image: 'vae' only."),
                io.Combo.Input("step", options=["normalized", "plain"], default="normalized",
                               tooltip="normalized: the correction has RMS 'strength' whatever the loss's size; "
                               "plain: strength x the gradient of the LPIPS summed over latent elements (the same "
                               "size at 512 and 1024 px)."),
                io.Float.Input("pixel_weight", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Weight of an extra pixel (MSE) term in the loss; 0 = LPIPS only. Helps "
                               "colours stay put in the protected region."),
                WindowType.Input("window", optional=True,
                                 tooltip="Steps where perceptual guidance acts (PSEdit Step Window); default all."),
                io.Combo.Input("target", options=list(TARGETS), default="x0", optional=True,
                               tooltip="x0 (default): correct the x0 prediction; a step moves the latent by "
                               "(1 - sigma_next/sigma) of it, so a final step to sigma 0 weighs as much as a dozen "
                               "middle ones: end the window before the last steps. noise: correct the predicted "
                               "noise, so each step moves the latent by strength x (sigma - sigma_next) and the pull "
                               "fades as the noise falls; it is sigma times stronger on x0, so keep its window off "
                               "the first, noisiest steps. latent: each step moves the latent itself by the "
                               "correction, the same on every step of the window (the paper's and DPS's update "
                               "of z_t)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Edit region (white = where the edit may change the image, e.g. from PSEdit "
                              "Edit Mask or painted). Only the rest is pulled toward the source photo. A mask "
                              "painted on the photo is cropped as VAE Encode crops the photo; one of another size "
                              "must have the photo's aspect ratio."),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, guider, vae, image, strength, lpips_net, gradient, decoder, step, pixel_weight=0.0, window=None,
                mask=None, target="x0"):
        if not isinstance(guider, comfy.samplers.CFGGuider):
            raise ValueError("guider must be a ComfyUI GUIDER (CFGGuider, DualCFGGuider, PSEdit Triple Guider, ...)")
        check_perceptual_family(guider.model_patcher, decoder)
        if image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError(f"image must be a ComfyUI IMAGE [batch, height, width, 3], got {tuple(image.shape)}")
        config = PerceptualGuidanceConfig(scale=float(strength), gradient=gradient, step=step, target=target)
        if mask is not None and mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"mask batch is {mask.shape[0]} but the image batch is {image.shape[0]}: use one mask")
        if mask is not None:  # an unplaceable mask fails here, not after the first sampling steps
            r = _comfy.vae_ratio(vae, decoder)
            fit_mask(mask, (image.shape[1] // r * r, image.shape[2] // r * r), r)
        wrapper = PerceptualWrapper(guider.model_patcher, vae, image, config, lpips_net, decoder, window, mask,
                                    float(pixel_weight), _comfy.decoder_patcher(guider.model_patcher, vae, decoder))
        return io.NodeOutput(wrap_guider(guider, wrapper, differentiable=(gradient == "full")))
