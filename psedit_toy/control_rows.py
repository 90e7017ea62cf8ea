"""Prompt-to-Prompt and Plug-and-Play rows of the toy world's table (``benchmarks/toy_edit.py``), through the nodes.

Every row samples the inverted photo with null-text inversion's schedule, like the ``nulltext`` row, on the MODEL from
PSEdit Attention Control or PSEdit Feature Injection (their defaults: cross-attention 0-0.8, self-attention 0-0.4,
features 0-0.8, PnP self-attention 0-0.5):

- ``p2p_replace`` / ``p2p_refine``: P2P (word swap / aligned tokens) with a local blend on the swapped words, CFG
  7.5 on the edit caption (the Triple Guider with beta = gamma): the paper's "Null-text" baseline, null-text
  inversion + P2P;
- ``pnp``: Plug-and-Play feature and self-attention injection, CFG 7.5 on the edit caption;
- ``<row>+perceptual``: the ``perceptual_x0`` row (triple guidance in 0-0.4, Perceptual Guidance x0 in 0.2-0.8) on
  that MODEL; the P2P rows give Perceptual Guidance the local blend's MASK;
- ``<row>_noblend``: a P2P row without the local blend (not in the default set).
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


def controlled_model(config: str, world, inv, edit: E.Edit):
    """``(MODEL, MASK or None)`` from the control node of ``config``."""
    n = pipeline.nodes().control
    base = config.split("+")[0]
    with torch.inference_mode():
        if base == "pnp":
            return n.FeatureInjectionNode.execute(world.model, inv.payload, world.clip, edit.source_caption,
                                                  0.0, 0.8, 0.0, 0.5).result[0], None
        if not base.startswith("p2p_"):
            raise ValueError(f"unknown control configuration {config!r}: use one of {', '.join(CONTROL_CONFIGS)}")
        mode = base[len("p2p_"):].replace("_noblend", "")
        words = "" if base.endswith("_noblend") else ", ".join(swapped_words(edit))
        model, mask = n.AttentionControlNode.execute(world.model, inv.payload, world.clip, edit.source_caption,
                                                     edit.edit_caption, mode, 0.0, 0.8, 0.0, 0.4,
                                                     blend_words=words).result
        return model, (mask if words else None)


def guider(config: str, world, inv, edit: E.Edit, s: pipeline.Settings, target: str = "x0"):
    """The GUIDER of one control row (module docstring)."""
    g = pipeline.nodes().guidance
    model, mask = controlled_model(config, world, inv, edit)
    p = inv.prepared("null-text")
    with torch.inference_mode():
        if "+perceptual" not in config:
            return g.TripleGuiderNode.execute(model, p.null, p.source, p.edit, s.gamma, s.gamma, None, p.schedule)[0]
        window = g.StepWindowNode.execute(*s.text_window)[0]
        triple = g.TripleGuiderNode.execute(model, p.null, p.source, p.edit, s.gamma, s.beta, window, p.schedule)[0]
        pwindow = g.StepWindowNode.execute(*s.perceptual_window)[0]
        return g.PerceptualGuidanceNode.execute(triple, world.vae, p.image, s.strength, s.lpips_net, "x0", s.decoder,
                                                "normalized", window=pwindow, mask=mask, target=target)[0]
