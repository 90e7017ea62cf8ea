"""Edits with known answers on held-out toy scenes, and their success test. Pure numpy.

Four kinds, each changing one attribute of a single-object scene and keeping the geometry, so the edited scene
rendered with the same geometry is the exact right answer and the edit region is known:

- ``colour``: the object's colour (toward a colour x shape pair seen in training);
- ``shape``: the object's shape (same centre and size; the region is the union of both outlines);
- ``background``: the background colour (texture kept; the region is everything but the object);
- ``unseen``: colour or shape, toward a pair held out of training (:data:`scenes.HELD_OUT_PAIRS`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import scenes as S

KINDS = ("colour", "shape", "background", "unseen")


@dataclasses.dataclass(frozen=True)
class Edit:
    kind: str
    source: S.Scene
    target: S.Scene

    @property
    def source_caption(self) -> str:
        return S.caption(self.source)

    @property
    def edit_caption(self) -> str:
        return S.caption(self.target)

    @property
    def attribute(self) -> str:
        """What the success test checks: 'colour', 'shape' or 'background'."""
        if self.kind != "unseen":
            return self.kind
        return "colour" if self.source.objects[0].colour != self.target.objects[0].colour else "shape"

    @property
    def wanted(self) -> str:
        o = self.target.objects[0]
        return {"colour": o.colour, "shape": o.shape, "background": self.target.background}[self.attribute]

    def region(self) -> np.ndarray:
        """Ground-truth edit region [H, W] bool: where the right answer differs from the source, by construction."""
        src = S.render(self.source)[1][0]
        if self.attribute == "background":
            return ~src
        if self.attribute == "shape":
            return src | S.render(self.target)[1][0]
        return src


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=px) if px > 0 else mask


def succeeded(edit: Edit, image: np.ndarray) -> bool:
    """Whether ``image`` (uint8 [H, W, 3]) shows the edit's target attribute where the edit should act."""
    near = dilate(edit.region() if edit.attribute != "background" else S.render(edit.source)[1][0], 6)
    if edit.attribute == "background":
        return S.classify_background(image, keep_out=near) == edit.wanted
    colour, shape = S.classify_object(image, region=near)
    return (colour if edit.attribute == "colour" else shape) == edit.wanted


def _held_in(colour: str, shape: str) -> bool:
    return (colour, shape) not in S.HELD_OUT_PAIRS


def make_edit(rng: np.random.Generator, kind: str) -> Edit:
    colours, shapes, bgs = list(S.OBJECT_COLOURS), list(S.SHAPES), list(S.BACKGROUND_COLOURS)
    while True:
        src = S.random_scene(rng, two_objects=0.0)
        o = src.objects[0]
        if kind == "colour":
            options = [c for c in colours if c != o.colour and _held_in(c, o.shape)]
            return Edit(kind, src, src.replace_object(colour=options[rng.integers(len(options))]))
        if kind == "shape":
            options = [s for s in shapes if s != o.shape and _held_in(o.colour, s)]
            return Edit(kind, src, src.replace_object(shape=options[rng.integers(len(options))]))
        if kind == "background":
            options = [b for b in bgs if b != src.background]
            return Edit(kind, src, dataclasses.replace(src, background=options[rng.integers(len(options))]))
        if kind == "unseen":
            options = [("colour", c) for c, s in S.HELD_OUT_PAIRS if s == o.shape and c != o.colour]
            options += [("shape", s) for c, s in S.HELD_OUT_PAIRS if c == o.colour and s != o.shape]
            if not options:
                continue  # this scene's colour and shape are in no held-out pair: draw another
            what, value = options[rng.integers(len(options))]
            return Edit(kind, src, src.replace_object(**{what: value}))
        raise ValueError(f"unknown edit kind {kind!r}; known: {KINDS}")


def make_edits(seed: int, n: int, kinds: tuple[str, ...] = KINDS) -> list[Edit]:
    """``n`` edits on held-out scenes (drawn from a stream the training set never uses), kinds in turn."""
    rng = np.random.default_rng([seed, 0xED17])
    return [make_edit(rng, kinds[i % len(kinds)]) for i in range(n)]


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8/[0, 255] images, over ``region`` (bool [H, W]) when given."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = d[region].mean() if region is not None else d.mean()
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0
