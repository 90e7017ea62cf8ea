"""PSEdit DDIM Invert: the photo's latent -> the noise latent that the stock sampler turns back into it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..psedit_core.inversion import Inversion, ddim_invert
from . import _comfy

InversionType = io.Custom("PSEDIT_INVERSION")


@dataclass(frozen=True)
class InversionPayload:
    """What later nodes (null-text inversion) need: the trajectory in model latent space and how it was made."""

    inversion: Inversion
    family: str
    cfg: float


def run_inversion(model, source, null, cfg: float, latent: torch.Tensor, sigmas: torch.Tensor, refine: int):
    """Invert ``latent`` (raw VAE latent) as a custom sampler inside ComfyUI's own sampling set-up.

    Returns the raw inverted latent and the trajectory (model space).
    """
    progress = _comfy.Progress(sigmas.numel() - 1)

    def invert(model_k, x, sigmas, extra_args, store):
        store["inversion"] = ddim_invert(model_k, x, sigmas, refine=refine, extra_args=extra_args, callback=progress)
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
                "DisableNoise and the same SIGMAS turns the inverted latent back into the photo. Refinement solves "
                "each step exactly (fixed-point iterations) for a much closer round trip."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL (SD1.x or SDXL, eps- or v-prediction)."),
                io.Latent.Input("latent", tooltip="The photo, VAE-encoded with this checkpoint's VAE."),
                io.Sigmas.Input(
                    "sigmas",
                    tooltip="The schedule you will sample with (e.g. BasicScheduler). Use the same SIGMAS for "
                    "inversion and regeneration; do not flip them.",
                ),
                io.Conditioning.Input("source", tooltip="The source caption: what the photo shows."),
                io.Float.Input(
                    "cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                    tooltip="Guidance scale during inversion. 1 (no guidance) inverts most faithfully; above 1 the "
                    "null conditioning is used as the unconditional branch.",
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
            ],
            outputs=[
                io.Latent.Output("inverted", display_name="inverted",
                                 tooltip="latent_image for SamplerCustomAdvanced (with DisableNoise)."),
                InversionType.Output("inversion", display_name="inversion",
                                     tooltip="The whole trajectory, for PSEdit Null-Text Inversion."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, sigmas, source, cfg, refine, null=None) -> io.NodeOutput:
        samples = latent["samples"]
        _comfy.check_latent(model, samples)
        _comfy.check_conditioning(model, source, "source")
        if abs(cfg - 1.0) > 1e-6:
            if null is None:
                raise ValueError("cfg is not 1: connect a null (empty prompt) conditioning, or set cfg to 1")
            _comfy.check_conditioning(model, null, "null")
        if sigmas.numel() < 2:
            raise ValueError("sigmas holds no step: connect a scheduler with at least 1 step")
        if not (sigmas[:-1] >= sigmas[1:]).all():
            raise ValueError("sigmas must be in sampling order (high to low): remove FlipSigmas, PSEdit inverts itself")
        out, inversion = run_inversion(model, source, null, cfg, samples, sigmas, refine)
        result = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
        result["samples"] = out.to(samples.device)
        payload = InversionPayload(inversion=inversion, family=_comfy.model_family(model), cfg=float(cfg))
        return io.NodeOutput(result, payload)
