"""PSEdit FlowEdit Guider (SD3 / SD3.5, Qwen-Image: real CFG) and PSEdit FlowEdit Flux Guider (Flux.1 dev):
inversion-free editing (Kulikov et al., ICCV 2025; psedit_core.flowedit) run by the stock SamplerCustomAdvanced.

Why a GUIDER: the sampler's state is FlowEdit's edited latent ``z``, and for every step the guider returns the
denoised prediction whose Euler step is FlowEdit's update (psedit_core.flowedit FE5; FE8 at the hand-over to plain
sampling, FE9 under a mask). So the stock euler sampler, any scheduler, the progress bar, previews (the edited
branch's clean estimate) and Cancel all work, and PSEdit Perceptual Guidance wraps it like any guider. The guider
also takes what only it can know to the sampler:

- the schedule: it is handed the whole schedule (BasicScheduler with the paper's T steps) and samples its last
  ``n_max`` steps, as the reference skips the first ``T - n_max``;
- the start: FlowEdit starts from the photo's clean latent itself, which no stock NOISE hands over on a flow model
  (``noise_scaling`` gives ``sigma * noise + (1 - sigma) * latent``: DisableNoise starts at ``(1 - sigma_0) *
  latent``, nothing at sigma 1). With DisableNoise connected the guider replaces the zero noise by the one that
  ``noise_scaling`` maps to the photo's latent (``n = latent / noise_scale``: at every sigma, so a stock
  SetLatentNoiseMask, which re-noises the masked-out latent with it, keeps the photo there too); any other NOISE is
  refused, since FlowEdit draws its own noise every step (from the guider's seed).
"""

from __future__ import annotations

import logging
import math

import comfy.samplers
import node_helpers
import torch
from comfy_api.latest import io

from ..psedit_core.flowedit import (
    PAPER_DEFAULTS,
    draw_noise,
    edited_branch,
    flowedit_denoised,
    handover_denoised,
    latent_mask,
    masked_denoised,
    noisy_source,
    plan_steps,
)
from ..psedit_core.schedule import step_index
from . import _comfy

log = logging.getLogger(__name__)

NOISE_FIX = (
    "connect DisableNoise to SamplerCustomAdvanced's noise: FlowEdit starts from the photo's latent itself (the "
    "guider hands it to the sampler) and draws its own noise every step from the guider's seed"
)


def check_flow_family(model, node: str) -> None:
    """Raise unless ``model`` is a rectified-flow family FlowEdit is tested on (SD3 / SD3.5, Flux.1 dev,
    Qwen-Image); eps/v models are pointed to the inversion path."""
    _comfy.check_supported(model, node, extra_flow=True)
    if not _comfy.is_flow(model):
        raise ValueError(
            f"{node} edits rectified-flow models (SD3 / SD3.5, Flux.1 dev, Qwen-Image); this MODEL is "
            f"{_comfy.model_family(model)}, not flow matching: edit it with PSEdit DDIM Invert and PSEdit Triple Guider"
        )


class FlowEditGuider(comfy.samplers.CFGGuider):
    """FlowEdit as a guider: ``predict_noise`` returns FE5 (FlowEdit steps), FE8 (hand-over) or the edit caption's
    prediction (plain steps), masked by FE9; ``sample`` cuts the schedule to its last ``n_max`` steps and hands the
    photo's latent over as the start (module docstring)."""

    def set_conds(self, source, edit, null=None):
        conds = {"positive": edit, "source": source}
        if null is not None:
            conds["negative"] = null
        self.inner_set_conds(conds)

    def set_params(self, *, distilled: bool, source_guidance: float, edit_guidance: float, n_max: int, n_min: int,
                   n_avg: int, seed: int, mask: torch.Tensor | None):
        self.distilled = distilled
        self.scales = {"source": source_guidance, "positive": edit_guidance}
        self.n_max, self.n_min, self.n_avg, self.seed = n_max, n_min, n_avg, seed
        self.mask = mask
        self._run = None

    # --- sampling set-up -----------------------------------------------------------------------------------------

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        if torch.count_nonzero(noise) > 0:
            raise ValueError(f"PSEdit FlowEdit got a NOISE that is not zero: {NOISE_FIX}")
        self._check_latent(latent_image)
        if sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError("sigmas holds no step: connect a scheduler (e.g. BasicScheduler) with at least 1 step")
        if not bool((sigmas[:-1] >= sigmas[1:]).all()):
            raise ValueError("sigmas must be in sampling order (high to low): remove FlipSigmas")
        plan = plan_steps(sigmas.numel() - 1, self.n_max, self.n_min)
        if self.n_max > plan.steps:
            log.warning("FlowEdit n_max %d exceeds the schedule's %d steps: it runs all of them, from sigma %.3g "
                        "(set the scheduler's steps to the paper's T: 50 for SD3, 28 for Flux)",
                        self.n_max, plan.steps, float(sigmas[0]))
        name = getattr(getattr(sampler, "sampler_function", None), "__name__", type(sampler).__name__)
        if name != "sample_euler":
            log.warning("FlowEdit's update is an Euler step (sampler euler, as in the paper); %s integrates the same "
                        "velocities another way, and a sampler that adds noise moves the photo", name)
        if plan.n_max == 0:  # no step to run: the photo itself
            return latent_image.clone()
        sigmas = sigmas[plan.start:]
        sampling = _comfy.model_sampling(self.model_patcher)
        x_src = self.model_patcher.model.process_latent_in(latent_image.float())
        # noise_scaling is affine in the noise: solve sigma_0 * s * n + (1 - sigma_0) * x_src = x_src for n
        zero = torch.zeros_like(x_src)
        base = sampling.noise_scaling(sigmas[0].float(), zero.clone(), x_src, False)
        gain = sampling.noise_scaling(sigmas[0].float(), torch.ones_like(x_src), zero.clone(), False)
        handover = ((x_src - base) / gain).to(noise.dtype)
        self._run = {"plan": plan, "x_src": x_src, "generator": torch.Generator().manual_seed(self.seed),
                     "masks": {}}
        try:
            return super().sample(handover, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            self._run = None

    def _check_latent(self, latent: torch.Tensor) -> None:
        fmt = _comfy.latent_format(self.model_patcher)
        ndim = 2 + getattr(fmt, "latent_dimensions", 2)
        if latent.ndim != ndim or latent.shape[1] != fmt.latent_channels:
            raise ValueError(
                f"latent_image has shape {tuple(latent.shape)} but this {_comfy.model_family(self.model_patcher)} "
                f"model works on {fmt.latent_channels}-channel latents of {ndim} dimensions: VAE-encode the photo with "
                "this checkpoint's VAE"
            )
        if torch.count_nonzero(latent) == 0:
            raise ValueError("latent_image is empty: connect the photo's VAE-encoded LATENT (FlowEdit edits it)")
        if not torch.isfinite(latent).all():
            raise ValueError("latent_image contains NaN/inf: re-encode the photo (use an fp32/bf16 VAE)")

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask at the latent's resolution (FE9's ``m``), placed once per sampling."""
        if self.mask is None:
            return None
        masks = self._run["masks"] if self._run is not None else {}
        key = (tuple(x.shape), x.device, x.dtype)
        if key not in masks:
            m = latent_mask(self.mask.to("cpu", torch.float32), tuple(x.shape[-2:]), _comfy.SPATIAL_RATIO)
            if m.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"mask batch is {m.shape[0]} but the latent batch is {x.shape[0]}: use one mask, or "
                                 "one per latent")
            masks[key] = m.reshape(m.shape[0], 1, *([1] * (x.ndim - 4)), *m.shape[-2:]).to(x)
        return masks[key]

    # --- predictions -------------------------------------------------------------------------------------------------

    def _denoise(self, key: str, x, timestep, model_options, seed):
        """The denoised prediction of caption ``key`` at its guidance: the model at that caption's FluxGuidance value
        (distilled), or ComfyUI's CFG of the null and the caption at its scale (hooks and patches apply)."""
        if self.distilled:
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, None, self.conds[key], 1.0,
                                                    model_options=model_options, seed=seed)
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                self.conds[key], self.scales[key], model_options=model_options,
                                                seed=seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        run = self._run
        if run is None:
            raise RuntimeError("PSEdit FlowEdit Guider samples through SamplerCustomAdvanced (its sample method)")
        plan = run["plan"]
        sigmas = _comfy.sample_sigmas(model_options)
        i = 0 if sigmas is None else step_index(sigmas, timestep)
        x_src = run["x_src"].to(x)
        if i < plan.flowedit_steps:
            differences = []
            for _ in range(self.n_avg):
                _comfy.throw_if_interrupted()
                z_src = noisy_source(x_src, timestep, draw_noise(run["generator"], x))
                d_tar = self._denoise("positive", edited_branch(x, z_src, x_src), timestep, model_options, seed)
                differences.append(d_tar - self._denoise("source", z_src, timestep, model_options, seed))
            denoised = flowedit_denoised(x_src, differences)
        elif i == plan.flowedit_steps:
            if sigmas is None:
                raise RuntimeError("FlowEdit's n_min needs the sampler's SIGMAS: sample with SamplerCustomAdvanced")
            x_tar = edited_branch(x, noisy_source(x_src, timestep, draw_noise(run["generator"], x)), x_src)
            d_tar = self._denoise("positive", x_tar, timestep, model_options, seed)
            denoised = handover_denoised(x, x_tar, d_tar, timestep, sigmas[i + 1].to(x))
        else:
            denoised = self._denoise("positive", x, timestep, model_options, seed)
        return masked_denoised(x, denoised, self._mask_for(x))

    def outer_predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
        """The prediction through any PREDICT_NOISE wrappers (PSEdit Perceptual Guidance), with the sampler's own
        state wherever the mask is 0, so nothing a wrapper adds moves the photo outside the mask."""
        out = super().outer_predict_noise(x, timestep, model_options, seed)
        m = self._mask_for(x)
        return out if m is None else torch.where(m == 0, x, out)


def _inputs(family: str, distilled: bool) -> list:
    d = PAPER_DEFAULTS[family]
    scale = ("FluxGuidance value" if distilled else "CFG scale (with the null caption)")
    return [
        io.Float.Input("source_guidance", default=d["source_guidance"], min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip=f"The source caption's {scale} (the paper's src_guidance_scale: "
                       f"{d['source_guidance']} for {family})."),
        io.Float.Input("edit_guidance", default=d["edit_guidance"], min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip=f"The edit caption's {scale} (tar_guidance_scale: {d['edit_guidance']} for {family}); "
                       "higher edits more strongly." + ("" if distilled else " Qwen-Image has no published FlowEdit "
                       "settings: start near the CFG it is sampled with (about 4), not at 13.5.")),
        io.Int.Input("n_max", default=d["n_max"], min=0, max=1000,
                     tooltip=f"How many of the SIGMAS' steps, counted from the end, FlowEdit runs: it skips the first "
                     f"steps - n_max (the paper: {d['n_max']} of {d['steps']} for {family}; set the scheduler to "
                     f"{d['steps']} steps). Larger reaches further into the noise: stronger edits, less of the photo "
                     "kept. 0 returns the photo."),
        io.Int.Input("n_min", default=d["n_min"], min=0, max=1000,
                     tooltip="How many of the last steps are plain sampling of the edit caption (started from the "
                     "edit plus fresh noise, SDEdit-style) instead of FlowEdit steps; 0 in the paper. At most n_max."),
        io.Int.Input("n_avg", default=d["n_avg"], min=1, max=64,
                     tooltip="Noise draws averaged per step (each costs both captions' model calls again); 1 in the "
                     "paper."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seed of FlowEdit's noise draws (a fresh draw per step and per n_avg). The NOISE input "
                     "of SamplerCustomAdvanced is not used: connect DisableNoise there."),
        io.Mask.Input("mask", optional=True,
                      tooltip="Edit region (white = may change, e.g. painted or from PSEdit Edit Mask). Outside it "
                      "every step's velocity is zero, so the photo's latent stays exactly. Painted on the photo it "
                      "is cropped as VAE Encode crops the photo; another size must have the photo's aspect ratio."),
    ]


def _build(model, source, edit, null, source_guidance, edit_guidance, n_max, n_min, n_avg, seed, mask,
           node: str, distilled: bool):
    check_flow_family(model, node)
    if _comfy.is_guidance_distilled(model) != distilled:
        if distilled:
            raise ValueError(f"this {_comfy.model_family(model)} model is not guidance-distilled (it has a real "
                             "unconditional branch): use PSEdit FlowEdit Guider, with a null caption")
        raise ValueError(f"this {_comfy.model_family(model)} model is guidance-distilled (one prediction per step, "
                         "the guidance an input of the model): use PSEdit FlowEdit Flux Guider")
    named = [("source", source), ("edit", edit)] + ([] if null is None else [("null", null)])
    for name, cond in named:
        _comfy.check_conditioning(model, cond, name)
    for name, g in (("source_guidance", source_guidance), ("edit_guidance", edit_guidance)):
        if not (math.isfinite(g) and g >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {g}")
    if n_min > n_max:
        raise ValueError(f"n_min ({n_min}) must not exceed n_max ({n_max}): n_min counts the last of the n_max steps "
                         "that are plain sampling (n_min = n_max is SDEdit)")
    if n_avg < 1:
        raise ValueError(f"n_avg must be >= 1, got {n_avg}")
    if mask is not None and mask.ndim not in (2, 3):
        raise ValueError(f"mask must be a ComfyUI MASK [batch, height, width], got {tuple(mask.shape)}")
    if distilled:
        source = node_helpers.conditioning_set_values(source, {"guidance": float(source_guidance)})
        edit = node_helpers.conditioning_set_values(edit, {"guidance": float(edit_guidance)})
    guider = FlowEditGuider(model)
    guider.set_conds(source, edit, null)
    guider.set_params(distilled=distilled, source_guidance=float(source_guidance),
                      edit_guidance=float(edit_guidance), n_max=int(n_max), n_min=int(n_min), n_avg=int(n_avg),
                      seed=int(seed), mask=None if mask is None else mask.detach().clone())
    return guider


WIRING = (
    "Wire: photo -> VAE Encode -> SamplerCustomAdvanced latent_image; DisableNoise -> noise; BasicScheduler (the "
    "paper's T steps, denoise 1) -> sigmas; KSamplerSelect euler -> sampler."
)


class FlowEditGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditFlowEditGuider",
            display_name="PSEdit FlowEdit Guider",
            category="PSEdit",
            description=(
                "FlowEdit (Kulikov et al., ICCV 2025): edits a photo on a rectified-flow model without inversion, "
                "by integrating the difference of the edit and source captions' velocities along noisy copies of "
                "the photo. For models with real CFG (SD3 / SD3.5, Qwen-Image): each caption's velocity is CFG with "
                "the null caption at its own scale. Runs the last n_max steps of the schedule as Euler steps; "
                "n_avg noise draws per step; an optional mask keeps the photo exactly outside it. Wrap it in PSEdit "
                "Perceptual Guidance to keep more of the photo. " + WIRING
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD3 / SD3.5 or Qwen-Image MODEL (flow matching, real CFG)."),
                io.Conditioning.Input("null", tooltip="Unconditional conditioning (an empty prompt), the CFG "
                                      "baseline of both captions."),
                io.Conditioning.Input("source", tooltip="The source caption: what the photo shows."),
                io.Conditioning.Input("edit", tooltip="The edit caption: what the photo should show."),
                *_inputs("SD3", distilled=False),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced (with DisableNoise and the photo's "
                                      "latent) or to PSEdit Perceptual Guidance.")],
        )

    @classmethod
    def execute(cls, model, null, source, edit, source_guidance, edit_guidance, n_max, n_min, n_avg, seed,
                mask=None) -> io.NodeOutput:
        return io.NodeOutput(_build(model, source, edit, null, source_guidance, edit_guidance, n_max, n_min, n_avg,
                                    seed, mask, "PSEdit FlowEdit Guider", distilled=False))


class FlowEditFluxGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditFlowEditFluxGuider",
            display_name="PSEdit FlowEdit Flux Guider",
            category="PSEdit",
            description=(
                "FlowEdit (Kulikov et al., ICCV 2025) for guidance-distilled Flux.1 dev: edits a photo without "
                "inversion by integrating the difference of the edit and source captions' velocities along noisy "
                "copies of the photo. Each caption's velocity is the model at that caption with its own Flux "
                "guidance (no null caption). Runs the last n_max steps of the schedule as Euler steps; an optional "
                "mask keeps the photo exactly outside it. " + WIRING
            ),
            inputs=[
                io.Model.Input("model", tooltip="The Flux.1 dev MODEL."),
                io.Conditioning.Input("source", tooltip="The source caption: what the photo shows (its FluxGuidance "
                                      "is replaced by source_guidance)."),
                io.Conditioning.Input("edit", tooltip="The edit caption: what the photo should show (its "
                                      "FluxGuidance is replaced by edit_guidance)."),
                *_inputs("Flux", distilled=True),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced (with DisableNoise and the photo's "
                                      "latent) or to PSEdit Perceptual Guidance.")],
        )

    @classmethod
    def execute(cls, model, source, edit, source_guidance, edit_guidance, n_max, n_min, n_avg, seed,
                mask=None) -> io.NodeOutput:
        return io.NodeOutput(_build(model, source, edit, None, source_guidance, edit_guidance, n_max, n_min, n_avg,
                                    seed, mask, "PSEdit FlowEdit Flux Guider", distilled=True))
