"""PSEdit Attention Control (Prompt-to-Prompt) and PSEdit Feature Injection (Plug-and-Play) on an inverted photo.

One capture/inject mechanism (:class:`Controller`), wired through ComfyUI's own patch points on a clone of the MODEL,
so the output is a MODEL that any guider samples (PSEdit Triple Guider, Perceptual Guidance, CFGGuider, ...):

- attention *replace* patches (``attn1`` / ``attn2``) on every transformer layer, keyed ``(block, number, index)``
  (SDXL's 10-deep transformers included); each calls the patch it shadows (e.g. Self-Attention Guidance's) whenever
  it does not act itself;
- an output block patch (Plug-and-Play's decoder features);
- an OUTER_SAMPLE wrapper (once per sampling: input checks, the source caption's conditioning added to the guider's
  conds so ComfyUI prepares it like any other, everything recorded freed at the end);
- a PREDICT_NOISE wrapper (once per model evaluation: the *source pass* -- the model on the inversion trajectory's
  latent at this noise level with the source caption, under ``no_grad`` -- then the guider, then the local blend);
- an APPLY_MODEL wrapper (Prompt-to-Prompt: which branches of a batched UNet call carry the edit caption, found by
  their text tensors, so the rule does not depend on a guider's batch order: CFGGuider and the Triple Guider put the
  edit first, DualCFGGuider last).

The math is in :mod:`psedit_core.attention`. Records live for one model evaluation (one step), in the model's dtype.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import torch
from comfy.ldm.modules.attention import optimized_attention
from comfy_api.latest import io

from ..psedit_core.attention import (
    MODES,
    Alignment,
    attention_output,
    attention_probs,
    blend_map,
    blend_prediction,
    blend_resolution,
    edit_cross_attention,
    equalizer,
    local_blend_mask,
    refine_alignment,
    replace_chunks,
    replace_mapper,
    self_replace_layer,
    trajectory_point,
    window_steps,
    word_positions,
)
from ..psedit_core.schedule import step_index
from . import _comfy
from .inversion import InversionType

log = logging.getLogger(__name__)

SOURCE_PASS = "psedit_control_source_pass"  # transformer_options key: the controller token of a source pass
BLEND_PASS = "psedit_control_blend_pass"  # ... of the local-blend probe at node time
ROLES = "psedit_control_roles"  # ... per-branch roles of a P2P edit pass
UNCOND = 1  # ComfyUI's cond_or_uncond value of the unconditional branch (comfy.samplers.UNCOND)
UNET_FAMILIES = ("SD15", "SD20", "SDXL")


# --- what the model offers ----------------------------------------------------------------------------------------

def _unet(model):
    unet = model.model.diffusion_model
    if not hasattr(unet, "output_blocks"):
        raise ValueError(
            f"PSEdit attention and feature control patch a UNet's attention layers; this {_comfy.model_family(model)} "
            "model has none: use an SD1.x, SD2.x or SDXL checkpoint"
        )
    return unet


def _has_transformer(block) -> bool:
    return any(hasattr(m, "transformer_blocks") for m in block.modules())


def transformer_layers(model) -> list[tuple[str, int, int]]:
    """Every transformer layer's ``(block, number, index)`` key, as ComfyUI's replace patches name them."""
    unet = _unet(model)
    groups = [("input", i, b) for i, b in enumerate(unet.input_blocks)] + [("middle", 0, unet.middle_block)]
    groups += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    keys = []
    for name, number, block in groups:
        for m in block.modules():
            if hasattr(m, "transformer_blocks"):
                keys += [(name, number, j) for j in range(len(m.transformer_blocks))]
    return keys


def default_feature_block(model) -> int:
    """Plug-and-Play's feature layer: the second decoder block at the coarsest resolution that has attention
    (SD1.x/SD2.x: output block 4 = diffusers' ``up_blocks[1].resnets[1]``; SDXL: output block 1)."""
    blocks = _unet(model).output_blocks
    first = next((i for i, b in enumerate(blocks) if _has_transformer(b)), 0)
    return min(first + 1, len(blocks) - 1)


# --- captions --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Caption:
    """A caption as the CLIP tokenises it: its words, each word's tokens, and the full token sequence of one
    77-token window (start token, the words' tokens, end token; no padding)."""

    text: str
    words: tuple[str, ...]
    word_tokens: tuple[tuple, ...]
    tokens: tuple
    length: int

    def positions(self, wanted: list[str]) -> list[int]:
        """Token positions of the words in ``wanted`` (case-insensitive, surrounding punctuation ignored)."""
        keys = {_word_key(w) for w in wanted}
        spans = word_positions(self.word_tokens)
        return [p for w, span in zip(self.words, spans, strict=True) if _word_key(w) in keys for p in span]


def _word_key(word: str) -> str:
    return word.strip().strip(".,;:!?\"'()[]").lower()


def _hashable(token):
    if isinstance(token, int):
        return token
    t = torch.as_tensor(token)  # a textual-inversion embedding
    return ("embedding", tuple(t.shape), round(float(t.float().sum()), 4))


def _token_key(tokens: dict) -> str:
    return "l" if "l" in tokens else sorted(tokens)[0]


def _real(window: list) -> list:
    return [t for t in window if len(t) > 2 and t[2] != 0]


def tokenize_caption(clip, text: str, name: str) -> Caption:
    """Tokenise ``text`` with the CLIP's own tokenizer and split its tokens into words (each word tokenised alone,
    the way CLIP's BPE treats it inside the caption). SDXL's two tokenizers must agree on the positions."""
    if not text.strip():
        raise ValueError(f"{name} is empty: write what the photo shows / should show")
    full = clip.tokenize(text, return_word_ids=True)
    key = _token_key(full)
    windows = full[key]
    if len(windows) != 1:
        raise ValueError(f"{name} is longer than one 77-token window ({len(windows)} windows): shorten it, word "
                         "alignment works on one window")
    lengths = {k: len(_real(v[0])) for k, v in full.items() if v}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{name}: this CLIP's tokenizers disagree on the token positions ({lengths}): attention "
                         "control needs one token layout")
    window = windows[0]
    real = _real(window)
    first = next(i for i, t in enumerate(window) if len(t) > 2 and t[2] != 0) if real else 1
    words = tuple(text.split())
    word_tokens = []
    for w in words:
        part = _real(clip.tokenize(w, return_word_ids=True)[key][0])
        word_tokens.append(tuple(_hashable(t[0]) for t in part))
    joined = [t for w in word_tokens for t in w]
    if joined != [_hashable(t[0]) for t in real] or first != 1:
        raise ValueError(f"{name}: its tokens could not be split into its words (weights or embeddings across word "
                         "boundaries?): write the caption as plain words")
    tokens = (_hashable(window[0][0]), *joined, _hashable(window[len(real) + 1][0]))
    return Caption(text, words, tuple(word_tokens), tokens, len(window))


def indicator(length: int, positions: list[int]) -> torch.Tensor:
    """1 at ``positions``, 0 elsewhere: the tokens whose maps a local blend sums."""
    w = torch.zeros(length)
    w[positions] = 1.0
    return w


def split_words(text: str) -> list[str]:
    """Words of a comma- or space-separated list."""
    return text.replace(",", " ").split()


def encode(clip, text: str):
    """CONDITIONING as the stock CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def check_clip(model, cond, name: str) -> None:
    want = _comfy.context_dim(model)
    width = cond[0][0].shape[-1]
    if want is not None and width != want:
        raise ValueError(
            f"clip: it encodes the {name} at width {width} but this {_comfy.model_family(model)} MODEL reads text of "
            f"width {want}: connect the CLIP of the same checkpoint as the MODEL"
        )
    _comfy.check_conditioning(model, cond, name)


def check_inversion(model, payload, node: str) -> None:
    if payload is None or not hasattr(payload, "inversion"):
        raise ValueError(f"{node}: connect the inversion output of PSEdit DDIM Invert")
    if payload.family != _comfy.model_family(model):
        raise ValueError(
            f"the inversion was made with a {payload.family} model but this MODEL is {_comfy.model_family(model)}: "
            f"connect the same MODEL to DDIM Invert and {node}"
        )


# --- the plan: which rule where and when ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    start: float
    end: float

    def __post_init__(self):
        window_steps(self.start, self.end, 1)  # validates

    def holds(self, step: int, n: int) -> bool:
        return step in window_steps(self.start, self.end, n)


@dataclass(frozen=True)
class StepState:
    """What acts at one model evaluation."""

    step: int
    cross: bool = False
    self_attn: bool = False
    feature: bool = False
    attn: bool = False
    blend: bool = False

    @property
    def needs_source(self) -> bool:
        return self.cross or self.self_attn or self.feature or self.attn


@dataclass(frozen=True)
class Plan:
    """Prompt-to-Prompt (``alignment``, cross/self windows, blend) or Plug-and-Play (feature/attention windows)."""

    kind: str  # "p2p" or "pnp"
    alignment: Alignment | None = None
    cross: Window = Window(0.0, 0.0)
    self_attn: Window = Window(0.0, 0.0)
    blend_mask: torch.Tensor | None = None  # [B, 1, H, W] at latent resolution
    blend: Window = Window(0.0, 0.0)
    feature: Window = Window(0.0, 0.0)
    feature_block: int = -1
    attn: Window = Window(0.0, 0.0)
    attn_blocks: frozenset = frozenset()

    def state(self, step: int, n: int) -> StepState:
        if self.kind == "p2p":
            return StepState(step, cross=self.cross.holds(step, n), self_attn=self.self_attn.holds(step, n),
                             blend=self.blend_mask is not None and self.blend.holds(step, n))
        return StepState(step, feature=self.feature.holds(step, n), attn=self.attn.holds(step, n))


# --- the controller ------------------------------------------------------------------------------------------------

@dataclass
class _Run:
    """One sampling's state: the source pass's records (one step at a time) and device copies."""

    records: dict = field(default_factory=dict)
    sigma: float | None = None
    state: StepState | None = None
    trajectory: tuple | None = None
    conds: dict = field(default_factory=dict)
    warned: set = field(default_factory=set)


class Controller:
    """Captures what the plan needs in the source pass and injects it into the edit branches (module docstring).

    Shared by every clone of the patched MODEL: ComfyUI deep-copies model options when it clones a patcher, and the
    patches must keep pointing at this one object, so a deep copy returns it.
    """

    def __init__(self, plan: Plan, payload, source_cond, edit_cond=None, dtype=torch.float32, name="PSEdit control",
                 edit_text: str = ""):
        self.plan, self.payload, self.name = plan, payload, name
        self.source_cond, self.edit_cond, self.edit_text = source_cond, edit_cond, edit_text
        self.dtype = dtype
        self.token = uuid.uuid4().hex[:12]
        self.source_key = f"psedit_control_source_{self.token}"
        self.run: _Run | None = None
        self.blend_probe = None  # (source token weights, edit token weights, accumulator) during the node's probe
        self._warned: set = set()

    def __deepcopy__(self, memo):
        return self

    # ---- installing ----

    def install(self, model, probe_only: bool = False):
        """A clone of ``model`` carrying this controller's patches and wrappers (``probe_only``: the cross-attention
        patches alone, for the local-blend probe)."""
        m = model.clone()
        kinds = ("attn2",) if probe_only else self._layer_kinds()
        replace = m.model_options.get("transformer_options", {}).get("patches_replace", {})
        for key in transformer_layers(m):
            for kind in kinds:
                table = replace.get(kind, {})
                prev = table.get(key) or table.get(key[:2])
                m.set_model_patch_replace(self._attention_patch(kind, prev), kind, *key)
        if probe_only:
            return m
        if self.plan.kind == "pnp":
            m.set_model_output_block_patch(self._output_block_patch)
        add = m.add_wrapper_with_key
        key = f"psedit_control_{self.token}"
        add(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, self._outer_sample)
        add(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, key, self._predict_noise)
        if self.plan.kind == "p2p":
            add(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, self._apply_model)
        return m

    def _layer_kinds(self) -> tuple[str, ...]:
        """The attention layers the plan touches: P2P cross-attention (and self-attention when its window holds
        steps), PnP self-attention (when its window holds steps)."""
        plan = self.plan
        if plan.kind == "p2p":
            return ("attn2", "attn1") if plan.self_attn.end > plan.self_attn.start else ("attn2",)
        return ("attn1",) if plan.attn.end > plan.attn.start else ()

    def _attention_patch(self, kind: str, prev):
        def patch(q, k, v, extra_options):
            return self.attention(kind, prev, q, k, v, extra_options)

        return patch

    # ---- sampling wrappers ----

    def _outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        self._check_sampling(latent_image, sigmas)
        conds = getattr(guider, "conds", None)
        if not isinstance(conds, dict):
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        self._check_captions(conds)
        conds[self.source_key] = comfy.sampler_helpers.convert_cond(self.source_cond)
        self.run = _Run()
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            conds.pop(self.source_key, None)
            self.run = None

    def _check_sampling(self, latent_image, sigmas) -> None:
        inv = self.payload.inversion
        want = tuple(inv.latents[0].shape)
        got = tuple(latent_image.shape)
        if got[1:] != want[1:] or got[0] not in (want[0],):
            r = _comfy.SPATIAL_RATIO
            raise ValueError(
                f"{self.name}: the sampled latent is {got[-1] * r}x{got[-2] * r} px (batch {got[0]}) but the inversion "
                f"is of a {want[-1] * r}x{want[-2] * r} px photo (batch {want[0]}): connect the DDIM Invert of the "
                "photo you are editing (its inverted LATENT and its inversion)"
            )
        mine = inv.sigmas.detach().float().cpu()
        s = sigmas.detach().float().cpu()
        if float(s.max()) > float(mine.max()) * (1 + 1e-4) + 1e-6 or float(s.min()) < float(mine.min()) - 1e-6:
            raise ValueError(
                f"{self.name}: the sampler's SIGMAS ({float(s.max()):.3g}..{float(s.min()):.3g}) leave the inversion's "
                f"range ({float(mine.max()):.3g}..{float(mine.min()):.3g}): sample with the SIGMAS you inverted with"
            )
        if s.numel() != mine.numel() or not torch.allclose(s, mine, rtol=1e-4, atol=1e-6):
            log.warning("%s: sampling other SIGMAS than the inversion's; the source pass reads the trajectory between "
                        "its steps (DDIM's linear path)", self.name)

    def _check_captions(self, conds: dict) -> None:
        if self.plan.kind != "p2p":
            return
        tensors = [c.get("cross_attn") for entries in conds.values() for c in entries if isinstance(c, dict)]
        mine = self.edit_cond[0][0]
        if not any(t is not None and t.shape[1:] == mine.shape[1:] and torch.equal(t[:1].cpu(), mine[:1].cpu())
                   for t in tensors):
            raise ValueError(
                f"{self.name}: no conditioning of this guider is the edit caption {self.edit_text!r} encoded by the "
                "node's CLIP, so no branch would be edited: give the guider's edit (positive) CLIPTextEncode the same "
                "text and CLIP (e.g. one Primitive string connected to both)"
            )

    def _trajectory(self, device):
        run = self.run
        if run.trajectory is None or run.trajectory[0][0].device != device:
            inv = self.payload.inversion
            latents = tuple(t.detach().to(device, torch.float32) for t in inv.latents)
            run.trajectory = (latents, inv.sigmas.detach().cpu())
        return run.trajectory

    def _predict_noise(self, executor, x, timestep, model_options, seed):
        guider = executor.class_obj
        run = self.run
        sigmas = _comfy.sample_sigmas(model_options)
        if run is None or sigmas is None or self.source_key not in getattr(guider, "conds", {}):
            return executor(x, timestep, model_options, seed)
        comfy.model_management.throw_exception_if_processing_interrupted()
        state = self.plan.state(step_index(sigmas, timestep), sigmas.numel() - 1)
        sigma = float(timestep.reshape(-1)[0])
        if state.needs_source:
            self._source_pass(guider, x, timestep, sigma, state, model_options)
        run.state = state
        try:
            out = executor(x, timestep, model_options, seed)
        finally:
            run.state = None
        if state.blend:
            latents, traj_sigmas = self._trajectory(x.device)
            _, reference = trajectory_point(latents, traj_sigmas, sigma)
            out = blend_prediction(out, reference, self.plan.blend_mask.to(x.device))
        return out

    def _source_pass(self, guider, x, timestep, sigma, state, model_options) -> None:
        run = self.run
        if run.sigma == sigma and run.records:
            return  # this step's source pass is recorded (e.g. Perceptual Guidance evaluating the guider again)
        run.records, run.sigma = {}, None
        latents, traj_sigmas = self._trajectory(x.device)
        x_src, _ = trajectory_point(latents, traj_sigmas, sigma)
        options = comfy.model_patcher.create_model_options_clone(model_options)
        options.setdefault("transformer_options", {})[SOURCE_PASS] = self.token
        run.state = state
        try:
            with torch.no_grad():
                comfy.samplers.calc_cond_batch(guider.inner_model, [guider.conds[self.source_key]], x_src.to(x.dtype),
                                               timestep, options)
        finally:
            run.state = None
        run.sigma = sigma

    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                     **kwargs):
        transformer_options = transformer_options or {}
        run = self.run
        if run is None or run.state is None or transformer_options.get(SOURCE_PASS) or c_crossattn is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        roles = self._roles(c_crossattn, transformer_options.get("cond_or_uncond", []))
        options = {**transformer_options, ROLES: (self.token, roles)}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    def _roles(self, context: torch.Tensor, cond_or_uncond: list) -> tuple:
        """Per branch of the batch: "edit" where its text is the edit caption (and it is not ComfyUI's unconditional
        slot, which under negative-prompt inversion carries the source caption), else None: left as it is, as P2P
        leaves the unconditional branch and the source prompt's own branch."""
        run = self.run
        key = (context.device, context.dtype, context.shape[1:])
        if key not in run.conds:
            mine = self.edit_cond[0][0]
            length = mine.shape[1]
            # batched with a longer text (a long negative prompt), ComfyUI repeats the caption's tokens to the longer
            # length (comfy.conds.CONDCrossAttn.concat), so look for the repeated caption
            fits = mine.shape[2:] == context.shape[2:] and context.shape[1] % length == 0
            run.conds[key] = (mine[:1].repeat(1, context.shape[1] // length, 1).to(context.device, context.dtype)
                              if fits else None)
        edit = run.conds[key]
        n = max(len(cond_or_uncond), 1)
        b = context.shape[0] // n
        return tuple("edit" if edit is not None and not (cond_or_uncond and cond_or_uncond[i] == UNCOND)
                     and torch.equal(context[i * b:i * b + 1], edit) else None for i in range(n))

    # ---- attention layers ----

    def attention(self, kind, prev, q, k, v, extra):
        def default():
            if prev is not None:
                return prev(q, k, v, extra)
            return optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                       transformer_options=extra)

        heads = extra["n_heads"]
        layer = (extra["block"][0], extra["block"][1], extra.get("block_index", 0))
        if extra.get(BLEND_PASS) == self.token and kind == "attn2":
            return self._probe_blend(q, k, v, heads, extra)
        run = self.run
        if run is None or run.state is None:
            return default()
        state = run.state
        source_pass = extra.get(SOURCE_PASS)
        if source_pass is not None:
            if source_pass != self.token:
                return default()
            out = self._record(kind, layer, q, k, v, heads, extra, state)
            return default() if out is None else out
        if kind == "attn2" and self.plan.kind == "p2p" and state.cross:
            return self._p2p_cross(layer, q, k, v, heads, extra, prev, default)
        if kind == "attn1" and self._injects_self(layer, q, extra, state):
            return self._inject_self(layer, q, k, v, heads, extra, default)
        return default()

    def _injects_self(self, layer, q, extra, state) -> bool:
        if self.plan.kind == "p2p":
            shape = extra.get("original_shape") or [0, 0, 1, 1]
            return state.self_attn and self_replace_layer(q.shape[1], shape[-2] * shape[-1])
        return state.attn and layer[0] == "output" and layer[1] in self.plan.attn_blocks

    def _record(self, kind, layer, q, k, v, heads, extra, state):
        records = self.run.records
        if kind == "attn2" and self.plan.kind == "p2p" and state.cross:
            probs = attention_probs(q, k, heads)
            records[("cross", layer)] = probs.to(self.dtype)
            return attention_output(probs, v, heads)
        if kind == "attn1" and self._injects_self(layer, q, extra, state):
            records[("q", layer)], records[("k", layer)] = q.to(self.dtype), k.to(self.dtype)
        return None

    def _usable(self, key):
        """A record, as an ordinary tensor when autograd will save it (Perceptual Guidance 'full' evaluates the
        edit branch outside inference mode; the source pass may have run inside it)."""
        records = self.run.records
        t = records.get(key)
        if t is None:
            raise RuntimeError(f"{self.name}: nothing was recorded for {key[1]} in the source pass")
        if t.is_inference() and not torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                t = records[key] = t.clone()
        return t

    def _chunks(self, q, extra):
        n = max(len(extra.get("cond_or_uncond", [])), 1)
        return n, q.shape[0] // n

    def _p2p_cross(self, layer, q, k, v, heads, extra, prev, default):
        token, roles = extra.get(ROLES, (None, ()))
        n, b = self._chunks(q, extra)
        if token != self.token or not any(roles):
            return default()
        a_src = self._usable(("cross", layer))
        align = self.plan.alignment
        tokens = a_src.shape[-1]
        if k.shape[1] % tokens:
            raise ValueError(
                f"{self.name}: the guider's text has {k.shape[1]} tokens but the source caption {tokens}: "
                "keep every caption within one 77-token window (and do not concatenate conditionings)"
            )
        base = prev(q, k, v, extra) if prev is not None else None  # a shadowed patch sees the whole batch
        outs = []
        for i, role in enumerate(roles):
            rows = slice(i * b, (i + 1) * b)
            if role is None:
                outs.append(base[rows] if base is not None else
                            optimized_attention(q[rows], k[rows], v[rows], heads,
                                                attn_precision=extra.get("attn_precision")))
                continue
            # an edit branch repeated to a longer batch (see _roles) holds its caption's tokens k times; softmax over
            # k identical copies is the caption's own attention split k ways, so its first copy gives the same output
            k_own, v_own = k[rows, :tokens], v[rows, :tokens]
            needs_own = align.mode != "replace" and bool((align.alpha < 1).any())
            a_edit = attention_probs(q[rows], k_own, heads) if needs_own else None
            outs.append(attention_output(edit_cross_attention(a_src, a_edit, align), v_own, heads))
        return torch.cat(outs, dim=0)

    def _inject_self(self, layer, q, k, v, heads, extra, default):
        n, b = self._chunks(q, extra)
        if self.plan.kind == "p2p":
            token, roles = extra.get(ROLES, (None, ()))
            flags = [r is not None for r in roles] if token == self.token else []
        else:
            flags = [True] * n
        if not any(flags):
            return default()
        q_src, k_src = self._usable(("q", layer)), self._usable(("k", layer))
        if q_src.shape[0] != b or q_src.shape[1:] != q.shape[1:]:
            if "self-shape" not in self._warned:
                self._warned.add("self-shape")
                log.warning("%s: self-attention not injected: the sampled latent (batch %d, %d positions) is not the "
                            "inverted photo's (batch %d, %d positions); sample the LATENT DDIM Invert returns",
                            self.name, b, q.shape[1], q_src.shape[0], q_src.shape[1])
            return default()
        q2, k2 = replace_chunks(q, q_src, flags), replace_chunks(k, k_src, flags)
        return optimized_attention(q2, k2, v, heads, attn_precision=extra.get("attn_precision"))

    def _output_block_patch(self, h, hsp, transformer_options):
        block = transformer_options.get("block")
        run = self.run
        if run is None or run.state is None or not run.state.feature or block != ("output", self.plan.feature_block):
            return h, hsp
        source_pass = transformer_options.get(SOURCE_PASS)
        if source_pass == self.token:
            run.records["h"], run.records["hsp"] = h.to(self.dtype), hsp.to(self.dtype)
            return h, hsp
        if source_pass is not None:
            return h, hsp
        n = max(len(transformer_options.get("cond_or_uncond", [])), 1)
        flags = [True] * n
        return replace_chunks(h, self._usable("h"), flags), replace_chunks(hsp, self._usable("hsp"), flags)

    # ---- local-blend probe (node time) ----

    def _probe_blend(self, q, k, v, heads, extra):
        weights, acc = self.blend_probe
        probs = attention_probs(q, k, heads)
        n, b = self._chunks(q, extra)
        shape = extra.get("activations_shape")
        hw = (int(shape[-2]), int(shape[-1])) if shape else None
        for i, index in enumerate(extra.get("cond_or_uncond", [0] * n)):
            w = weights[index]
            if w is None or probs.shape[-1] != w.numel():
                continue
            m = blend_map(probs[i * b:(i + 1) * b], w)
            key = (index, probs.shape[2])
            acc[key] = (acc[key][0] + m, hw) if key in acc else (m, hw)
        return attention_output(probs, v, heads)


# --- the local-blend region (node time) --------------------------------------------------------------------------

def blend_region(model, controller: Controller, payload, source_cond, edit_cond, source_weights, edit_weights,
                 threshold: float) -> torch.Tensor:
    """The local-blend mask ``[B, 1, H, W]`` at latent resolution: the source words' cross-attention maps (source
    caption) and the edit words' (edit caption), both on the inversion trajectory, accumulated over every step,
    at the resolution nearest a quarter of the latent's side; eq. (L) of psedit_core.attention, then their union."""
    inversion = payload.inversion
    probe = controller.install(model, probe_only=True)
    acc: dict = {}
    controller.blend_probe = ((source_weights, edit_weights), acc)
    progress = _comfy.Progress(inversion.steps)

    def run(model_k, x, sigmas, extra_args, store):
        guider = model_k.inner_model
        conds = [guider.conds["negative"], guider.conds["positive"]]  # index 0: source caption, 1: edit caption
        options = comfy.model_patcher.create_model_options_clone(extra_args["model_options"])
        options.setdefault("transformer_options", {})[BLEND_PASS] = controller.token
        with torch.no_grad():
            for i in range(inversion.steps):
                latent = inversion.latents[i].to(x.device, x.dtype)
                sigma = sigmas[i] * latent.new_ones([latent.shape[0]])
                comfy.samplers.calc_cond_batch(guider.inner_model, conds, latent, sigma, options)
                progress()
        return x

    try:
        _comfy.run_on_trajectory(probe, payload, edit_cond, source_cond, 1.0, run)
    finally:
        controller.blend_probe = None
    latent = inversion.latents[0]
    size = tuple(latent.shape[-2:])
    if not acc:
        raise ValueError("local blend: the model recorded no cross-attention maps for the blend words")
    tokens = blend_resolution([n for _, n in acc], size[0] * size[1])
    mask = None
    for index in (0, 1):
        if (index, tokens) not in acc:
            continue
        m, hw = acc[(index, tokens)]
        part = local_blend_mask(m.reshape(m.shape[0], *hw).cpu(), size, threshold)
        mask = part if mask is None else torch.maximum(mask, part)
    return mask


# --- the nodes -----------------------------------------------------------------------------------------------------

def _window(label: str, start: float, end: float) -> Window:
    try:
        return Window(float(start), float(end))
    except ValueError as exc:
        raise ValueError(f"{label}: {exc}") from exc


class AttentionControlNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditAttentionControl",
            display_name="PSEdit Attention Control",
            category="PSEdit",
            description=(
                "Prompt-to-Prompt (Hertz et al. 2022) on the inverted photo: at every step a source pass runs the "
                "model on DDIM Invert's trajectory with the source caption and hands its cross-attention maps (and, "
                "early on, its self-attention at the small resolutions) to the branches of the guider that carry the "
                "edit caption, so the layout stays the photo's while the words change. replace: swap words one for "
                "one; refine: add or remove words (aligned tokens keep the source maps); reweight: scale chosen "
                "words' attention. Local blend keeps everything outside the blend words' region on the photo's "
                "trajectory, and outputs that region as a MASK. Sample the MODEL with any guider (PSEdit Triple "
                "Guider with the null-text schedule, Perceptual Guidance, CFG); connect it only to the guider, not to "
                "DDIM Invert or Null-Text Inversion."
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
                               tooltip="First step of cross-attention replacement, as a fraction of the steps."),
                io.Float.Input("cross_end", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="End of cross-attention replacement (exclusive); P2P's default 0.8. Equal "
                               "to cross_start = off."),
                io.Float.Input("self_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step of self-attention replacement (layers at a quarter of the "
                               "latent's side and below), as a fraction of the steps."),
                io.Float.Input("self_end", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="End of self-attention replacement (exclusive); P2P uses 0.4-0.6. Higher "
                               "keeps more of the photo's shapes. Equal to self_start = off."),
                io.String.Input("blend_words", default="", optional=True,
                                tooltip="Local blend: words (from either caption, comma- or space-separated, e.g. "
                                "'cat, tiger') whose attention defines the edit region; outside it every step follows "
                                "the photo's trajectory. Empty = no blend (the MASK output is then empty)."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Local blend: cut-off on the words' normalised attention (P2P: 0.3); lower "
                               "gives a larger region."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Local blend acts from this fraction of the steps to the end (P2P: 0.2)."),
                io.String.Input("reweight_words", default="", optional=True,
                                tooltip="reweight mode: words of the edit caption whose attention is scaled."),
                io.Float.Input("reweight_scale", default=2.0, min=-10.0, max=10.0, step=0.1, optional=True,
                               tooltip="reweight mode: the factor on those words' attention (0 removes the word, "
                               "2-5 strengthens it)."),
            ],
            outputs=[
                io.Model.Output("controlled", display_name="model", tooltip="The controlled MODEL: connect it to the "
                                "guider (Triple Guider, CFGGuider, ...) and sample with SamplerCustomAdvanced."),
                io.Mask.Output("blend_mask", display_name="blend_mask",
                               tooltip="The local blend's edit region (white = may change), image size, for PSEdit "
                               "Perceptual Guidance's mask; all black without blend_words."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, clip, source_caption, edit_caption, mode, cross_start, cross_end, self_start,
                self_end, blend_words="", blend_threshold=0.3, blend_start=0.2, reweight_words="",
                reweight_scale=2.0) -> io.NodeOutput:
        name = "PSEdit Attention Control"
        _comfy.check_supported(model, name)
        _unet(model)
        check_inversion(model, inversion, name)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        cross = _window("cross_start/cross_end", cross_start, cross_end)
        self_attn = _window("self_start/self_end", self_start, self_end)
        blend = _window("blend_start", blend_start, 1.0)
        source_cond, edit_cond = encode(clip, source_caption), encode(clip, edit_caption)
        check_clip(model, source_cond, "source caption")
        check_clip(model, edit_cond, "edit caption")
        src = tokenize_caption(clip, source_caption, "source_caption")
        edt = tokenize_caption(clip, edit_caption, "edit_caption")
        if src.length != edt.length:
            raise ValueError("the captions tokenise to windows of different lengths: use the same CLIP for both")
        length = src.length
        if mode == "replace":
            alignment = Alignment("replace", length, mapper=replace_mapper(src.word_tokens, edt.word_tokens, length))
        else:
            index, alpha = refine_alignment(src.tokens, edt.tokens, length)
            weights = None
            if mode == "reweight":
                words = split_words(reweight_words or "")
                positions = edt.positions(words)
                if not positions:
                    raise ValueError(f"reweight_words {reweight_words!r} are not words of the edit caption "
                                     f"{edit_caption!r}: name words it contains")
                weights = equalizer(length, positions, float(reweight_scale))
            alignment = Alignment(mode, length, index=index, alpha=alpha, weights=weights)

        controller = Controller(Plan("p2p", alignment=alignment, cross=cross, self_attn=self_attn), inversion,
                                source_cond, edit_cond, dtype=model.model_dtype(), name=name, edit_text=edit_caption)
        latent = inversion.inversion.latents[0]
        size = (latent.shape[0], latent.shape[-2] * _comfy.SPATIAL_RATIO, latent.shape[-1] * _comfy.SPATIAL_RATIO)
        words = split_words(blend_words or "")
        mask_out = torch.zeros(size)
        if words:
            src_pos, edt_pos = src.positions(words), edt.positions(words)
            if not src_pos and not edt_pos:
                raise ValueError(f"blend_words {blend_words!r} are in neither caption: name words of the source or "
                                 "edit caption (e.g. the object being changed)")
            weights = tuple(indicator(length, p) if p else None for p in (src_pos, edt_pos))
            region = blend_region(model, controller, inversion, source_cond, edit_cond, *weights,
                                  float(blend_threshold))
            controller.plan = Plan("p2p", alignment=alignment, cross=cross, self_attn=self_attn, blend_mask=region,
                                   blend=blend)
            r = _comfy.SPATIAL_RATIO
            mask_out = region[:, 0].repeat_interleave(r, dim=1).repeat_interleave(r, dim=2).cpu()
            log.info("%s: local blend region covers %.0f%% of the image", name, 100 * float(region.mean()))
        return io.NodeOutput(controller.install(model), mask_out)


class FeatureInjectionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PSEditFeatureInjection",
            display_name="PSEdit Feature Injection",
            category="PSEdit",
            description=(
                "Plug-and-Play (Tumanyan et al. 2023) on the inverted photo: at every step a source pass runs the "
                "model on DDIM Invert's trajectory with the source caption; its decoder features (one block) and "
                "its self-attention queries and keys (the later decoder layers) replace those of every branch the "
                "guider evaluates, so the edit keeps the photo's structure while the text changes its appearance. "
                "Paper defaults: features for 80% of the steps, self-attention for 50%. Sample the MODEL with any "
                "guider; connect it only to the guider, not to DDIM Invert or Null-Text Inversion."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL (SD1.x, SD2.x or SDXL), the one DDIM Invert "
                               "used; LoRAs and other patches may be applied before."),
                InversionType.Input("inversion", tooltip="The trajectory from PSEdit DDIM Invert of the photo you "
                                    "edit (same SIGMAS as the sampler)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to encode the source caption."),
                io.String.Input("source_caption", multiline=True, default="a cat sitting on a sofa",
                                tooltip="What the photo shows (the source pass's text)."),
                io.Float.Input("feature_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step of feature injection, as a fraction of the steps."),
                io.Float.Input("feature_end", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="End of feature injection (exclusive); PnP's default 0.8. Equal to "
                               "feature_start = off."),
                io.Float.Input("attn_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step of self-attention injection, as a fraction of the steps."),
                io.Float.Input("attn_end", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="End of self-attention injection (exclusive); PnP's default 0.5. Equal to "
                               "attn_start = off."),
                io.Int.Input("feature_block", default=-1, min=-1, max=63, optional=True,
                             tooltip="Decoder (output) block whose input features are injected; -1 = PnP's layer "
                             "(SD1.x: 4, SDXL: 1)."),
                io.Int.Input("attn_from_block", default=-1, min=-1, max=63, optional=True,
                             tooltip="Self-attention is injected in every transformer layer of the output blocks "
                             "from this one on; -1 = from the feature block (SD1.x: blocks 4-11, PnP's layers)."),
            ],
            outputs=[io.Model.Output("controlled", display_name="model",
                                     tooltip="The controlled MODEL: connect it to the guider and sample with "
                                     "SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, inversion, clip, source_caption, feature_start, feature_end, attn_start, attn_end,
                feature_block=-1, attn_from_block=-1) -> io.NodeOutput:
        name = "PSEdit Feature Injection"
        _comfy.check_supported(model, name)
        n_blocks = len(_unet(model).output_blocks)
        check_inversion(model, inversion, name)
        feature = _window("feature_start/feature_end", feature_start, feature_end)
        attn = _window("attn_start/attn_end", attn_start, attn_end)
        if not source_caption.strip():
            raise ValueError("source_caption is empty: write what the photo shows")
        source_cond = encode(clip, source_caption)
        check_clip(model, source_cond, "source caption")
        fb = default_feature_block(model) if feature_block < 0 else int(feature_block)
        ab = fb if attn_from_block < 0 else int(attn_from_block)
        for label, b in (("feature_block", fb), ("attn_from_block", ab)):
            if not 0 <= b < n_blocks:
                raise ValueError(f"{label} {b} is not a decoder block of this model (0..{n_blocks - 1}): use -1 for "
                                 "Plug-and-Play's default")
        attn_blocks = frozenset(range(ab, n_blocks))
        plan = Plan("pnp", feature=feature, feature_block=fb, attn=attn, attn_blocks=attn_blocks)
        controller = Controller(plan, inversion, source_cond, None, dtype=model.model_dtype(), name=name)
        return io.NodeOutput(controller.install(model))
