"""Prompt-to-Prompt and Plug-and-Play rows of the toy world's table (``benchmarks/toy_edit.py``), through the nodes.

Every row samples the inverted photo with null-text inversion's schedule, like the ``nulltext`` row, on the MODEL from
PSEdit Attention Control or PSEdit Feature Injection (their defaults: cross-attention 0-0.8, self-attention 0-0.4,
features 0-0.8, PnP self-attention 0-0.5):

- ``p2p_replace`` / ``p2p_refine``: P2P (word swap / aligned tokens) with a local blend on the swapped words, CFG
  7.5 on the edit caption (the Triple Guider with beta = gamma): the paper's "Null-text" baseline, null-text
  inversion + P2P;
- ``pnp``: Plug-and-Play as its code does it: the photo inverted with the empty prompt (its own inversion, not the
  shared one), the source pass with the empty prompt, residual-feature and self-attention injection, CFG 7.5 on the
  edit caption against the empty prompt;
- ``<row>+perceptual``: the P2P rows: the ``perceptual_x0`` row (triple guidance in 0-0.4, Perceptual Guidance x0 in
  0.2-0.8) on that MODEL, Perceptual Guidance given the local blend's MASK; ``pnp+perceptual``: the ``pnp`` row's
  CFG wrapped by Perceptual Guidance x0 in 0.2-0.8;
- ``<row>_noblend``: a P2P row without the local blend (not in the default set);
- ``<row>+perceptual_full``: ``+perceptual`` with the full gradient and the SD1.5 edit workflow's beta and strength
  (the ``perceptual_full`` row on the controlled MODEL; not in the default set).
"""

from __future__ import annotations

import torch

from psedit_cli import pipeline

from . import edits as E

CONTROL_CONFIGS = ("p2p_replace", "p2p_refine", "pnp", "p2p_replace+perceptual", "p2p_refine+perceptual",
                   "pnp+perceptual")


def swapped_words(edit: E.Edit) -> list[str]:
    """The words that differ between the source and edit captions (both sides): the local blend's words."""
    src, dst = edit.source_caption.split(), edit.edit_caption.split()
    pairs = [(a, b) for a, b in zip(src, dst, strict=False) if a != b]
    return [a for a, _ in pairs] + [b for _, b in pairs]


_EMPTY_INVERSIONS: dict = {}


def inversion_for(config: str, world, inv, s: pipeline.Settings):
    """The inversion a row samples: Plug-and-Play rows invert the photo with the empty prompt, as its code does
    (cached per photo, with no null-text schedule: PnP samples plain CFG); every other row shares ``inv``."""
    from . import run as R

    if not config.split("+")[0].startswith("pnp"):
        return inv
    key = id(inv)
    if key not in _EMPTY_INVERSIONS:
        rgb = (inv.image[0] * 255).round().to(torch.uint8).numpy()
        empty = R.invert(world, rgb, "", "", s, methods=())
        _EMPTY_INVERSIONS.clear()  # one photo at a time
        _EMPTY_INVERSIONS[key] = empty
    return _EMPTY_INVERSIONS[key]


def controlled_model(config: str, world, inv, edit: E.Edit):
    """``(MODEL, MASK or None)`` from the control node of ``config``, with its defaults (P2P: the reference's, the
    local blend on the swapped words unless ``_noblend``)."""
    n = pipeline.nodes()
    base = config.split("+")[0]
    with torch.inference_mode():
        if base == "pnp":
            return n.pnp.FeatureInjectionNode.execute(world.model, inv.payload, world.clip, "",
                                                      0.0, 0.8, 0.0, 0.5).result[0], None
        if not base.startswith("p2p_"):
            raise ValueError(f"unknown control configuration {config!r}: use one of {', '.join(CONTROL_CONFIGS)}")
        mode = base[len("p2p_"):].replace("_noblend", "")
        words = "" if base.endswith("_noblend") else ", ".join(swapped_words(edit))
        model, mask = n.p2p.AttentionControlNode.execute(world.model, inv.payload, world.clip, edit.source_caption,
                                                         edit.edit_caption, mode, 0.0, 0.8, 0.0, 0.4,
                                                         blend_words=words).result
        return model, (mask if words else None)


def guider(config: str, world, inv, edit: E.Edit, s: pipeline.Settings, target: str = "x0"):
    """The GUIDER of one control row (module docstring)."""
    import comfy.samplers

    g = pipeline.nodes().guidance
    model, mask = controlled_model(config, world, inv, edit)
    pnp = config.startswith("pnp")
    grad = gradient(config)
    p = inv.prepared(None if pnp else "null-text")
    with torch.inference_mode():
        if pnp:  # the reference's CFG: the edit caption against the empty prompt
            inner = comfy.samplers.CFGGuider(model)
            inner.set_conds(world.encode(edit.edit_caption), p.null)
            inner.set_cfg(s.gamma)
        elif "+perceptual" not in config:
            return g.TripleGuiderNode.execute(model, p.null, p.source, p.edit, s.gamma, s.gamma, None, p.schedule)[0]
        else:
            window = g.StepWindowNode.execute(*s.text_window)[0]
            inner = g.TripleGuiderNode.execute(model, p.null, p.source, p.edit, s.gamma,
                                               pipeline.beta_for(grad, s.beta), window, p.schedule)[0]
        if "+perceptual" not in config:
            return inner
        pwindow = g.StepWindowNode.execute(*s.perceptual_window)[0]
        return g.PerceptualGuidanceNode.execute(inner, world.vae, p.image, pipeline.strength_for(grad, s.strength),
                                                s.lpips_net, grad, s.decoder, "normalized", window=pwindow, mask=mask,
                                                target=target)[0]


def gradient(config: str) -> str:
    """Perceptual Guidance's gradient in a ``+perceptual`` row: ``x0`` (the Prompt-to-Prompt workflow's), or
    ``full`` with the suffix ``+perceptual_full`` (the SD1.5 edit workflow's, with its beta and strength)."""
    return "full" if config.endswith("+perceptual_full") else "x0"
