"""The toy world's data and ground truth (psedit_toy.scenes / edits): pure numpy, always run."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from psedit_toy import edits as E
from psedit_toy import scenes as S
from psedit_toy.model import MANIFEST, WEIGHTS

pytest.importorskip("scipy")  # the region classifiers label connected components with scipy.ndimage


def test_generator_is_deterministic_and_keeps_held_out_pairs_out():
    a, b = S.training_scenes(300, seed=0), S.training_scenes(300, seed=0)
    assert a == b and S.dataset_digest(a) == S.dataset_digest(b)
    assert S.training_scenes(300, seed=1) != a
    pairs = {(o.colour, o.shape) for s in S.training_scenes(3000, seed=0) for o in s.objects}
    assert not pairs & S.HELD_OUT_PAIRS
    assert len(pairs) == len(S.OBJECT_COLOURS) * len(S.SHAPES) - len(S.HELD_OUT_PAIRS)  # every other pair occurs
    textures = {s.texture for s in a}
    assert textures == set(S.TEXTURES) and {s.background for s in a} == set(S.BACKGROUND_COLOURS)
    assert 0.15 < np.mean([len(s.objects) == 2 for s in a]) < 0.35


def test_captions_and_masks():
    s = S.Scene("gray", "striped", (S.Obj("red", "circle", 40, 40, 20), S.Obj("blue", "star", 90, 90, 20)), 1)
    assert S.caption(s) == "a red circle and a blue star on a gray striped background"
    img, masks = S.render(s)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8 and len(masks) == 2
    assert masks[0].sum() == pytest.approx(np.pi * 20**2, rel=0.03)  # the circle's area
    assert np.all(img[masks[0]].mean(0) == pytest.approx(S.OBJECT_COLOURS["red"], abs=3))


def test_classifiers_read_back_every_attribute_of_rendered_scenes():
    rng = np.random.default_rng(5)
    for _ in range(60):
        s = S.random_scene(rng, two_objects=0.0)
        img, masks = S.render(s)
        assert S.classify_object(img) == (s.objects[0].colour, s.objects[0].shape), s
        assert S.classify_background(img, keep_out=masks[0]) == s.background, s


def test_edits_change_one_attribute_and_know_their_region():
    for e in E.make_edits(0, 24):
        src, tgt = e.source.objects[0], e.target.objects[0]
        changed = [k for k in ("colour", "shape") if getattr(src, k) != getattr(tgt, k)]
        changed += ["background"] if e.source.background != e.target.background else []
        assert changed == [e.attribute], e
        if e.kind == "unseen":
            assert (tgt.colour, tgt.shape) in S.HELD_OUT_PAIRS
        else:
            assert (tgt.colour, tgt.shape) not in S.HELD_OUT_PAIRS
        source_img, target_img = S.render(e.source)[0], S.render(e.target)[0]
        assert E.succeeded(e, target_img) and not E.succeeded(e, source_img), e
        # outside the region the right answer is the source (up to anti-aliased edge pixels; measured >= 27.6 dB)
        assert E.psnr(target_img, source_img, ~e.region()) > 25
        assert E.psnr(target_img, source_img, e.region()) < 20
    assert [e.kind for e in E.make_edits(0, 8)] == list(E.KINDS) * 2


def test_committed_weights_match_their_manifest():
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: it is committed with the project")
    manifest = json.loads(MANIFEST.read_text())
    assert manifest["sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert WEIGHTS.stat().st_size == manifest["bytes"] < 40e6
    assert manifest["data_sha256"] == S.dataset_digest(S.training_scenes(manifest["scenes"], manifest["seed"]))
