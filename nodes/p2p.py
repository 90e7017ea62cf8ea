"""PSEdit Attention Control: Prompt-to-Prompt (Hertz et al. 2022) on an inverted photo, as its reference code does
it (google/prompt-to-prompt, the null-text notebook's controllers; the math in :mod:`psedit_core.p2p`).

At every step a source pass (:mod:`.control`) runs the model on DDIM Invert's trajectory with the source caption;
the guider's branches that carry the edit caption (found by their text, whatever the guider) read its
cross-attention maps through the word alignment inside each token's window (replace / refine, optionally
reweighted), and its self-attention maps at a quarter of the latent's side and below inside the self-attention
window; every other branch (the unconditional one, the source caption's own) is left alone. The local blend
recomputes its mask after every step from the maps of the source pass and of the edit branch summed so far, and
from ``blend_start`` on keeps the edit's latent on the photo's trajectory outside it (through the x0 prediction, so
an Euler / DDIM step lands exactly where the reference puts the latent).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..psedit_core.attention import (
    attention_output,
    attention_probs,
    blend_start_step,
    truncated_steps,
)
from ..psedit_core.p2p import (
    MODES,
    TAILS,
    Alignment,
    blend_map,
    blend_tokens,
    blended_prediction,
    edit_cross_attention,
    equalizer,
    local_blend_mask,
    refine_alignment,
    replace_mapper,
    self_replace_layer,
    words_alpha,
)
from . import _comfy
from .captions import check_clip, encode, indicator, split_words, tokenize_caption
from .control import ROLES, UNCOND, Controller, Step, branches, check_inversion, unet, window_label
from .inversion import InversionType

log = logging.getLogger(__name__)
NAME = "PSEdit Attention Control"


@dataclass(frozen=True)
class Blend:
    """The local blend: token weights of the blend words in the source and in the edit caption (None where a caption
    has none of them), the threshold and the fraction of the steps after which it acts."""

    source: torch.Tensor | None
    edit: torch.Tensor | None
    threshold: float = 0.3
    start: float = 0.2


class P2P:
    """Prompt-to-Prompt's rules for :class:`.control.Controller` (module docstring)."""

    uses_roles = True

    def __init__(self, alignment: Alignment, edit_cond, edit_text: str, cross=(0.0, 0.8), word_windows=(),
                 self_window=(0.0, 0.4), blend: Blend | None = None):
        self.alignment, self.edit_cond, self.edit_text = alignment, edit_cond, edit_text
        self.cross, self.word_windows, self.self_window, self.blend = cross, tuple(word_windows), self_window, blend
        self.kinds = ("attn2", "attn1") if self_window[1] > self_window[0] else ("attn2",)

    # ---- per sampling and step ----

    def install(self, ctl, model) -> None:
        pass

    def begin(self, ctl) -> None:
        ctl.run.state.update(alpha={}, acc={}, mask=None)

    def begin_step(self, ctl, step: Step) -> None:
        pass

    def check_conds(self, ctl, conds: dict) -> None:
        tensors = [c.get("cross_attn") for entries in conds.values() for c in entries if isinstance(c, dict)]
        mine = self.edit_cond[0][0]
        if not any(t is not None and t.shape[1:] == mine.shape[1:] and torch.equal(t[:1].cpu(), mine[:1].cpu())
                   for t in tensors):
            raise ValueError(
                f"{ctl.name}: no conditioning of this guider is the edit caption {self.edit_text!r} encoded by the "
                "node's CLIP, so no branch would be edited: give the guider's edit (positive) CLIPTextEncode the same "
                "text and CLIP (e.g. one Primitive string connected to both)"
            )

    def window_alpha(self, ctl, n: int) -> torch.Tensor:
        """``c`` of psedit_core.p2p eq. (C) for an ``n``-step schedule, ``[n, T]``."""
        cache = ctl.run.state["alpha"]
        if n not in cache:
            cache[n] = words_alpha(n, self.alignment.length, self.cross, self.word_windows)
        return cache[n]

    def step(self, ctl, index: int, n: int, sigma: float) -> Step:
        alpha = self.window_alpha(ctl, n)[min(index, n - 1)]
        cross = bool(alpha.any())
        self_attn = index in truncated_steps(*self.self_window, n)
        blend = self.blend is not None and blend_start_step(self.blend.start, n) < n  # maps summed only for a blend
        apply = blend and index >= blend_start_step(self.blend.start, n)
        acts = {"cross": cross, "alpha": alpha, "self": self_attn, "blend": blend, "apply": apply}
        return Step(index, n, sigma, needs_source=cross or self_attn or blend, acts=acts)

    def after(self, ctl, out, x, step: Step, next_sigma: float):
        if not step.acts["apply"]:
            return out
        mask = self.mask(ctl, tuple(x.shape[-2:]))
        ctl.run.state["mask"] = mask
        if mask is None:
            return out
        x_next = ctl.source_latent(next_sigma, x.device)
        return blended_prediction(out, x, x_next, step.sigma, next_sigma, mask.to(x.device))

    # ---- which branches carry the edit ----

    def roles(self, ctl, context: torch.Tensor, cond_or_uncond: list) -> tuple:
        """Per branch of the batch: "edit" where its text is the edit caption (and it is not ComfyUI's unconditional
        slot, which under negative-prompt inversion carries the source caption), else None: left as it is, as P2P
        leaves the unconditional branch and the source prompt's own branch."""
        cache = ctl.run.conds
        key = (context.device, context.dtype, context.shape[1:])
        if key not in cache:
            mine = self.edit_cond[0][0]
            length = mine.shape[1]
            # batched with a longer text (a long negative prompt), ComfyUI repeats the caption's tokens to the longer
            # length (comfy.conds.CONDCrossAttn.concat), so look for the repeated caption
            fits = mine.shape[2:] == context.shape[2:] and context.shape[1] % length == 0
            cache[key] = (mine[:1].repeat(1, context.shape[1] // length, 1).to(context.device, context.dtype)
                          if fits else None)
        edit = cache[key]
        n = max(len(cond_or_uncond), 1)
        b = context.shape[0] // n
        return tuple("edit" if edit is not None and not (cond_or_uncond and cond_or_uncond[i] == UNCOND)
                     and torch.equal(context[i * b:i * b + 1], edit) else None for i in range(n))

    # ---- the attention layers ----

    @staticmethod
    def _blends(ctl, layer) -> bool:
        return ctl.run.step.acts["blend"] and layer[0] != "middle"  # the reference reads no middle-block maps

    def record(self, ctl, kind, layer, q, k, v, heads, extra):
        acts, records = ctl.run.step.acts, ctl.run.records
        if kind == "attn2" and (acts["cross"] or self._blends(ctl, layer)):
            probs = attention_probs(q, k, heads)
            if acts["cross"]:
                records[("cross", layer)] = probs.to(ctl.dtype)
            if self._blends(ctl, layer):
                self._accumulate(ctl, "source", probs, extra)
            return attention_output(probs, v, heads)
        if kind == "attn1" and acts["self"] and self._self_layer(q, extra):
            records[("q", layer)], records[("k", layer)] = q.to(ctl.dtype), k.to(ctl.dtype)
        return None

    def edit(self, ctl, kind, layer, q, k, v, heads, extra, prev, default):
        acts = ctl.run.step.acts
        token, roles = extra.get(ROLES, (None, ()))
        if token != ctl.token or "edit" not in roles:
            return default()
        if kind == "attn2" and (acts["cross"] or self._blends(ctl, layer)):
            return self._cross(ctl, layer, q, k, v, heads, extra, prev, roles)
        if kind == "attn1" and acts["self"] and self._self_layer(q, extra):
            flags = [role == "edit" for role in roles]
            return ctl.source_self_attention(layer, q, k, v, heads, extra, flags, default)
        return default()

    @staticmethod
    def _self_layer(q, extra) -> bool:
        shape = extra.get("original_shape") or [0, 0, 1, 1]
        return self_replace_layer(q.shape[1], shape[-2] * shape[-1])

    def _cross(self, ctl, layer, q, k, v, heads, extra, prev, roles):
        acts, align = ctl.run.step.acts, self.alignment
        tokens = align.length
        if k.shape[1] % tokens:
            raise ValueError(
                f"{ctl.name}: the guider's text has {k.shape[1]} tokens but the source caption {tokens}: "
                "keep every caption within one 77-token window (and do not concatenate conditionings)"
            )
        a_src = ctl.usable(("cross", layer)) if acts["cross"] else None
        alpha = acts["alpha"]
        reads_own = not acts["cross"] or align.reads_own or bool((alpha < 1).any())
        _, b = branches(q, extra)
        base = prev(q, k, v, extra) if prev is not None else None  # a shadowed patch sees the whole batch
        outs = []
        for i, role in enumerate(roles):
            rows = slice(i * b, (i + 1) * b)
            if role is None:
                outs.append(base[rows] if base is not None else _comfy.attention(
                    q[rows], k[rows], v[rows], heads, {"attn_precision": extra.get("attn_precision")}))
                continue
            # an edit branch repeated to a longer batch (see roles) holds its caption's tokens k times; softmax over
            # k identical copies is the caption's own attention split k ways, so its first copy gives the same output
            k_own, v_own = k[rows, :tokens], v[rows, :tokens]
            own = attention_probs(q[rows], k_own, heads) if reads_own else None
            maps = edit_cross_attention(a_src, own, align, window=alpha) if acts["cross"] else own
            if self._blends(ctl, layer):
                self._accumulate(ctl, "edit", maps, extra)
            outs.append(attention_output(maps, v_own, heads))
        return torch.cat(outs, dim=0)

    # ---- the local blend ----

    def _accumulate(self, ctl, branch: str, probs: torch.Tensor, extra) -> None:
        weights = self.blend.source if branch == "source" else self.blend.edit
        if weights is None or probs.shape[-1] != weights.numel():
            return
        shape = extra.get("activations_shape")
        hw = (int(shape[-2]), int(shape[-1])) if shape else None
        acc = ctl.run.state["acc"]
        key = (branch, probs.shape[2])
        m = blend_map(probs, weights).detach()
        acc[key] = (acc[key][0] + m, hw) if key in acc else (m, hw)

    def mask(self, ctl, size: tuple[int, int]) -> torch.Tensor | None:
        """psedit_core.p2p eq. (L) from the maps summed so far, ``[B, 1, H, W]`` at the latent's size, or None
        before any was recorded."""
        acc = ctl.run.state["acc"]
        if not acc:
            return None
        tokens = blend_tokens([t for _, t in acc])
        parts = [local_blend_mask(m.reshape(m.shape[0], *hw), size, self.blend.threshold)
                 for (branch, t), (m, hw) in sorted(acc.items()) if t == tokens]
        return torch.stack(parts).amax(0) if parts else None


# --- the alignment from the node's inputs ---------------------------------------------------------------------------

def parse_word_windows(text: str, edit, n_default: tuple[float, float]) -> list[tuple[list[int], tuple[float, float]]]:
    """``"tiger: 0.2; sofa: 0.1-0.6"`` -> per-word cross-attention windows on the edit caption's tokens (a single
    number is the window's end, from 0, the reference's ``{"tiger": 0.2}``)."""
    out = []
    for entry in filter(None, (e.strip() for e in re.split(r"[;,\n]", text or ""))):
        word, sep, span = entry.partition(":")
        numbers = re.findall(r"\d*\.?\d+", span)
        if not sep or not word.strip() or len(numbers) not in (1, 2):
            raise ValueError(f"word_windows entry {entry!r}: write word: end or word: start-end (fractions of the "
                             "steps), entries separated by ';' or ','; e.g. 'tiger: 0.2; sofa: 0.1-0.6'")
        window = (0.0, float(numbers[0])) if len(numbers) == 1 else (float(numbers[0]), float(numbers[1]))
        window = window_label(f"word_windows {word.strip()!r}", *window)
        positions = edit.positions([word])
        if not positions:
            raise ValueError(f"word_windows: {word.strip()!r} is not a word of the edit caption {edit.text!r}")
        out.append((positions, window))
    return out


def alignment_for(mode: str, src, edt, reweight_words: str, reweight_scale: float, token_map: str) -> Alignment:
    length = src.length
    weights = None
    words = split_words(reweight_words or "")
    if mode == "reweight" and not words:
        raise ValueError("mode 'reweight' needs reweight_words: words of the edit caption whose attention is scaled")
    if words:
        positions = edt.positions(words)
        if not positions:
            raise ValueError(f"reweight_words {reweight_words!r} are not words of the edit caption {edt.text!r}: "
                             "name words it contains")
        weights = equalizer(length, positions, float(reweight_scale))
    if mode == "replace":
        mapper = replace_mapper(src.word_tokens, edt.word_tokens, length, tail=token_map)
        return Alignment("replace", length, mapper=mapper, weights=weights)
    index, alpha = refine_alignment(src.tokens, edt.tokens, length)
    return Alignment(mode, length, index=index, alpha=alpha, weights=weights)


# --- the node-time region (the MASK output) --------------------------------------------------------------------------

def blend_region(model, controller: Controller, payload, edit_cond, source_cond) -> torch.Tensor:
    """The local blend's mask ``[B, 1, H, W]`` at latent resolution as it stands after the last step when the edit
    branch follows the photo's trajectory: the controlled model run on every latent of the trajectory with the edit
    caption, the maps summed as during sampling (an estimate of the region the sampling's own mask converges to)."""
    inversion = payload.inversion
    probe = controller.install(model)
    progress = _comfy.Progress(inversion.steps)
    size = tuple(inversion.latents[0].shape[-2:])

    def run(model_k, x, sigmas, extra_args, store):
        with torch.no_grad():
            for i in range(inversion.steps):
                latent = inversion.latents[i].to(x.device, x.dtype)
                model_k(latent, sigmas[i] * latent.new_ones([latent.shape[0]]), **extra_args)
                progress()
        store["mask"] = controller.algorithm.mask(controller, size)
        return x

    mask = _comfy.run_on_trajectory(probe, payload, edit_cond, source_cond, 1.0, run)["mask"]
    if mask is None:
        raise ValueError("local blend: the model recorded no cross-attention maps for the blend words")
    return mask


# --- the node -------------------------------------------------------------------------------------------------------

class AttentionControlNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditAttentionControl",
            display_name="PSEdit Attention Control",
            category="PSEdit",
            description=(
                "Prompt-to-Prompt (Hertz et al. 2022) on the inverted photo, as its reference code does it: at every "
                "step a source pass runs the model on DDIM Invert's trajectory with the source caption and hands its "
                "cross-attention maps (and, early on, its self-attention at the small resolutions) to the branches of "
                "the guider that carry the edit caption, so the layout stays the photo's while the words change. "
                "replace: swap words one for one; refine: add or remove words (aligned tokens keep the source maps); "
                "reweight: scale chosen words' attention (also on a replace or refine, with reweight_words). Local "
                "blend recomputes its region after every step from the blend words' attention and keeps the edit on "
                "the photo's trajectory outside it; the MASK output is that region estimated at node time. Sample the "
                "MODEL with any guider (PSEdit Triple Guider with the null-text schedule, Perceptual Guidance, CFG); "
                "connect it only to the guider, not to DDIM Invert or Null-Text Inversion."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL (SD1.x, SD2.x or SDXL), the one DDIM Invert "
                               "used; LoRAs and other patches may be applied before."),
                InversionType.Input("inversion", tooltip="The trajectory from PSEdit DDIM Invert of the photo you "
                                    "edit (same SIGMAS as the sampler)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP: tokenises both captions to align their words "
                              "and encodes the source caption for the source pass."),
                io.String.Input("source_caption", multiline=True, default="a cat sitting on a sofa",
                                tooltip="What the photo shows: the same text as the source CLIPTextEncode."),
                io.String.Input("edit_caption", multiline=True, default="a tiger sitting on a sofa",
                                tooltip="What the photo should show: the same text as the guider's edit (positive) "
                                "CLIPTextEncode; its branches are the ones edited."),
                io.Combo.Input("mode", options=list(MODES), default="replace",
                               tooltip="replace: word swap, both captions have the same number of words. refine: "
                               "words added or removed, aligned tokens read the source maps, new ones their own. "
                               "reweight: refine plus reweight_scale on reweight_words."),
                io.Float.Input("cross_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step of cross-attention replacement, as a fraction of the steps "
                               "(counted as the reference counts, int(fraction x (steps + 1)))."),
                io.Float.Input("cross_end", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="End of cross-attention replacement (exclusive); P2P's default 0.8. Equal "
                               "to cross_start = off (but for word_windows)."),
                io.Float.Input("self_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step of self-attention replacement (layers at a quarter of the "
                               "latent's side and below), as a fraction of the steps (int(fraction x steps))."),
                io.Float.Input("self_end", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="End of self-attention replacement (exclusive); P2P uses 0.4-0.6. Higher "
                               "keeps more of the photo's shapes. Equal to self_start = off."),
                io.String.Input("blend_words", default="", optional=True,
                                tooltip="Local blend: words (from either caption, comma- or space-separated, e.g. "
                                "'cat, tiger') whose attention defines the edit region, recomputed every step; "
                                "outside it the edit follows the photo's trajectory. Empty = no blend (the MASK "
                                "output is then empty)."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Local blend: cut-off on the words' normalised attention (P2P: 0.3); lower "
                               "gives a larger region."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Local blend acts after this fraction of the steps (P2P: 0.2), to the end."),
                io.String.Input("reweight_words", default="", optional=True,
                                tooltip="Words of the edit caption whose attention is scaled by reweight_scale, on "
                                "top of mode replace or refine (mode reweight: refine with these words)."),
                io.Float.Input("reweight_scale", default=2.0, min=-10.0, max=10.0, step=0.1, optional=True,
                               tooltip="The factor on reweight_words' attention (0 removes the word, 2-5 strengthens "
                               "it)."),
                io.String.Input("word_windows", default="", optional=True,
                                tooltip="Per-word cross-attention windows on the edit caption, as P2P's "
                                "cross_replace_steps dict: 'tiger: 0.2; sofa: 0.1-0.6' (one number = end, from 0). "
                                "Words not named use cross_start/cross_end."),
                io.Combo.Input("token_map", options=list(TAILS), default="reference", optional=True,
                               tooltip="replace with swapped words of different token counts: 'reference' maps the "
                               "tokens after the last swap position by position, as P2P's code does; 'shifted' "
                               "(PSEdit's) keeps them paired with the same words of the source, as the paper "
                               "intends."),
            ],
            outputs=[
                io.Model.Output("controlled", display_name="model", tooltip="The controlled MODEL: connect it to the "
                                "guider (Triple Guider, CFGGuider, ...) and sample with SamplerCustomAdvanced."),
                io.Mask.Output("blend_mask", display_name="blend_mask",
                               tooltip="The local blend's edit region (white = may change) estimated on the photo's "
                               "trajectory, image size, for PSEdit Perceptual Guidance's mask; all black without "
                               "blend_words."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, clip, source_caption, edit_caption, mode, cross_start, cross_end, self_start,
                self_end, blend_words="", blend_threshold=0.3, blend_start=0.2, reweight_words="",
                reweight_scale=2.0, word_windows="", token_map="reference") -> io.NodeOutput:
        _comfy.check_supported(model, NAME)
        unet(model)
        check_inversion(model, inversion, NAME)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        cross = window_label("cross_start/cross_end", cross_start, cross_end)
        self_window = window_label("self_start/self_end", self_start, self_end)
        window_label("blend_start", blend_start, 1.0)
        source_cond, edit_cond = encode(clip, source_caption), encode(clip, edit_caption)
        check_clip(model, source_cond, "source caption")
        check_clip(model, edit_cond, "edit caption")
        src = tokenize_caption(clip, source_caption, "source_caption")
        edt = tokenize_caption(clip, edit_caption, "edit_caption")
        if src.length != edt.length:
            raise ValueError("the captions tokenise to windows of different lengths: use the same CLIP for both")
        alignment = alignment_for(mode, src, edt, reweight_words, reweight_scale, token_map)
        windows = parse_word_windows(word_windows, edt, cross)
        blend = None
        words = split_words(blend_words or "")
        if words:
            src_pos, edt_pos = src.positions(words), edt.positions(words)
            if not src_pos and not edt_pos:
                raise ValueError(f"blend_words {blend_words!r} are in neither caption: name words of the source or "
                                 "edit caption (e.g. the object being changed)")
            blend = Blend(*(indicator(src.length, p) if p else None for p in (src_pos, edt_pos)),
                          threshold=float(blend_threshold), start=float(blend_start))
        algorithm = P2P(alignment, edit_cond, edit_caption, cross, windows, self_window, blend)
        controller = Controller(algorithm, inversion, source_cond, dtype=model.model_dtype(), name=NAME)
        latent = inversion.inversion.latents[0]
        r = _comfy.SPATIAL_RATIO
        mask_out = torch.zeros(latent.shape[0], latent.shape[-2] * r, latent.shape[-1] * r)
        if blend is not None and blend_start_step(blend.start, inversion.inversion.steps) < inversion.inversion.steps:
            region = blend_region(model, controller, inversion, edit_cond, source_cond)
            mask_out = region[:, 0].repeat_interleave(r, dim=1).repeat_interleave(r, dim=2).cpu()
            log.info("%s: local blend region (estimated on the photo's trajectory) covers %.0f%% of the image", NAME,
                     100 * float(region.mean()))
        return io.NodeOutput(controller.install(model), mask_out)
