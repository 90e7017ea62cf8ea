"""PSEdit Flux Guider: the paper's triple text guidance on a guidance-distilled model (Flux.1 dev).

Flux dev makes one prediction per step, with the guidance strength ``g`` an input of the model, and has no
unconditional branch. Guidance distillation trains ``e_g(c) = e_null + g (e_c - e_null)``, so eq. 1-2 at
``gamma = g`` need no null prediction (``psedit_core.guidance``, eq. 2-D):

    e = e_g(src) + (beta / g) * (e_g(edit) - e_g(src))

which is ComfyUI's own CFG with the source caption as the "negative", the edit caption as the "positive" (both at
guidance ``g``) and scale ``beta / g``: that is how it is computed here (``comfy.samplers.sampling_function``), so
pre-/post-CFG hooks and ``sampler_cfg_function`` patches run as for any CFG, and at ``beta = g`` (plain generation on
the edit caption) only the edit is evaluated. Outside the window it is the edit caption's prediction alone.
"""

from __future__ import annotations

import logging
import math

import comfy.samplers
import node_helpers
from comfy_api.latest import io

from ..psedit_core.schedule import StepWindow
from . import _comfy
from .guidance import WindowType, window_active

log = logging.getLogger(__name__)


class FluxGuider(comfy.samplers.CFGGuider):
    """``e_g(src) + (beta / g) (e_g(edit) - e_g(src))`` inside the window, ``e_g(edit)`` outside (module docstring)."""

    def set_conds(self, source, edit, guidance: float):
        edit = node_helpers.conditioning_set_values(edit, {"guidance": guidance})
        source = node_helpers.conditioning_set_values(source, {"guidance": guidance})
        self.inner_set_conds({"positive": edit, "negative": source})

    def set_params(self, guidance: float, beta: float, window: StepWindow | None):
        self.guidance, self.beta, self.window = guidance, beta, window

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        _comfy.check_flow_handover(self.model_patcher, noise, sigmas)
        return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        edit = self.conds.get("positive")
        if not window_active(self.window, model_options, timestep):
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, None, edit, 1.0,
                                                    model_options=model_options, seed=seed)
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"), edit,
                                                self.beta / self.guidance, model_options=model_options, seed=seed)


class FluxGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditFluxGuider",
            display_name="PSEdit Flux Guider",
            category="PSEdit",
            description=(
                "The paper's triple text guidance (arXiv 2312.06680 eq. 1-2) for guidance-distilled Flux.1 dev, "
                "which has no unconditional branch: e = e_g(src) + (beta / g) (e_g(edit) - e_g(src)), the source and "
                "edit captions' predictions at Flux guidance g. Distillation makes e_g(c) = e_null + g (e_c - e_null), "
                "so this is exactly e_null + g (e_src - e_null) + beta (e_edit - e_src) with gamma = g, without "
                "e_null. beta = 0 reconstructs the photo (the branch DDIM Invert inverted), beta = g is plain "
                "generation on the edit caption; outside the window it is the edit caption alone. Computed as "
                "ComfyUI's CFG (negative source, positive edit, scale beta / g), so CFG patches apply."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The Flux.1 dev MODEL (the one DDIM Invert used)."),
                io.Conditioning.Input("source", tooltip="The source caption: what the photo shows."),
                io.Conditioning.Input("edit", tooltip="The edit caption: what the photo should show."),
                io.Float.Input("guidance", default=3.5, min=0.1, max=30.0, step=0.1, round=0.01,
                               tooltip="Flux guidance g, set on both captions (the paper's gamma). Use the value "
                               "FluxGuidance gave the source caption for DDIM Invert, or the photo is not "
                               "reconstructed at beta 0."),
                io.Float.Input("beta", default=1.4, min=-10.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Edit strength, as the paper's beta: beta / guidance of the way from the "
                               "source to the edit caption's prediction. 0 reconstructs, beta = guidance is plain "
                               "generation on the edit caption; 0.4 x guidance is the paper's 3 at gamma 7.5."),
                WindowType.Input("window", optional=True,
                                 tooltip="Steps where the triple guidance acts (PSEdit Step Window); default all. "
                                 "Outside, the edit caption alone (plain Flux sampling)."),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced or PSEdit Perceptual Guidance.")],
        )

    @classmethod
    def execute(cls, model, source, edit, guidance, beta, window=None) -> io.NodeOutput:
        _comfy.check_supported(model, "PSEdit Flux Guider")
        if not _comfy.is_guidance_distilled(model):
            raise ValueError(
                f"this {_comfy.model_family(model)} model is not guidance-distilled (it has a real unconditional "
                "branch): use PSEdit Triple Guider, with a null caption"
            )
        for name, cond in (("source", source), ("edit", edit)):
            _comfy.check_conditioning(model, cond, name)
        if not (math.isfinite(guidance) and guidance > 0 and math.isfinite(beta)):
            raise ValueError(f"guidance must be > 0 and beta finite, got guidance={guidance}, beta={beta}")
        given = {float(extra["guidance"]) for _, extra in source if extra.get("guidance") is not None}
        if given and given != {float(guidance)}:
            log.warning("the source caption carries Flux guidance %s but the Flux Guider samples at %.2f: DDIM Invert "
                        "inverted the other, so beta 0 will not reconstruct the photo exactly",
                        sorted(given), guidance)
        guider = FluxGuider(model)
        guider.set_conds(source, edit, float(guidance))
        guider.set_params(float(guidance), float(beta), window)
        return io.NodeOutput(guider)
