"""PSEdit Feature Injection: Plug-and-Play (Tumanyan et al. 2023) on an inverted photo, as its reference code does it
(pnp-diffusers: ``pnp.py``, ``pnp_utils.py``).

At every step of its windows a source pass (:mod:`.control`) runs the model on DDIM Invert's trajectory with the
source caption (the empty prompt by default, as the reference's); every branch the guider evaluates then takes

- the output of the residual branch of one decoder block's ResBlock (its second convolution, before the skip is
  added: the reference's ``up_blocks[1].resnets[1]``, ComfyUI's output block 4 on SD1.x), while the block's own
  input still reaches its output through the skip connection: ``h_out = skip(h_edt) + res(h_src)``;
- the self-attention queries and keys of every transformer layer of the decoder from that block on (the reference's
  blocks 4-11), ``O = softmax(Q_src K_src^T / sqrt(d)) V_edt``.

``inject "block input"`` (PSEdit's variant) replaces the whole input of the decoder block (``h`` and the skip) by the
source's instead, so the block's output is the source's: it holds the photo's structure harder and edits less.
Windows count the steps as the reference does, ``t < int(fraction n)``.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..psedit_core.attention import replace_chunks, truncated_steps
from ..psedit_core.pnp import INJECT, default_feature_block
from . import _comfy
from .captions import check_clip, encode
from .control import SOURCE_PASS, Controller, Step, branches, check_inversion, unet, window_label
from .inversion import InversionType

NAME = "PSEdit Feature Injection"


class PnP:
    """Plug-and-Play's rules for :class:`.control.Controller` (module docstring)."""

    uses_roles = False

    def __init__(self, feature=(0.0, 0.8), feature_block=4, attn=(0.0, 0.5), attn_blocks=frozenset(),
                 inject="residual"):
        if inject not in INJECT:
            raise ValueError(f"inject must be one of {INJECT}, got {inject!r}")
        self.feature, self.feature_block, self.attn, self.attn_blocks = feature, feature_block, attn, attn_blocks
        self.inject = inject
        self.kinds = ("attn1",) if attn[1] > attn[0] else ()

    def install(self, ctl, model) -> None:
        if self.inject == "block input":
            model.set_model_output_block_patch(self._block_input_patch(ctl))

    def check_conds(self, ctl, conds) -> None:
        pass

    def begin(self, ctl) -> None:
        pass

    def begin_step(self, ctl, step: Step) -> None:
        pass

    def step(self, ctl, index: int, n: int, sigma: float) -> Step:
        feature = index in truncated_steps(*self.feature, n)
        attn = index in truncated_steps(*self.attn, n)
        return Step(index, n, sigma, needs_source=feature or attn, acts={"feature": feature, "attn": attn})

    def after(self, ctl, out, x, step: Step, next_sigma: float):
        return out

    def roles(self, ctl, context, cond_or_uncond):
        return ()

    # ---- self-attention ----

    def _injects(self, layer) -> bool:
        return layer[0] == "output" and layer[1] in self.attn_blocks

    def record(self, ctl, kind, layer, q, k, v, heads, extra):
        if kind == "attn1" and ctl.run.step.acts["attn"] and self._injects(layer):
            ctl.run.records[("q", layer)], ctl.run.records[("k", layer)] = q.to(ctl.dtype), k.to(ctl.dtype)
        return None

    def edit(self, ctl, kind, layer, q, k, v, heads, extra, prev, default):
        if kind != "attn1" or not ctl.run.step.acts["attn"] or not self._injects(layer):
            return default()
        n, _ = branches(q, extra)
        return ctl.source_self_attention(layer, q, k, v, heads, extra, [True] * n, default)

    # ---- features ----

    def residual_tap(self, ctl):
        """A forward hook on the feature block's last residual convolution: records its output in the source pass
        and hands it to every branch of the other passes."""
        def hook(module, inputs, output):
            run = ctl.run
            if run is None or run.step is None or not run.step.acts["feature"]:
                return None
            if run.state.get("source_pass"):
                run.records[("residual",)] = output.to(ctl.dtype)
                return None
            source = ctl.usable(("residual",))
            n = output.shape[0] // source.shape[0]
            return replace_chunks(output, source, [True] * n)

        return hook

    def _block_input_patch(self, ctl):
        def patch(h, hsp, transformer_options):
            run = ctl.run
            if run is None or run.step is None or not run.step.acts["feature"]:
                return h, hsp
            if transformer_options.get("block") != ("output", self.feature_block):
                return h, hsp
            source_pass = transformer_options.get(SOURCE_PASS)
            if source_pass == ctl.token:
                run.records[("h",)], run.records[("hsp",)] = h.to(ctl.dtype), hsp.to(ctl.dtype)
                return h, hsp
            if source_pass is not None:
                return h, hsp
            flags = [True] * max(len(transformer_options.get("cond_or_uncond", [])), 1)
            return replace_chunks(h, ctl.usable(("h",)), flags), replace_chunks(hsp, ctl.usable(("hsp",)), flags)

        return patch


class PnPController(Controller):
    """The controller with Plug-and-Play's residual tap: a forward hook on the feature block's residual convolution
    (there is no ComfyUI patch point inside a ResBlock), registered on the model for one sampling and removed after,
    so no other user of the model sees it; the source pass is flagged to it."""

    def _outer_sample(self, executor, *args, **kwargs):
        algorithm = self.algorithm
        if algorithm.inject != "residual":
            return super()._outer_sample(executor, *args, **kwargs)
        conv = residual_conv(executor.class_obj.model_patcher, algorithm.feature_block)
        handle = conv.register_forward_hook(algorithm.residual_tap(self))
        try:
            return super()._outer_sample(executor, *args, **kwargs)
        finally:
            handle.remove()

    def _source_pass(self, guider, x, timestep, step, model_options) -> None:
        state = self.run.state
        state["source_pass"] = True
        try:
            super()._source_pass(guider, x, timestep, step, model_options)
        finally:
            state["source_pass"] = False


def residual_conv(model, block: int) -> torch.nn.Module:
    """The last layer of the residual branch of output block ``block``'s ResBlock (its ``out_layers`` convolution)."""
    resblock = unet(model).output_blocks[block][0]
    layers = getattr(resblock, "out_layers", None)
    if layers is None:
        raise ValueError(f"{NAME}: output block {block} does not start with a ResBlock: choose another feature_block "
                         "or inject 'block input'")
    return layers[-1]


class FeatureInjectionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditFeatureInjection",
            display_name="PSEdit Feature Injection",
            category="PSEdit",
            description=(
                "Plug-and-Play (Tumanyan et al. 2023) on the inverted photo, as its reference code does it: at every "
                "step a source pass runs the model on DDIM Invert's trajectory with the source caption (empty by "
                "default, as the reference's); the residual features of one decoder block and the self-attention "
                "queries and keys of the later decoder layers replace those of every branch the guider evaluates, so "
                "the edit keeps the photo's structure while the text changes its appearance. Paper defaults: features "
                "for 80% of the steps, self-attention for 50%. Sample the MODEL with any guider; connect it only to "
                "the guider, not to DDIM Invert or Null-Text Inversion."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL (SD1.x, SD2.x or SDXL), the one DDIM Invert "
                               "used; LoRAs and other patches may be applied before."),
                InversionType.Input("inversion", tooltip="The trajectory from PSEdit DDIM Invert of the photo you "
                                    "edit (same SIGMAS as the sampler); the reference inverts with the empty "
                                    "prompt."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to encode the source pass's caption."),
                io.String.Input("source_caption", multiline=True, default="",
                                tooltip="The source pass's text: empty (the default) is the reference's empty prompt; "
                                "what the photo shows is PSEdit's variant (holds the structure harder)."),
                io.Float.Input("feature_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step of feature injection, as a fraction of the steps."),
                io.Float.Input("feature_end", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="End of feature injection (exclusive, int(fraction x steps)); PnP's default "
                               "0.8. Equal to feature_start = off."),
                io.Float.Input("attn_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step of self-attention injection, as a fraction of the steps."),
                io.Float.Input("attn_end", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="End of self-attention injection (exclusive, int(fraction x steps)); PnP's "
                               "default 0.5. Equal to attn_start = off."),
                io.Int.Input("feature_block", default=-1, min=-1, max=63, optional=True,
                             tooltip="Decoder (output) block whose ResBlock's residual features are injected; -1 = "
                             "PnP's layer (SD1.x: 4, SDXL: 1)."),
                io.Int.Input("attn_from_block", default=-1, min=-1, max=63, optional=True,
                             tooltip="Self-attention is injected in every transformer layer of the output blocks "
                             "from this one on; -1 = from the feature block (SD1.x: blocks 4-11, PnP's layers)."),
                io.Combo.Input("inject", options=list(INJECT), default="residual", optional=True,
                               tooltip="residual (PnP's): the ResBlock's residual branch output, the block's own "
                               "input still passes through its skip. block input (PSEdit's): the block's whole "
                               "input, holds the structure harder and edits less."),
            ],
            outputs=[io.Model.Output("controlled", display_name="model",
                                     tooltip="The controlled MODEL: connect it to the guider and sample with "
                                     "SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, inversion, clip, source_caption, feature_start, feature_end, attn_start, attn_end,
                feature_block=-1, attn_from_block=-1, inject="residual") -> io.NodeOutput:
        _comfy.check_supported(model, NAME)
        blocks = unet(model).output_blocks
        check_inversion(model, inversion, NAME)
        feature = window_label("feature_start/feature_end", feature_start, feature_end)
        attn = window_label("attn_start/attn_end", attn_start, attn_end)
        source_cond = encode(clip, source_caption or "")
        check_clip(model, source_cond, "source caption")
        has_attention = [any(hasattr(m, "transformer_blocks") for m in b.modules()) for b in blocks]
        fb = default_feature_block(has_attention) if feature_block < 0 else int(feature_block)
        ab = fb if attn_from_block < 0 else int(attn_from_block)
        for label, b in (("feature_block", fb), ("attn_from_block", ab)):
            if not 0 <= b < len(blocks):
                raise ValueError(f"{label} {b} is not a decoder block of this model (0..{len(blocks) - 1}): use -1 for "
                                 "Plug-and-Play's default")
        algorithm = PnP(feature, fb, attn, frozenset(range(ab, len(blocks))), inject)
        if inject == "residual":
            residual_conv(model, fb)  # a block without a ResBlock fails here, not in the first step
        controller = PnPController(algorithm, inversion, source_cond, dtype=model.model_dtype(), name=NAME)
        return io.NodeOutput(controller.install(model))
