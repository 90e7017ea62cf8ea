"""PSEdit Null-Text Inversion: per-step null embeddings that make CFG at real scales reconstruct the photo."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.conds
import comfy.samplers
import torch
from comfy_api.latest import io

from ..psedit_core.nulltext import EARLY_STOP_RULES, LR_SCHEDULES, negative_prompt_inversion, null_text_inversion
from ..psedit_core.schedule import step_index
from . import _comfy
from .inversion import InversionType

log = logging.getLogger(__name__)

NullScheduleType = io.Custom("PSEDIT_NULL_SCHEDULE")
METHODS = ("null-text", "negative-prompt")
OPTIMISE = ("all", "tokens")  # what null-text inversion optimises: every text input the model reads as it is / tokens


@dataclass(frozen=True)
class NullSchedule:
    """One null CONDITIONING per sampling step of ``sigmas``, for the guidance scale they were made for."""

    conds: tuple
    sigmas: torch.Tensor
    guidance: float
    method: str
    losses: tuple[float, ...] = ()

    def key(self, i: int) -> str:
        return f"psedit_null_{i}"

    def as_conds(self) -> dict:
        return {self.key(i): c for i, c in enumerate(self.conds)}

    def check_model(self, model) -> None:
        for c in self.conds[:1]:
            _comfy.check_conditioning(model, c, "null schedule")

    def key_for(self, sample_sigmas: torch.Tensor | None, timestep) -> str:
        """The cond key for the step being sampled; the schedule must be the one inverted."""
        if sample_sigmas is None:
            raise RuntimeError("a null schedule needs the sampler's SIGMAS: sample with SamplerCustomAdvanced")
        n = sample_sigmas.numel() - 1
        mine = self.sigmas.to(sample_sigmas)
        if n != len(self.conds) or not torch.allclose(sample_sigmas, mine, rtol=1e-4, atol=1e-6):
            raise ValueError(
                f"the null schedule was made for {len(self.conds)} steps of other SIGMAS than the {n} being sampled: "
                "connect the same SIGMAS to DDIM Invert, Null-Text Inversion and SamplerCustomAdvanced"
            )
        return self.key(step_index(sample_sigmas, timestep))


def _with_crossattn(entries: list[dict], embedding) -> list[dict]:
    """Processed conds (as CFGGuider prepares them) whose cross-attention tensor is ``embedding``, or, for a tuple
    ``(tokens, pooled)``, whose token sequence is ``tokens`` and pooled vector (SD3's ``y``) is ``pooled``. Each tensor
    keeps the cond class the model gave it (SD3 and Flux batch their tokens as ``CONDRegular``)."""
    tokens, pooled = embedding if isinstance(embedding, tuple) else (embedding, None)
    out = []
    for entry in entries:
        entry = entry.copy()
        model_conds = dict(entry["model_conds"])
        kind = type(model_conds["c_crossattn"]) if "c_crossattn" in model_conds else comfy.conds.CONDCrossAttn
        model_conds["c_crossattn"] = kind(tokens)
        if pooled is not None:
            model_conds["y"] = comfy.conds.CONDRegular(pooled)
        entry["model_conds"] = model_conds
        out.append(entry)
    return out


def optimises_pooled(model, optimise: str) -> bool:
    """Whether null-text inversion optimises the pooled vector too: with ``optimise`` "all" where the model reads it
    as it is (SD3: ``y`` is the CLIP-L + CLIP-G pooled output); SDXL reads it only inside a vector with size
    embeddings, so there, as on SD1.x, "all" is the token sequence."""
    return optimise == "all" and _comfy.pooled_dim(model) is not None and not _comfy.is_guidance_distilled(model)


def run_null_text(model, payload, null, source, guidance, inner_steps, early_stop, lr, early_stop_rule="mokady",
                  pooled: bool = False, lr_schedule: str = "reference"):
    """Optimise the null embeddings inside ComfyUI's sampling set-up (model loaded, conds prepared): the token
    sequence, and with ``pooled`` the pooled vector too (``result.nulls`` then holds ``(tokens, pooled)``)."""
    inversion = payload.inversion
    progress = _comfy.Progress(inversion.steps)
    src_marker = source[0][0]

    def optimise(model_k, x, sigmas, extra_args, store):
        guider = model_k.inner_model
        base, model_options = guider.inner_model, extra_args["model_options"]
        src_conds, null_conds = guider.conds["positive"], guider.conds["negative"]

        def denoiser(x_, sigma, cond=None):
            conds = src_conds if cond is src_marker else _with_crossattn(null_conds, cond)
            return comfy.samplers.calc_cond_batch(base, [conds], x_, sigma, model_options)[0]

        latents = [t.to(x.device) for t in inversion.latents]
        start = null[0][0].to(x.device)
        if pooled:
            start = (start, null[0][1]["pooled_output"].to(x.device))
        store["result"] = null_text_inversion(
            denoiser, latents, sigmas, src_marker, start, guidance,
            inner_steps=inner_steps, early_stop=early_stop, lr=lr, early_stop_rule=early_stop_rule,
            lr_schedule=lr_schedule, loss_weight=(lambda s: 1.0) if _comfy.is_flow(model) else None, callback=progress,
        )
        return x

    diff_model = _comfy.differentiable_patcher(model)
    with _comfy.explain_grad_failure("PSEdit Null-Text Inversion", "use method 'negative-prompt'"):
        return _comfy.run_on_trajectory(diff_model, payload, source, null, guidance, optimise)["result"]


class NullTextInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditNullTextInversion",
            display_name="PSEdit Null-Text Inversion",
            category="PSEdit",
            description=(
                "Makes sampling at real guidance scales (5-8) reconstruct the photo: null-text inversion (Mokady et "
                "al. 2022) optimises one null embedding per step so each guided step lands on the DDIM trajectory; "
                "negative-prompt inversion (Miyake et al. 2023) uses the source embedding instead, instantly. "
                "Connect the result to PSEdit Triple Guider's null_schedule."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The same MODEL that DDIM Invert used."),
                InversionType.Input("inversion", tooltip="The trajectory from PSEdit DDIM Invert."),
                io.Conditioning.Input("null", tooltip="Unconditional conditioning (an empty prompt) to start from."),
                io.Conditioning.Input("source", tooltip="The source caption, as given to DDIM Invert."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="The CFG scale you will edit with (the Triple Guider's gamma)."),
                io.Combo.Input("method", options=list(METHODS), default="null-text",
                               tooltip="null-text: optimised, most faithful (about inner_iterations x 2 model calls "
                               "per step). negative-prompt: no optimisation, instant."),
                io.Int.Input("inner_iterations", default=10, min=0, max=100,
                             tooltip="Adam iterations per step at most (null-text only)."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6, round=1e-7,
                               tooltip="A step stops optimising once its error (mean squared, in the unit-variance "
                               "latent, as in Mokady et al.) falls below this, for every image of the batch."),
                io.Float.Input("learning_rate", default=0.01, min=1e-5, max=1.0, step=0.001, round=1e-5,
                               tooltip="Adam learning rate at the first step; later steps use less, by "
                               "lr_schedule."),
                io.Combo.Input("early_stop_rule", options=list(EARLY_STOP_RULES), default=EARLY_STOP_RULES[0],
                               optional=True,
                               tooltip="mokady: the threshold grows by 2e-5 per step, as in the reference code "
                               "(fewer iterations on late steps). constant: early_stop on every step."),
                io.Combo.Input("optimise", options=list(OPTIMISE), default=OPTIMISE[0], optional=True,
                               tooltip="What null-text inversion optimises. all: every text input the model reads "
                               "as it is: the token sequence (all text encoders' outputs; SD3: CLIP-L/G and T5 "
                               "together), plus on SD3 / SD3.5 the pooled CLIP vector, which modulates every block. "
                               "tokens: the token sequence only (the pooled vector stays the empty prompt's). "
                               "SD1.x/SDXL: the token sequence either way."),
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default=LR_SCHEDULES[0], optional=True,
                               tooltip="reference: learning_rate x (1 - step / 100), as the reference code, held at "
                               "half from step 50 on. relative: from learning_rate to half of it over the steps, "
                               "whatever their number (lower sooner: about 1 dB less faithful at 10 steps)."),
            ],
            outputs=[NullScheduleType.Output(
                "null_schedule", display_name="null_schedule", tooltip="Connect to PSEdit Triple Guider.")],
        )

    @classmethod
    def execute(cls, model, inversion, null, source, guidance, method, inner_iterations, early_stop,
                learning_rate, early_stop_rule="mokady", optimise="all", lr_schedule="reference") -> io.NodeOutput:
        _comfy.check_supported(model, "PSEdit Null-Text Inversion")
        if _comfy.is_guidance_distilled(model):
            raise ValueError(
                f"this {_comfy.model_family(model)} model is guidance-distilled: it has no unconditional branch, so "
                "there is no null text to invert, and DDIM Invert with the source caption (through FluxGuidance at "
                "the guidance you edit with) already reconstructs the photo: remove Null-Text Inversion and use "
                "PSEdit Flux Guider"
            )
        if optimise not in OPTIMISE:
            raise ValueError(f"optimise must be one of {OPTIMISE}, got {optimise!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        _comfy.check_conditioning(model, null, "null")
        _comfy.check_conditioning(model, source, "source")
        if inversion.family != _comfy.model_family(model):
            raise ValueError(
                f"the inversion was made with a {inversion.family} model but this MODEL is "
                f"{_comfy.model_family(model)}: connect the same MODEL to DDIM Invert and Null-Text Inversion"
            )
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        steps = inversion.inversion.steps
        sigmas = inversion.inversion.sigmas.detach().cpu()
        if method == "negative-prompt":
            conds = tuple(negative_prompt_inversion(source, steps))
            return io.NodeOutput(NullSchedule(conds, sigmas, float(guidance), method))
        if len(null) != 1:
            raise ValueError("null-text inversion needs a single null conditioning: do not combine or concat it")
        pooled = optimises_pooled(model, optimise)
        result = run_null_text(model, inversion, null, source, float(guidance), int(inner_iterations),
                               float(early_stop), float(learning_rate), early_stop_rule, pooled, lr_schedule)
        extra = null[0][1]
        if pooled:
            conds = tuple([[tokens.detach().cpu(), {**extra, "pooled_output": vec.detach().cpu()}]]
                          for tokens, vec in result.nulls)
        else:
            conds = tuple([[phi.detach().cpu(), dict(extra)]] for phi in result.nulls)
        log.info("null-text inversion: mean step loss %.3g (unit-variance latent), %d Adam iterations",
                 sum(result.losses) / len(result.losses), sum(result.iterations))
        return io.NodeOutput(NullSchedule(conds, sigmas, float(guidance), method, result.losses))
