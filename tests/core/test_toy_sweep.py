"""benchmarks/toy_edit.py's sweep: each setting moves one knob from the defaults, and its per-edit rows pair up
in benchmarks/toy_paired.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def toy_edit():
    sys.path.insert(0, str(BENCH))
    try:
        import toy_edit
        import toy_paired

        yield toy_edit, toy_paired
    finally:
        sys.path.remove(str(BENCH))


def test_each_sweep_setting_moves_one_knob(toy_edit):
    te, _ = toy_edit
    from psedit_cli.pipeline import Settings, beta_for, strength_for

    s = Settings(lpips_net="squeeze")
    a = argparse.Namespace(sweep_knobs=["beta", "text_window", "full_strength", "nulltext_iterations",
                                         "full_beta", "flowedit_cfg"], perceptual_target="x0")
    variants = te.sweep_variants(a, s)
    by = {}
    for family, value, config, sv, _ in variants:
        by.setdefault(family, []).append(value)
        gradient = "full" if config == "perceptual_full" else "x0"  # the row's, which sets its default beta
        moved = {f for f in ("text_window", "inner_iterations") if getattr(sv, f) != getattr(s, f)}
        moved |= {"beta"} if beta_for(gradient, sv.beta) != beta_for(gradient, s.beta) else set()
        moved |= {"strength"} if strength_for("full", sv.strength) != strength_for("full", s.strength) else set()
        knob, default = {"beta": ("beta", beta_for("x0", s.beta)),
                         "full strength": ("strength", strength_for("full", s.strength)),
                         "text window end": ("text_window", s.text_window[1]),
                         "null-text iterations": ("inner_iterations", s.inner_iterations),
                         "beta, full gradient": ("beta", beta_for("full", s.beta)),
                         "flowedit edit CFG": (None, None)}[family]
        assert moved == (set() if knob is None or value == default else {knob}), (family, value, moved)
        if family in ("full strength", "beta, full gradient"):
            assert config == "perceptual_full" and (sv.strength if family == "full strength" else sv.beta) == value
        if family == "text window end":
            assert config == "textopt" and sv.text_window == (0.0, value)
        if family == "flowedit edit CFG":
            src, edit = map(float, config.removeprefix("flowedit@").split(","))
            assert edit == value and src == pytest.approx(value * 3.5 / 13.5, abs=1e-3)
    assert by == {"beta": list(te.BETAS), "text window end": list(te.TEXT_WINDOW_ENDS),
                  "full strength": list(te.STRENGTHS), "null-text iterations": list(te.NULLTEXT_ITERATIONS),
                  "beta, full gradient": list(te.FULL_BETAS),
                  "flowedit edit CFG": list(te.FLOWEDIT_EDIT_CFGS)}
    # the workflow defaults are among each knob's settings, so every sweep has its baseline row
    assert beta_for("x0", s.beta) in te.BETAS and beta_for("full", s.beta) in te.FULL_BETAS
    assert s.text_window[1] in te.TEXT_WINDOW_ENDS and strength_for("full", None) in te.STRENGTHS
    assert s.inner_iterations in te.NULLTEXT_ITERATIONS


def test_sweep_rows_pair_by_edit(toy_edit, tmp_path):
    te, tp = toy_edit
    rows = [{"edit": e, "kind": "colour", "family": "beta", "value": v, "config": f"beta={v:g}", "edit_success": 0.0,
             "attribute_reached": 1.0, "object_iou": 0.5, "bg_psnr": 15.0 + e + (2.0 if v == 0.0 else 0.0),
             "bg_lpips": 0.4, "psnr": 14.0, "lpips": 0.5, "mask_iou": None, "seconds": 1.0, "model_evals": 10}
            for e in range(4) for v in (0.0, 3.0)]
    path = tmp_path / "sweep_edits.csv"
    te.write_csv(path, rows, ["edit", "kind", "family", "value", *te.COLUMNS])
    import csv

    d = tp.paired(list(csv.DictReader(path.open())), "beta=0", "beta=3")
    assert d["bg_psnr"][0] == pytest.approx(2.0, abs=1e-3) and d["bg_psnr"][1:] == pytest.approx((2.0, 2.0), abs=1e-3)
    agg = te.mean_rows([r for r in rows if r["config"] == "beta=0"], "config")[0]
    assert agg["bg_psnr"] == pytest.approx(18.5 + 0.0) and agg["bg_psnr_lo"] < agg["bg_psnr"] < agg["bg_psnr_hi"]
