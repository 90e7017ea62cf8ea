"""The toy world's data and ground truth (psedit_toy.scenes / edits): pure numpy, always run."""

from __future__ import annotations

import dataclasses
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


def test_v2_world_draws_larger_objects_that_the_classifiers_read():
    rng = np.random.default_rng(7)
    for _ in range(40):
        s = S.random_scene(rng, two_objects=0.0, version="toy-scenes-v2")
        o = s.objects[0]
        assert 22 <= o.r <= 36, s
        assert S.classify_object(S.render(s)[0]) == (o.colour, o.shape), s
    scenes = S.training_scenes(300, 0, "toy-scenes-v2")
    assert all(16 <= o.r <= 26 for s in scenes if len(s.objects) == 2 for o in s.objects)
    assert 0.15 < np.mean([len(s.objects) == 2 for s in scenes]) < 0.35
    v1 = S.training_scenes(50, 0, "toy-scenes-v1")
    assert S.dataset_digest(v1, "toy-scenes-v1") != S.dataset_digest(v1, "toy-scenes-v2")


def test_the_default_world_is_the_committed_models(tmp_path):
    assert S.DATA_VERSION == S.committed_version() == json.loads(MANIFEST.read_text())["data_version"]
    assert S.committed_version(tmp_path / "missing.json") == "toy-scenes-v1"
    (tmp_path / "manifest.json").write_text(json.dumps({"data_version": "toy-scenes-v2"}))
    assert S.committed_version(tmp_path / "manifest.json") == "toy-scenes-v2"


def _paint(img: np.ndarray, mask: np.ndarray, rgb) -> np.ndarray:
    out = img.copy()
    out[mask] = rgb
    return out


def test_success_means_the_asked_attribute_and_nothing_else():
    edits = E.make_edits(3, 16)
    for e in edits:
        j = E.judge(e, S.render(e.target)[0])
        assert j.success and j.attribute_reached and j.others_kept and j.iou > 0.85, (e, j)  # edges: >= 0.90
        assert not E.judge(e, S.render(e.source)[0]).success, e
    colour = next(e for e in edits if e.kind == "colour")
    o = colour.target.objects[0]
    # the asked colour, but the object moved away: no success (the old test, reading near the source, fails it too)
    moved = dataclasses.replace(colour.target, objects=(dataclasses.replace(o, cx=S.SIZE - o.cx, cy=S.SIZE - o.cy),))
    j = E.judge(colour, S.render(moved)[0])
    assert not j.success and (j.iou < E.IOU_THRESHOLD or np.hypot(2 * o.cx - S.SIZE, 2 * o.cy - S.SIZE) < 8), j
    # the asked colour on a blob twice the size (the 'large red blob'): the attribute is reached, the edit is not
    j = E.judge(colour, S.render(colour.target.replace_object(r=o.r * 2))[0])
    assert j.attribute_reached and j.iou < 0.4 and not j.success, j
    # the asked colour on a changed background (the 'yellow blob on gray' failure): not a success
    other_bg = next(b for b in S.BACKGROUND_COLOURS if b != colour.target.background)
    j = E.judge(colour, S.render(dataclasses.replace(colour.target, background=other_bg))[0])
    assert j.attribute_reached and not j.others_kept and not j.success, j
    # the asked colour, another shape: not a success
    other_shape = next(s for s in S.SHAPES if s != o.shape)
    j = E.judge(colour, S.render(colour.target.replace_object(shape=other_shape))[0])
    assert j.attribute_reached and not j.others_kept and not j.success, j
    # shrunk to half its size: the place-and-size test fails it
    j = E.judge(colour, S.render(colour.target.replace_object(r=o.r * 0.5))[0])
    assert j.iou < 0.5 and not j.success, j


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_edits():
    from psedit_toy import stats

    rng = np.random.default_rng(0)
    small, large = rng.random(8) < 0.5, rng.random(128) < 0.5
    lo8, hi8 = stats.bootstrap_ci(small)
    lo128, hi128 = stats.bootstrap_ci(large)
    assert lo8 <= small.mean() <= hi8 and lo128 <= large.mean() <= hi128
    assert hi128 - lo128 < 0.6 * (hi8 - lo8)
    # a success rate of 16/32 has a 95% interval about +-0.17 wide (binomial: 1.96 * sqrt(0.25 / 32) = 0.173)
    lo, hi = stats.bootstrap_ci([1.0] * 16 + [0.0] * 16)
    assert 0.30 <= lo <= 0.35 and 0.65 <= hi <= 0.70, (lo, hi)  # steps of 1/32
    assert stats.bootstrap_ci([3.0]) == (3.0, 3.0)
    s = stats.summarise([{"a": 1.0, "b": None}, {"a": 0.0, "b": 2.0}], ["a", "b"])
    assert s["a"] == 0.5 and s["b"] == s["b_lo"] == s["b_hi"] == 2.0
    assert stats.summarise([{"a": None}], ["a"]) == {"a": None, "a_lo": None, "a_hi": None}
