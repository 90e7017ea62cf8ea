"""PSEdit DDIM Invert: the photo's latent -> the noise latent that the stock sampler turns back into it; PSEdit
Inverted Noise: that latent as a NOISE, which hands it over to SamplerCustomAdvanced for every model sampling type."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from comfy_api.latest import io

from ..psedit_core.inversion import CONVENTIONS, Inversion, ddim_invert
from . import _comfy

InversionType = io.Custom("PSEDIT_INVERSION")


@dataclass(frozen=True)
class InversionPayload:
    """What later nodes (null-text inversion, inverted noise) need: the trajectory in model latent space and how it
    was made (``model_sampling`` and ``latent_format``: the model's own, for the handover to a sampler)."""

    inversion: Inversion
    family: str
    cfg: float
    model_sampling: object = None
    latent_format: object = None


def run_inversion(model, source, null, cfg: float, latent: torch.Tensor, sigmas: torch.Tensor, refine: int,
                  convention: str = "start", input_scale=None):
    """Invert ``latent`` (raw VAE latent) as a custom sampler inside ComfyUI's own sampling set-up.

    Returns the raw inverted latent and the trajectory (model space).
    """
    progress = _comfy.Progress(sigmas.numel() - 1)

    def invert(model_k, x, sigmas, extra_args, store):
        scale = {} if input_scale is None else {"input_scale": input_scale}
        store["inversion"] = ddim_invert(model_k, x, sigmas, refine=refine, convention=convention,
                                         extra_args=extra_args, callback=progress, **scale)
        return store["inversion"].inverted

    out, store = _comfy.run_in_sampler(model, source, null if null is not None else source, cfg, latent, sigmas,
                                       invert)
    return out, store["inversion"]


class DDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditDDIMInvert",
            display_name="PSEdit DDIM Invert",
            category="PSEdit",
            description=(
                "Inverts a VAE-encoded photo with deterministic DDIM (Euler) steps so that SamplerCustomAdvanced with "
                "PSEdit Inverted Noise and the same SIGMAS turns the inverted latent back into the photo (on SD1.x/"
                "SDXL DisableNoise works too; flow models such as SD3, Flux and Qwen-Image need the Inverted Noise). "
                "Refinement solves each step exactly (fixed-point iterations) for a much closer round trip. On flow "
                "models the steps are rectified-flow Euler steps, the same equations."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL: SD1.x, SD2.x or SDXL (eps, v), SD3 / SD3.5, "
                               "Flux.1 dev or Qwen-Image (flow matching)."),
                io.Latent.Input("latent", tooltip="The photo, VAE-encoded with this checkpoint's VAE."),
                io.Sigmas.Input(
                    "sigmas",
                    tooltip="The schedule you will sample with (e.g. BasicScheduler). Use the same SIGMAS for "
                    "inversion and regeneration; do not flip them.",
                ),
                io.Conditioning.Input("source", tooltip="The source caption: what the photo shows. Flux: through "
                                      "FluxGuidance at the guidance PSEdit Flux Guider samples with."),
                io.Float.Input(
                    "cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                    tooltip="Guidance scale during inversion. 1 (no guidance) inverts most faithfully; above 1 the "
                    "null conditioning is used as the unconditional branch. Flux (guidance-distilled): 1.",
                ),
                io.Int.Input(
                    "refine", default=2, min=0, max=50,
                    tooltip="Fixed-point iterations per step (each costs one more model call). 0 is plain DDIM "
                    "inversion; 2-5 make the round trip far more exact.",
                ),
                io.Conditioning.Input(
                    "null", optional=True,
                    tooltip="Unconditional (empty prompt) conditioning; needed only when cfg is not 1.",
                ),
                io.Combo.Input(
                    "convention", options=list(CONVENTIONS), default="start", optional=True,
                    tooltip="Where each plain inversion step reads the model. start: at the step's start (the "
                    "noise level it comes from). target: at the noise level it goes to, on the latent rescaled "
                    "to it (diffusers' DDIMInverseScheduler, null-text inversion's code; on flow models the latent "
                    "unchanged, as their input is the latent itself). refine then solves each step exactly from "
                    "either.",
                ),
            ],
            outputs=[
                io.Latent.Output("inverted", display_name="inverted",
                                 tooltip="latent_image for SamplerCustomAdvanced, with PSEdit Inverted Noise as its "
                                 "noise (or DisableNoise, SD1.x/SDXL only)."),
                InversionType.Output("inversion", display_name="inversion",
                                     tooltip="The whole trajectory, for PSEdit Null-Text Inversion."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, sigmas, source, cfg, refine, null=None, convention="start") -> io.NodeOutput:
        _comfy.check_supported(model, "PSEdit DDIM Invert", extra_flow=True)
        samples = latent["samples"]
        _comfy.check_latent(model, samples)
        _comfy.check_conditioning(model, source, "source")
        if abs(cfg - 1.0) > 1e-6 and _comfy.is_guidance_distilled(model):
            raise ValueError(
                f"cfg is {cfg:g} but this {_comfy.model_family(model)} model is guidance-distilled (no unconditional "
                "branch; its guidance is FluxGuidance's value on the source conditioning): set cfg to 1"
            )
        if abs(cfg - 1.0) > 1e-6:
            if null is None:
                raise ValueError("cfg is not 1: connect a null (empty prompt) conditioning, or set cfg to 1")
            _comfy.check_conditioning(model, null, "null")
        if sigmas.numel() < 2:
            raise ValueError("sigmas holds no step: connect a scheduler with at least 1 step")
        if not (sigmas[:-1] >= sigmas[1:]).all():
            raise ValueError("sigmas must be in sampling order (high to low): remove FlipSigmas, PSEdit inverts itself")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        out, inversion = run_inversion(model, source, null, cfg, samples, sigmas, refine, convention,
                                       _comfy.inversion_input_scale(model))
        result = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
        result["samples"] = out.to(samples.device)
        payload = InversionPayload(inversion=inversion, family=_comfy.model_family(model), cfg=float(cfg),
                                   model_sampling=_comfy.model_sampling(model),
                                   latent_format=_comfy.latent_format(model))
        return io.NodeOutput(result, payload)


class InvertedNoise:
    """A NOISE (``generate_noise(latent) -> tensor``, ``seed``) that ComfyUI's own ``noise_scaling`` maps back to the
    inverted latent ``x_T`` at the inversion's first sigma, whatever LATENT is sampled with it.

    KSAMPLER starts from ``noise_scaling(sigma_0, n, L, max_denoise)``, affine in the noise ``n``
    (``L`` = ``latent_image`` in model space): eps/v ``sigma_0 n + L`` (``sqrt(1 + sigma_0^2) n + L`` at the
    schedule's top), flow ``sigma_0 n + (1 - sigma_0) L``. So ``n = (x_T - ns(0, L)) / ns(1, 0)``, both terms read off
    the model's ``noise_scaling`` itself; the sampler then starts exactly at ``x_T``. With ``L = x_T`` (DDIM Invert's
    LATENT) that is ``n = 0`` for eps/v (DisableNoise's handover) and ``n = x_T`` for flow at ``sigma_0 = 1``.
    """

    def __init__(self, payload: InversionPayload):
        self.payload = payload
        self.seed = 0

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        import comfy.samplers

        payload = self.payload
        samples = input_latent["samples"]
        inverted = payload.inversion.inverted.detach().to("cpu", torch.float32)
        if tuple(samples.shape) != tuple(inverted.shape):
            raise ValueError(
                f"latent_image has shape {tuple(samples.shape)} but the inversion {tuple(inverted.shape)}: connect "
                "DDIM Invert's inverted LATENT (or the photo's own latent) to SamplerCustomAdvanced's latent_image"
            )
        latent = samples.detach().to("cpu", torch.float32)
        if torch.count_nonzero(latent) > 0:  # CFGGuider.inner_sample leaves an all-zero latent as it is
            latent = payload.latent_format.process_in(latent)
        sampling, sigmas = payload.model_sampling, payload.inversion.sigmas.detach().cpu()
        wrap = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=sampling))
        max_denoise = comfy.samplers.Sampler().max_denoise(wrap, sigmas)
        zero = torch.zeros_like(inverted)
        base = sampling.noise_scaling(sigmas[0], zero.clone(), latent, max_denoise)
        gain = sampling.noise_scaling(sigmas[0], torch.ones_like(inverted), zero.clone(), max_denoise)
        if not (gain.abs() > 0).all():
            raise ValueError("the inversion's first sigma is 0: invert with a schedule that has at least one step")
        return ((inverted - base) / gain).to(samples.dtype)


class InvertedNoiseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditInvertedNoise",
            display_name="PSEdit Inverted Noise",
            category="PSEdit",
            description=(
                "Hands DDIM Invert's result to SamplerCustomAdvanced for every model: a NOISE that ComfyUI's own "
                "noise scaling turns back into the inverted latent at the first sigma, so the stock samplers start "
                "exactly from it. Needed for flow models (SD3 / SD3.5, Flux, Qwen-Image), where sampling at sigma 1 "
                "replaces the LATENT by the noise and DisableNoise would hand over nothing; on SD1.x/SDXL it equals "
                "DisableNoise with the inverted LATENT. Connect the inverted LATENT (or the photo's latent) as "
                "latent_image and sample with the same SIGMAS."
            ),
            inputs=[InversionType.Input("inversion", tooltip="The trajectory from PSEdit DDIM Invert.")],
            outputs=[io.Noise.Output("noise", display_name="noise",
                                     tooltip="Connect to SamplerCustomAdvanced's noise (instead of DisableNoise).")],
        )

    @classmethod
    def execute(cls, inversion) -> io.NodeOutput:
        if inversion.model_sampling is None:
            raise ValueError("this inversion carries no model sampling: run PSEdit DDIM Invert again")
        return io.NodeOutput(InvertedNoise(inversion))
