"""Prompt-to-Prompt and Plug-and-Play as their reference code samples them, written independently of PSEdit's nodes
for the tests: the semantics of google/prompt-to-prompt (the null-text notebook's ``AttentionStore``,
``AttentionControlEdit``, ``AttentionReplace`` / ``AttentionRefine`` / ``AttentionReweight``, ``LocalBlend``,
``get_time_words_attention_alpha``) and of pnp-diffusers (``pnp.py``'s ``denoise_step``, ``pnp_utils.py``'s
``register_attention_control_efficient`` / ``register_conv_control_efficient``), run on a ComfyUI UNet.

What differs from the reference code is only where it runs: ComfyUI's UNet (its attention layers replaced through
``patches_replace``, the residual convolution through a forward hook), ComfyUI's sigma space (a DDIM step with
eta 0 is an Euler step there) and a 64 px / 16x16-latent model (the blend reads the maps at a quarter of the
latent's side, the reference's 16x16 of a 64x64 latent). Both branches of P2P are *sampled* (source and edit rows of
one batch, unconditional rows first), as the reference samples them; Plug-and-Play's source rows read the saved
inversion latents, as the reference's ``load_source_latents_t``.

Token-level inputs (the replace mapper, refine alignment, equalizer, word positions) are passed in: they are
checked against the reference separately (tests/core/test_attention.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _probs(q, k, heads):
    b, n, c = q.shape
    d = c // heads
    qh = q.float().reshape(b, n, heads, d).transpose(1, 2)
    kh = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [B, H, N, T]


def _out(probs, v, heads):
    b, _, n, _ = probs.shape
    d = v.shape[-1] // heads
    vh = v.float().reshape(b, v.shape[1], heads, d).transpose(1, 2)
    return (probs @ vh).transpose(1, 2).reshape(b, n, heads * d).to(v.dtype)


def _keys(diffusion):
    keys = []
    groups = [("input", i, b) for i, b in enumerate(diffusion.input_blocks)] + [("middle", 0, diffusion.middle_block)]
    groups += [("output", i, b) for i, b in enumerate(diffusion.output_blocks)]
    for name, number, block in groups:
        for m in block.modules():
            if hasattr(m, "transformer_blocks"):
                keys += [(name, number, j) for j in range(len(m.transformer_blocks))]
    return keys


def _denoise(model, x, sigma, context, transformer_options):
    s = sigma * x.new_ones(x.shape[0])
    return model.model.apply_model(x, s, c_crossattn=context, transformer_options=transformer_options)


def _euler(x, d, sigma, sigma_next):
    return x + (sigma_next - sigma) * (x - d) / sigma if sigma_next > 0 else d


def cross_alpha(n_steps: int, length: int, default_end: float, words: dict | None = None) -> torch.Tensor:
    """``get_time_words_attention_alpha`` for one edit prompt: ``[n + 1, T]``; ``words``: {positions tuple: end}."""
    alpha = torch.zeros(n_steps + 1, length)

    def update(bounds, inds):
        start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
        alpha[:start, inds] = 0
        alpha[start:end, inds] = 1
        alpha[end:, inds] = 0

    update((0.0, default_end), list(range(length)))
    for positions, end in (words or {}).items():
        update((0.0, end), list(positions))
    return alpha


class P2PReference:
    """The null-text notebook's controller for one source and one edit prompt (batch ``[uncond_src, uncond_edit,
    cond_src, cond_edit]``; only the conditional half is controlled and stored)."""

    def __init__(self, n_steps, latent_hw, mode, mapper=None, alphas=None, equalizer=None, cross_end=0.8,
                 word_ends=None, self_end=0.4, blend=None):
        self.mode, self.mapper, self.alphas, self.equalizer = mode, mapper, alphas, equalizer
        length = mapper.shape[-1] if mapper is not None else alphas.numel()
        self.cross_alpha = cross_alpha(n_steps, length, cross_end, word_ends)
        self.num_self_replace = (0, int(n_steps * self_end))
        self.latent_tokens = latent_hw[0] * latent_hw[1]
        self.latent_hw = latent_hw
        self.blend = blend  # (alpha_layers [2, T], threshold, start_blend fraction) or None
        self.start_blend = int(blend[2] * n_steps) if blend else None
        self.counter = 0
        self.cur_step = 0
        self.step_store: dict = {}
        self.attention_store: dict = {}

    def replace_cross_attention(self, attn_base, att_replace):
        if self.mode == "replace":
            out = torch.einsum("hpw,wn->hpn", attn_base, self.mapper)
        else:
            out = attn_base[:, :, self.mapper] * self.alphas + att_replace * (1 - self.alphas)
        if self.equalizer is not None:
            out = out * self.equalizer
        return out

    def control(self, attn, is_cross, key):
        """``AttentionControlEdit.forward`` on the conditional rows ``attn`` [2, H, N, T] (source, edit), in place, and
        ``AttentionStore.forward`` (the stored tensor is the one modified in place)."""
        if is_cross:
            self.step_store.setdefault(key, []).append(attn)
            alpha_words = self.cross_alpha[self.cur_step]
            new = self.replace_cross_attention(attn[0], attn[1]) * alpha_words + (1 - alpha_words) * attn[1]
            attn[1] = new
        elif self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]:
            if attn.shape[2] <= self.latent_tokens / 16:
                attn[1] = attn[0]
        return attn

    def between_steps(self):
        for key, items in self.step_store.items():
            total = sum(items)
            self.attention_store[key] = self.attention_store.get(key, 0) + total
        self.step_store = {}

    def step_callback(self, x_t):
        """``LocalBlend.__call__`` after the step (rows: source, edit)."""
        if self.blend is None:
            return x_t
        self.counter += 1
        if self.counter <= self.start_blend:
            return x_t
        alpha_layers, threshold, _ = self.blend
        # the reference's 16x16 maps (of a 64x64 latent); a smaller latent has none: the size nearest 16x16
        sizes = {m.shape[2] for (block, _, _), m in self.attention_store.items() if block != "middle"}
        tokens = min(sorted(sizes, reverse=True), key=lambda s: abs(math.log(s / 256)))
        h = w = math.isqrt(tokens)
        maps = [m for (block, _, _), m in self.attention_store.items() if block != "middle" and m.shape[2] == tokens]
        maps = torch.cat([m.reshape(2, -1, 1, h, w, m.shape[-1]) for m in maps], dim=1)
        maps = (maps * alpha_layers[:, None, None, None, None, :]).sum(-1).mean(1)
        maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = F.interpolate(maps, size=x_t.shape[2:])
        mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        mask = mask.gt(threshold)
        mask = (mask[:1] | mask).float()
        self.last_mask = mask[1:]
        return x_t[:1] + mask * (x_t - x_t[:1])

    def patches(self, diffusion):
        def make(is_cross, key):
            def patch(q, k, v, extra):
                heads = extra["n_heads"]
                attn = _probs(q, k, heads)
                attn[2:] = self.control(attn[2:].clone(), is_cross, key)  # the conditional half: source, edit
                return _out(attn, v, heads)
            return patch

        table = {"attn1": {}, "attn2": {}}
        for key in _keys(diffusion):
            table["attn2"][key] = make(True, key)
            table["attn1"][key] = make(False, key)
        return table


def sample_p2p(model, ref: P2PReference, x_T, sigmas, null_contexts, source_context, edit_context, guidance,
               source_latents=None):
    """Both branches from the inverted latent, CFG ``guidance`` with the per-step null contexts (null-text /
    negative-prompt schedule), the controller on every attention layer, the local blend after every step. Returns
    the edit branch's latent and the source branch's (model space). ``source_latents``: the source branch forced onto
    this trajectory (before each step and after it, before the blend), where an inversion's residual would otherwise
    separate the sampled source branch from the trajectory PSEdit reads."""
    x = torch.cat([x_T, x_T])
    options = {"patches_replace": ref.patches(model.model.diffusion_model)}
    n = sigmas.numel() - 1
    for i in range(n):
        ref.cur_step = i
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if source_latents is not None:
            x = torch.cat([source_latents[i].to(x), x[1:]])
        null = null_contexts[i]
        context = torch.cat([null, null, source_context, edit_context])
        d = _denoise(model, torch.cat([x, x]), s, context, dict(options))
        d_u, d_c = d[:2], d[2:]
        x = _euler(x, d_u + guidance * (d_c - d_u), s, s_next)
        if source_latents is not None:
            x = torch.cat([source_latents[i + 1].to(x), x[1:]])
        ref.between_steps()
        x = ref.step_callback(x)
    return x[1:], x[:1]


def sample_pnp(model, trajectory, sigmas, source_context, null_context, edit_context, guidance, feature_end=0.8,
               attn_end=0.5, feature_block=4, attn_from_block=4):
    """pnp-diffusers' ``denoise_step`` loop: rows ``[source latent at t, x, x]`` with ``[source prompt, negative,
    prompt]``; residual features of output block ``feature_block``'s ResBlock and the self-attention q/k of output
    blocks ``attn_from_block``.. injected from row 0 into rows 1 and 2 in steps ``< int(f n)``."""
    n = sigmas.numel() - 1
    conv_steps, qk_steps = range(int(n * feature_end)), range(int(n * attn_end))
    diffusion = model.model.diffusion_model
    state = {"t": None}

    def qk_patch(q, k, v, extra):
        if state["t"] in qk_steps:
            b = q.shape[0] // 3
            q, k = q.clone(), k.clone()
            q[b:2 * b], q[2 * b:] = q[:b], q[:b]
            k[b:2 * b], k[2 * b:] = k[:b], k[:b]
        return _out(_probs(q, k, extra["n_heads"]), v, extra["n_heads"])

    def conv_hook(module, inputs, output):
        if state["t"] in conv_steps:
            b = output.shape[0] // 3
            output = output.clone()
            output[b:2 * b], output[2 * b:] = output[:b], output[:b]
            return output
        return None

    table = {"attn1": {key: qk_patch for key in _keys(diffusion)
                       if key[0] == "output" and key[1] >= attn_from_block}}
    handle = diffusion.output_blocks[feature_block][0].out_layers[-1].register_forward_hook(conv_hook)
    try:
        x = trajectory[0].clone()
        for i in range(n):
            state["t"] = i
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            context = torch.cat([source_context, null_context, edit_context])
            d = _denoise(model, torch.cat([trajectory[i].to(x), x, x]), s, context, {"patches_replace": table})
            x = _euler(x, d[1:2] + guidance * (d[2:3] - d[1:2]), s, s_next)
    finally:
        handle.remove()
    return x
