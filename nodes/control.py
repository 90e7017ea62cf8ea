"""What PSEdit Attention Control (Prompt-to-Prompt, :mod:`.p2p`) and PSEdit Feature Injection (Plug-and-Play,
:mod:`.pnp`) share: the *source pass* on the inversion trajectory and the patch points that carry its records into the
edit branches, on a clone of the MODEL, so the output is a MODEL any guider samples.

- attention *replace* patches (``attn1`` / ``attn2``) on every transformer layer the algorithm touches, keyed
  ``(block, number, index)`` (SDXL's 10-deep transformers included); each calls the patch it shadows (e.g.
  Self-Attention Guidance's) whenever the algorithm does not act;
- an OUTER_SAMPLE wrapper (once per sampling: input checks, the source caption's conditioning added to the guider's
  conds so ComfyUI prepares it like any other, the algorithm's per-sampling state, everything freed at the end);
- a PREDICT_NOISE wrapper (once per model evaluation: the source pass -- the model on the trajectory's latent at this
  noise level with the source caption, under ``no_grad`` -- then the guider, then the algorithm's ``after``);
- with an algorithm that needs them (P2P), an APPLY_MODEL wrapper that finds which branches of a batched UNet call
  carry the edit caption, by their text tensors, whatever order a guider batches them in.

An algorithm object (``P2P``, ``PnP``) says which layers it patches, what the source pass records, what an edit
branch does with it, and what happens to the prediction. Records live for one model evaluation (one step), in the
model's dtype.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import torch

from ..psedit_core.attention import replace_chunks, trajectory_point
from ..psedit_core.schedule import step_index
from . import _comfy

log = logging.getLogger(__name__)

SOURCE_PASS = "psedit_control_source_pass"  # transformer_options key: the controller token of a source pass
ROLES = "psedit_control_roles"  # ... per-branch roles of an edit pass
UNCOND = 1  # ComfyUI's cond_or_uncond value of the unconditional branch


# --- what the model offers ----------------------------------------------------------------------------------------

def unet(model):
    """The UNet of a MODEL, or an error naming the families whose attention PSEdit can control."""
    diffusion = model.model.diffusion_model
    if not hasattr(diffusion, "output_blocks"):
        raise ValueError(
            f"PSEdit attention and feature control patch a UNet's attention layers; this {_comfy.model_family(model)} "
            "model has none: use an SD1.x, SD2.x or SDXL checkpoint"
        )
    return diffusion


def transformer_layers(model) -> list[tuple[str, int, int]]:
    """Every transformer layer's ``(block, number, index)`` key, as ComfyUI's replace patches name them."""
    diffusion = unet(model)
    groups = [("input", i, b) for i, b in enumerate(diffusion.input_blocks)] + [("middle", 0, diffusion.middle_block)]
    groups += [("output", i, b) for i, b in enumerate(diffusion.output_blocks)]
    keys = []
    for name, number, block in groups:
        for m in block.modules():
            if hasattr(m, "transformer_blocks"):
                keys += [(name, number, j) for j in range(len(m.transformer_blocks))]
    return keys


def check_inversion(model, payload, node: str) -> None:
    if payload is None or not hasattr(payload, "inversion"):
        raise ValueError(f"{node}: connect the inversion output of PSEdit DDIM Invert")
    if payload.family != _comfy.model_family(model):
        raise ValueError(
            f"the inversion was made with a {payload.family} model but this MODEL is {_comfy.model_family(model)}: "
            f"connect the same MODEL to DDIM Invert and {node}"
        )


# --- one sampling -------------------------------------------------------------------------------------------------

@dataclass
class Step:
    """One model evaluation: its step of the ``n`` sampled, and what acts there (``needs_source``: a source pass is
    run; ``acts``: the algorithm's flags)."""

    index: int
    n: int
    sigma: float
    needs_source: bool
    acts: dict = field(default_factory=dict)


@dataclass
class Run:
    """One sampling's state: the source pass's records (one step at a time), device copies, the algorithm's own
    state (``state``) and what was already logged."""

    records: dict = field(default_factory=dict)
    sigma: float | None = None
    step: Step | None = None
    trajectory: tuple | None = None
    conds: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)


class Controller:
    """Runs the source pass an algorithm asks for and hands its records to the algorithm in the edit branches (module
    docstring). Shared by every clone of the patched MODEL: ComfyUI deep-copies model options when it clones a
    patcher, and the patches must keep pointing at this one object, so a deep copy returns it."""

    def __init__(self, algorithm, payload, source_cond, dtype=torch.float32, name="PSEdit control"):
        self.algorithm, self.payload, self.source_cond = algorithm, payload, source_cond
        self.name, self.dtype = name, dtype
        self.token = uuid.uuid4().hex[:12]
        self.source_key = f"psedit_control_source_{self.token}"
        self.run: Run | None = None
        self.warned: set = set()

    def __deepcopy__(self, memo):
        return self

    # ---- installing ----

    def install(self, model):
        """A clone of ``model`` carrying this controller's patches and wrappers."""
        m = model.clone()
        replace = m.model_options.get("transformer_options", {}).get("patches_replace", {})
        for key in transformer_layers(m):
            for kind in self.algorithm.kinds:
                table = replace.get(kind, {})
                prev = table.get(key) or table.get(key[:2])
                m.set_model_patch_replace(self._attention_patch(kind, prev), kind, *key)
        self.algorithm.install(self, m)
        key = f"psedit_control_{self.token}"
        _comfy.add_wrapper(m, "OUTER_SAMPLE", key, self._outer_sample)
        _comfy.add_wrapper(m, "PREDICT_NOISE", key, self._predict_noise)
        if self.algorithm.uses_roles:
            _comfy.add_wrapper(m, "APPLY_MODEL", key, self._apply_model)
        return m

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
        self.algorithm.check_conds(self, conds)
        conds[self.source_key] = _comfy.prepared_cond(self.source_cond)
        self.run = Run()
        self.algorithm.begin(self)
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            conds.pop(self.source_key, None)
            self.run = None

    def _check_sampling(self, latent_image, sigmas) -> None:
        inv = self.payload.inversion
        want = tuple(inv.latents[0].shape)
        got = tuple(latent_image.shape)
        if got[1:] != want[1:] or got[0] != want[0]:
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

    def trajectory(self, device):
        """The inversion's latents on ``device`` (float32) and its sigmas, copied once per sampling."""
        run = self.run
        if run.trajectory is None or run.trajectory[0][0].device != device:
            inv = self.payload.inversion
            latents = tuple(t.detach().to(device, torch.float32) for t in inv.latents)
            run.trajectory = (latents, inv.sigmas.detach().cpu())
        return run.trajectory

    def source_latent(self, sigma: float, device) -> torch.Tensor:
        """The trajectory's latent ``x*(sigma)``."""
        latents, sigmas = self.trajectory(device)
        return trajectory_point(latents, sigmas, sigma)[0]

    def _predict_noise(self, executor, x, timestep, model_options, seed, *args, **kwargs):
        guider = executor.class_obj
        run = self.run
        sigmas = _comfy.sample_sigmas(model_options)
        if run is None or sigmas is None or self.source_key not in getattr(guider, "conds", {}):
            return executor(x, timestep, model_options, seed, *args, **kwargs)
        _comfy.throw_if_interrupted()
        index = step_index(sigmas, timestep)
        n = sigmas.numel() - 1
        step = self.algorithm.step(self, index, n, float(timestep.reshape(-1)[0]))
        if step.needs_source:
            self._source_pass(guider, x, timestep, step, model_options)
        run.step = step
        try:
            out = executor(x, timestep, model_options, seed, *args, **kwargs)
        finally:
            run.step = None
        next_sigma = float(sigmas[min(index + 1, n)])
        return self.algorithm.after(self, out, x, step, next_sigma)

    def _source_pass(self, guider, x, timestep, step: Step, model_options) -> None:
        run = self.run
        if run.sigma == step.sigma and run.records:
            return  # this step's source pass is recorded (e.g. Perceptual Guidance evaluating the guider again)
        run.records, run.sigma = {}, None
        self.algorithm.begin_step(self, step)
        x_src = self.source_latent(step.sigma, x.device)
        options = _comfy.clone_options(model_options)
        options.setdefault("transformer_options", {})[SOURCE_PASS] = self.token
        run.step = step
        try:
            with torch.no_grad():
                _comfy.calc_cond_batch(guider.inner_model, [guider.conds[self.source_key]], x_src.to(x.dtype),
                                       timestep, options)
        finally:
            run.step = None
        run.sigma = step.sigma

    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                     *args, **kwargs):
        transformer_options = transformer_options or {}
        run = self.run
        if run is None or run.step is None or transformer_options.get(SOURCE_PASS) or c_crossattn is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, *args, **kwargs)
        roles = self.algorithm.roles(self, c_crossattn, transformer_options.get("cond_or_uncond", []))
        options = {**transformer_options, ROLES: (self.token, roles)}
        return executor(x, t, c_concat, c_crossattn, control, options, *args, **kwargs)

    # ---- attention layers ----

    def attention(self, kind, prev, q, k, v, extra):
        def default():
            if prev is not None:
                return prev(q, k, v, extra)
            return _comfy.attention(q, k, v, extra["n_heads"], extra)

        run = self.run
        if run is None or run.step is None:
            return default()
        layer = (extra["block"][0], extra["block"][1], extra.get("block_index", 0))
        source_pass = extra.get(SOURCE_PASS)
        if source_pass is not None:
            if source_pass != self.token:
                return default()
            out = self.algorithm.record(self, kind, layer, q, k, v, extra["n_heads"], extra)
            return default() if out is None else out
        return self.algorithm.edit(self, kind, layer, q, k, v, extra["n_heads"], extra, prev, default)

    # ---- helpers for the algorithms ----

    def usable(self, key):
        """A record, as an ordinary tensor when autograd will save it (Perceptual Guidance 'full' evaluates the
        edit branch outside inference mode; the source pass may have run inside it)."""
        records = self.run.records
        t = records.get(key)
        if t is None:
            raise RuntimeError(f"{self.name}: nothing was recorded for {key[1:]} in the source pass")
        if t.is_inference() and not torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                t = records[key] = t.clone()
        return t

    def source_self_attention(self, layer, q, k, v, heads, extra, flags, default):
        """Self-attention with the source pass's queries and keys in the branches ``flags`` marks (psedit_core
        attention eq. (S)), the branch's own values; the layer's own attention, logged once, where the sampled latent
        is not the inverted photo's (another size or batch)."""
        q_src, k_src = self.usable(("q", layer)), self.usable(("k", layer))
        _, b = branches(q, extra)
        if q_src.shape[0] != b or q_src.shape[1:] != q.shape[1:]:
            self.warn_once("self-shape", "%s: self-attention not taken from the photo: the sampled latent (batch %d, "
                           "%d positions) is not the inverted photo's (batch %d, %d positions); sample the LATENT "
                           "DDIM Invert returns", self.name, b, q.shape[1], q_src.shape[0], q_src.shape[1])
            return default()
        q2, k2 = replace_chunks(q, q_src, flags), replace_chunks(k, k_src, flags)
        return _comfy.attention(q2, k2, v, heads, {"attn_precision": extra.get("attn_precision")})

    def warn_once(self, key: str, message: str, *args) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(message, *args)


def branches(q: torch.Tensor, extra: dict) -> tuple[int, int]:
    """``(branches, images per branch)`` of a batched attention call (ComfyUI's ``cond_or_uncond``)."""
    n = max(len(extra.get("cond_or_uncond", [])), 1)
    return n, q.shape[0] // n


def window_label(label: str, start: float, end: float) -> tuple[float, float]:
    """``(start, end)`` of a node's window inputs, or an error naming them."""
    start, end = float(start), float(end)
    if not (0.0 <= start <= end <= 1.0):
        raise ValueError(f"{label}: window start={start:g}, end={end:g} is invalid: use 0 <= start <= end <= 1 "
                         "(fractions of the steps; start = end switches the control off)")
    return start, end
