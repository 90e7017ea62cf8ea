"""FlowEdit rows of the toy world's table on the flow-matching twin (``benchmarks/toy_edit.py --model flow``).

FlowEdit (Kulikov et al., ICCV 2025) needs no inversion: PSEdit FlowEdit Guider integrates the difference between
the edit and source captions' velocities along noisy copies of the photo, from the photo's own latent, with the
stock SamplerCustomAdvanced (DisableNoise, euler, the same SIGMAS as the other rows). With the node's SD3 defaults
(the paper's: n_max 33 of 50 steps, n_min 0, n_avg 1, CFG 3.5 on the source and 13.5 on the edit caption, against
the empty prompt):

- ``flowedit``: the node alone;
- ``flowedit+perceptual``: wrapped by PSEdit Perceptual Guidance (x0, the workflows' strength and window), LPIPS to
  the photo on the edited branch's clean estimate;
- ``flowedit_masked_true``: the true edit region as the node's mask (outside it the velocity difference is zero, so
  the photo stays), as ``masked_true`` is for the inversion rows.

``@SOURCE,EDIT`` after a row's name sets its CFG scales (``flowedit@1,3+perceptual``): the paper's 3.5 / 13.5 are
SD3's, a model trained at scale; the toy twin over-saturates there.
"""

from __future__ import annotations

import numpy as np
import torch

from psedit_cli import pipeline

FLOW_CONFIGS = ("flowedit", "flowedit+perceptual", "flowedit_masked_true")


def is_flowedit(config: str) -> bool:
    return config.split("+")[0].startswith("flowedit")


def split_config(config: str) -> tuple[str, tuple[float, float] | None]:
    """``flowedit_masked_true@1,3+perceptual`` -> ("flowedit_masked_true", (1.0, 3.0)): a row's base name and its
    own (source, edit) CFG scales, if it names them."""
    base, _, scales = config.split("+")[0].partition("@")
    if not scales:
        return base, None
    try:
        source, edit = (float(v) for v in scales.split(","))
    except ValueError:
        raise ValueError(f"{config!r}: write the CFG scales as @SOURCE,EDIT, e.g. flowedit@1,3") from None
    return base, (source, edit)


def guider(config: str, world, inv, s: pipeline.Settings, mask: torch.Tensor | None = None, target: str = "x0"):
    """The GUIDER of one FlowEdit row (module docstring); ``mask`` is the true edit region for the masked row."""
    n = pipeline.nodes()
    base, scales = split_config(config)
    if base not in ("flowedit", "flowedit_masked_true"):
        raise ValueError(f"unknown FlowEdit configuration {config!r}: use one of {', '.join(FLOW_CONFIGS)}, "
                         "optionally with @SOURCE,EDIT CFG scales (flowedit@1,3)")
    d = n.flowedit.PAPER_DEFAULTS["SD3"]
    source_guidance, edit_guidance = scales or (d["source_guidance"], d["edit_guidance"])
    with torch.inference_mode():
        g = n.flowedit.FlowEditGuiderNode.execute(world.model, inv.null, inv.source, inv.edit, source_guidance,
                                                  edit_guidance, d["n_max"] * s.steps // d["steps"], d["n_min"],
                                                  d["n_avg"], 0, mask if base == "flowedit_masked_true" else None)[0]
        if "+perceptual" not in config:
            return g
        pg = n.guidance
        window = pg.StepWindowNode.execute(*s.perceptual_window)[0]
        return pg.PerceptualGuidanceNode.execute(g, world.vae, inv.image, pipeline.strength_for("x0", s.strength),
                                                 s.lpips_net, "x0", s.decoder, "normalized", window=window,
                                                 target=target)[0]


def sample(world, inv, g) -> np.ndarray:
    """SamplerCustomAdvanced from the photo's own latent (DisableNoise, euler, the inversion's SIGMAS), decoded."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as ncs

    from . import run as R

    with torch.inference_mode():
        latent = {"samples": world.vae.encode(inv.image)}
        out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), g, comfy.samplers.sampler_object("euler"),
                                                 inv.sigmas, latent)[0]
        return R.to_uint8(world.vae.decode(out["samples"]))
