"""The toy world's flow-matching twin, the parts that need no ComfyUI: which manifest a weights file has, the
training script's family options (psedit_toy.model / train / flow_model import no ``comfy`` at module level)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from psedit_toy import flow_model as F
from psedit_toy import model as M
from psedit_toy import scenes as S
from psedit_toy import train as T


def test_each_weights_file_finds_its_own_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"file": "toy_sd15.safetensors"}))
    (tmp_path / "toy_sd3.json").write_text(json.dumps({"family": "flow", "file": "toy_sd3.safetensors"}))
    assert M.manifest(tmp_path / "toy_sd3.safetensors")["family"] == "flow"
    assert M.manifest(tmp_path / "toy_sd15.safetensors") == {"file": "toy_sd15.safetensors"}  # the first layout
    assert M.manifest(tmp_path / "elsewhere" / "x.safetensors") == {}
    assert M.manifest_path(M.WEIGHTS) == M.MANIFEST  # the committed eps model keeps its manifest.json


def test_training_defaults_follow_the_family():
    eps = T.parse_args([])
    assert (eps.family, eps.arch, eps.lr, eps.min_snr, eps.offset_noise) == ("eps", "v2", 6e-4, 5.0, 0.1)
    assert eps.logit_mean is None and eps.logit_std is None
    flow = T.parse_args(["--family", "flow"])
    assert (flow.arch, flow.lr, flow.logit_mean, flow.logit_std) == (F.DEFAULT_ARCH, 3e-4, 0.0, 1.0)
    assert flow.min_snr is None and flow.offset_noise is None
    assert "family" in T.FIXED  # an eps checkpoint never resumes as a flow run, nor the reverse


@pytest.mark.parametrize("argv", [["--family", "flow", "--min-snr", "5"], ["--family", "flow", "--arch", "v2"],
                                  ["--logit-std", "1"], ["--arch", F.DEFAULT_ARCH],
                                  ["--teacher", str(M.WEIGHTS)], ["--on-policy", "0.5"]])
def test_options_of_the_other_family_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(argv)
    assert "family" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--teacher", str(M.WEIGHTS), "--on-policy", "0"],
                                   ["--teacher", str(M.WEIGHTS), "--on-policy", "1.5"]])
def test_on_policy_needs_a_teacher_and_a_fraction(extra, capsys):
    """The on-policy states have no target of their own (no z0): the teacher's velocity is it."""
    argv = ["--family", "flow", *extra] + ([] if extra else ["--on-policy", "0.5"])
    with pytest.raises(SystemExit):
        T.parse_args(argv)
    assert "--on-policy" in capsys.readouterr().err
    ok = T.parse_args(["--family", "flow", "--teacher", str(M.WEIGHTS), "--on-policy", "0.5"])
    assert ok.on_policy == 0.5 and ok.init is None


def test_shape_weight_draws_the_named_shape_that_much_more_often(capsys):
    """--shape-weight star=3: scenes holding a star come up three times as often per scene; unnamed shapes and
    no option keep the uniform draw (the same CPU draws as every run before the option)."""
    a = T.parse_args(["--family", "flow", "--shape-weight", "star=3"])
    assert a.shape_weight == {"star": 3.0} and T.parse_args([]).shape_weight == {}
    for bad in ("moon=2", "star", "star=0", "star=x", "star=inf"):
        with pytest.raises(SystemExit):
            T.parse_args(["--shape-weight", bad])
        assert "--shape-weight" in capsys.readouterr().err
    scenes = S.training_scenes(2000, seed=3)
    assert T.scene_weights(scenes, {}) is None
    w = T.scene_weights(scenes, a.shape_weight)
    star = torch.tensor([any(o.shape == "star" for o in sc.objects) for sc in scenes])
    assert set(w[star].tolist()) == {3.0} and set(w[~star].tolist()) == {1.0}
    torch.manual_seed(0)
    picked = star[T.draw_indices(len(scenes), 20000, w)].float().mean().item()
    expected = 3 * star.float().mean().item() / (3 * star.float().mean().item() + (~star).float().mean().item())
    assert abs(picked - expected) < 0.015 and abs(picked - star.float().mean().item()) > 0.15
    torch.manual_seed(0)
    uniform = T.draw_indices(len(scenes), 64, None)
    torch.manual_seed(0)
    assert torch.equal(uniform, torch.randint(0, len(scenes), (64,)))


def test_flow_archs_are_sd3_shaped_on_four_channels():
    for config in F.ARCHS.values():
        assert config["in_channels"] == config["out_channels"] == 4 and config["patch_size"] == 2
        assert config["context_embedder_config"]["params"]["in_features"] == M.CONTEXT_DIM
        assert config["adm_in_channels"] == M.TEXT_CONFIG["hidden_size"]  # the unprojected EOS hidden state
    assert F.pooled_index([49406, 320, 1579, 49407, 49407]) == 3


def test_committed_flow_weights_match_their_manifest():
    if not F.WEIGHTS.is_file():
        pytest.skip("the flow twin's weights are not committed yet (python -m psedit_toy.train --family flow)")
    manifest = M.manifest(F.WEIGHTS)
    assert manifest["family"] == "flow" and manifest["file"] == F.WEIGHTS.name
    assert manifest["sha256"] == hashlib.sha256(F.WEIGHTS.read_bytes()).hexdigest()
    assert F.WEIGHTS.stat().st_size == manifest["bytes"] < 40e6
    world = manifest["data_version"]
    assert manifest["data_sha256"] == S.dataset_digest(S.training_scenes(manifest["scenes"], manifest["seed"], world),
                                                       world)


def test_flowedit_rows_name_their_own_cfg_scales():
    from psedit_toy import flow_rows as FR

    assert FR.split_config("flowedit") == ("flowedit", None)
    assert FR.split_config("flowedit@1,3") == ("flowedit", (1.0, 3.0))
    assert FR.split_config("flowedit_masked_true@1.5,4.5+perceptual") == ("flowedit_masked_true", (1.5, 4.5))
    assert FR.is_flowedit("flowedit@1,3+perceptual") and not FR.is_flowedit("textopt")
    with pytest.raises(ValueError, match="@SOURCE,EDIT"):
        FR.split_config("flowedit@3")


def test_teacher_velocity_is_the_flow_target_for_the_true_noise():
    """Distillation's T1: the eps model's input at a flow point is its own ``(z0 + k eps) / sqrt(1 + k^2)``, and
    the velocity from the draw's own eps is the flow target ``eps - z0``."""
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    s = torch.tensor([0.03, 0.2, 0.5, 0.8, 0.93])
    x = (1 - s)[:, None, None, None] * z0 + s[:, None, None, None] * eps
    k = T.eps_sigma(s)[:, None, None, None]
    torch.testing.assert_close(T.eps_input(x, s), (z0 + k * eps) / torch.sqrt(1 + k**2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(T.velocity_from_eps(eps, x, s), eps - z0, rtol=1e-5, atol=1e-5)
    wrong = T.velocity_from_eps(eps + 0.01, x, s) - (eps - z0)  # an eps error grows by 1 / (1 - s)
    torch.testing.assert_close(wrong.abs().amax(dim=(1, 2, 3)), 0.01 / (1 - s), rtol=1e-3, atol=1e-5)
