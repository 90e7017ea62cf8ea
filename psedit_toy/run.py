"""Edits in the toy world through PSEdit's node classes and the stock SamplerCustomAdvanced (needs ComfyUI).

Shared by ``benchmarks/toy_edit.py``, ``benchmarks/toy_quality.py`` and the host tests on the trained model. The
graph is the example workflow's: VAE Encode -> DDIM Invert -> Null-Text Inversion -> Triple Guider (window) ->
Perceptual Guidance (window, optional mask) -> SamplerCustomAdvanced (DisableNoise, euler, the inversion's SIGMAS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch

from psedit_cli import pipeline

from . import edits as E
from . import model as M

# the rows of the paper's table on the toy world (benchmarks/toy_edit.py), in order
CONFIGS = ("ddim_cfg", "nulltext", "textopt", "perceptual_x0", "perceptual_full", "masked_estimated", "masked_true",
           "negprompt")


@dataclasses.dataclass
class World:
    model: object  # MODEL
    clip: object  # CLIP
    vae: object  # VAE (TAESD)

    def encode(self, text: str):
        """CONDITIONING, as the stock CLIPTextEncode node makes it."""
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

    @property
    def models(self) -> pipeline.Models:
        return pipeline.Models(self.model, self.vae, self.encode)


def load_world(comfyui: str | None = None, weights=None, family: str = "eps", **kw) -> World:
    """ComfyUI (from ``comfyui`` or COMFYUI_PATH) with the pack loaded, and the trained toy model: the eps model
    (``family="eps"``) or its flow-matching twin (``"flow"``, :mod:`psedit_toy.flow_model`); ``weights`` defaults
    to the family's committed file. ``model.load`` reads the family from the file's manifest either way."""
    from . import flow_model as F

    if family not in ("eps", "flow"):
        raise ValueError(f"family must be 'eps' or 'flow', got {family!r}")
    pipeline.setup_comfy(comfyui)
    if family == "flow":
        return World(*F.load(weights or F.WEIGHTS, **kw))
    return World(*M.load(weights or M.WEIGHTS, **kw))


def to_image(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> ComfyUI IMAGE [1, H, W, 3] in [0, 1]."""
    return torch.from_numpy(rgb).float()[None] / 255


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0, ..., :3].clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8)


@dataclasses.dataclass
class Inverted:
    """One source photo, inverted once and shared by every configuration."""

    image: torch.Tensor  # IMAGE
    sigmas: torch.Tensor
    inverted: dict  # LATENT
    payload: object  # PSEDIT_INVERSION
    null: list
    source: list
    edit: list
    schedules: dict  # "null-text" / "negative-prompt" -> NULL_SCHEDULE
    seconds: dict  # "invert", "null-text", "negative-prompt"
    evals: dict = dataclasses.field(default_factory=dict)  # the same phases' network evaluations (batch elements)

    def prepared(self, method: str | None) -> pipeline.Prepared:
        if method and method not in self.schedules:
            raise KeyError(f"no {method} schedule: invert with methods=(..., {method!r})")
        return pipeline.Prepared(self.image, self.sigmas, self.inverted, self.null, self.source, self.edit,
                                 self.schedules[method] if method else None)


def invert(world: World, rgb: np.ndarray, source: str, edit: str, s: pipeline.Settings,
           methods: tuple[str, ...] = ("null-text", "negative-prompt")) -> Inverted:
    import comfy_extras.nodes_custom_sampler as ncs

    n = pipeline.nodes()
    image = to_image(rgb)
    seconds, evals = {}, {}
    with torch.inference_mode(), count_evals(world) as counter:
        null, src, edt = world.encode(""), world.encode(source), world.encode(edit)
        t = time.perf_counter()
        latent = {"samples": world.vae.encode(image)}
        sigmas = ncs.BasicScheduler().get_sigmas(world.model, s.scheduler, s.steps, 1.0)[0]
        inverted, payload = n.inversion.DDIMInvert.execute(world.model, latent, sigmas, src, 1.0, s.refine)
        seconds["invert"], evals["invert"] = time.perf_counter() - t, counter.take()
        schedules = {}
        for method in methods:
            t = time.perf_counter()
            schedules[method] = null_schedule(world, payload, null, src, s, method)
            seconds[method], evals[method] = time.perf_counter() - t, counter.take()
    return Inverted(image, sigmas, inverted, payload, null, src, edt, schedules, seconds, evals)


def null_schedule(world: World, payload, null: list, source: list, s: pipeline.Settings, method: str):
    """PSEdit Null-Text Inversion's schedule (``method`` null-text or negative-prompt) for an inversion's payload,
    with ``s.inner_iterations`` and the node's early stop (1e-5) and learning rate (0.01)."""
    with torch.inference_mode():
        return pipeline.nodes().nulltext.NullTextInversion.execute(
            world.model, payload, null, source, s.gamma, method, s.inner_iterations, 1e-5, 0.01)[0]


def with_null_text(world: World, inv: Inverted, s: pipeline.Settings) -> Inverted:
    """``inv`` with its null-text schedule recomputed for ``s`` (e.g. other ``inner_iterations``), the DDIM
    inversion shared."""
    return dataclasses.replace(inv, schedules={**inv.schedules, "null-text": null_schedule(
        world, inv.payload, inv.null, inv.source, s, "null-text")})


class EvalCounter:
    """Network evaluations (batch elements through the diffusion model) since the last :meth:`take`."""

    def __init__(self):
        self.n = 0

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


@contextlib.contextmanager
def count_evals(world: World):
    """Count the diffusion model's evaluations (a forward pre-hook: what a row costs in model calls, whatever
    batches the sampler forms)."""
    counter = EvalCounter()

    def hook(module, args):  # noqa: ARG001 (hook signature)
        counter.n += int(args[0].shape[0]) if args else 0

    handle = world.model.model.diffusion_model.register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def edit_mask(world: World, inv: Inverted, probe_end=0.5, blur=1.0, threshold=0.5) -> torch.Tensor:
    """PSEdit Edit Mask's estimate, MASK [1, H, W] (1 = edit region)."""
    with torch.inference_mode():
        return pipeline.nodes().masks.EditMask.execute(world.model, inv.payload, inv.source, inv.edit, probe_end,
                                                        blur, threshold, False)[0]


def guider(config: str, world: World, inv: Inverted, s: pipeline.Settings, mask: torch.Tensor | None = None,
           gradient: str = "x0", target: str = "x0"):
    """The GUIDER of one row of the table, built by the nodes. ``mask`` feeds the masked rows; ``target`` is
    Perceptual Guidance's (noise or x0)."""
    n = pipeline.nodes().guidance
    if config == "ddim_cfg":
        return pipeline.guider_for("nulltext", world.models, inv.prepared(None), s)
    if config == "nulltext":
        return pipeline.guider_for("nulltext", world.models, inv.prepared("null-text"), s)
    method = "negative-prompt" if config == "negprompt" else "null-text"
    p = inv.prepared(method)
    if config == "perceptual_full":
        gradient = "full"
    elif config not in ("textopt", "perceptual_x0", "masked_estimated", "masked_true", "negprompt"):
        raise ValueError(f"unknown configuration {config!r}: use one of {', '.join(CONFIGS)}")
    window = n.StepWindowNode.execute(*s.text_window)[0]
    beta = pipeline.beta_for(gradient, s.beta)  # the workflows' with this row's gradient (textopt: x0's, the paper's)
    g = n.TripleGuiderNode.execute(world.model, p.null, p.source, p.edit, s.gamma, beta, window, p.schedule)[0]
    strength = pipeline.strength_for(gradient, s.strength)
    if config == "textopt" or strength == 0:
        return g
    pwindow = n.StepWindowNode.execute(*s.perceptual_window)[0]
    return n.PerceptualGuidanceNode.execute(g, world.vae, p.image, strength, s.lpips_net, gradient, s.decoder,
                                            "normalized", window=pwindow,
                                            mask=mask if config.startswith("masked") else None,
                                            target=target)[0]


def sample(world: World, inv: Inverted, g) -> np.ndarray:
    """SamplerCustomAdvanced from the inverted latent (euler, the same SIGMAS), decoded: uint8. The handover is the
    workflows': DisableNoise on eps models, PSEdit Inverted Noise on flow models (the flow twin), where a flow
    sampler's first step would otherwise mix the latent with zero noise."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs

    with torch.inference_mode():
        if pipeline.nodes()._comfy.is_flow(world.model):
            noise = pipeline.nodes().inversion.InvertedNoiseNode.execute(inv.payload)[0]
        else:
            noise = ncs.Noise_EmptyNoise()
        out = ncs.SamplerCustomAdvanced().sample(noise, g, comfy.samplers.sampler_object("euler"),
                                                 inv.sigmas, inv.inverted)[0]
        return to_uint8(world.vae.decode(out["samples"]))


def generate(world: World, caption: str, seed: int, steps: int = 50, cfg: float = 7.5) -> np.ndarray:
    """Text-to-image from noise with the stock CFGGuider and euler: the model's own quality."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs

    with torch.inference_mode():
        g = comfy.samplers.CFGGuider(world.model)
        g.set_conds(world.encode(caption), world.encode(""))
        g.set_cfg(cfg)
        sigmas = ncs.BasicScheduler().get_sigmas(world.model, "normal", steps, 1.0)[0]
        latent = {"samples": torch.zeros(1, 4, 16, 16)}
        out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_RandomNoise(seed), g,
                                                 comfy.samplers.sampler_object("euler"), sigmas, latent)[0]
        return to_uint8(world.vae.decode(out["samples"]))


class Metrics:
    """Edit metrics against the source photo and the ground truth (LPIPS: AlexNet, the recommended metric)."""

    def __init__(self, lpips_dirs=()):
        from psedit_core.lpips_loader import get_lpips

        self.net = get_lpips("alex", search_dirs=lpips_dirs, spatial=True)

    def lpips_map(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        def t(x):
            return torch.from_numpy(x).float().permute(2, 0, 1)[None] / 127.5 - 1

        with torch.inference_mode(False), torch.no_grad():
            return self.net(t(a), t(b))[0, 0].numpy()

    def row(self, edit: E.Edit, source: np.ndarray, result: np.ndarray) -> dict:
        outside = ~edit.region()
        lp = self.lpips_map(result, source)
        j = E.judge(edit, result)
        return {"edit_success": float(j.success), "attribute_reached": float(j.attribute_reached),
                "object_iou": j.iou,
                "bg_psnr": E.psnr(result, source, outside), "bg_lpips": float(lp[outside].mean()),
                "psnr": E.psnr(result, source), "lpips": float(lp.mean())}
