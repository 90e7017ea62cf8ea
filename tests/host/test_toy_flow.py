"""Host tier: the toy world's flow-matching twin (psedit_toy.flow_model), untrained, the way ComfyUI runs it.

An SD3-family model (``comfy.supported_models.SD3``, MMDiT, ``CONST`` flow matching, shift 3) on SD1.5-format
latents (4 channels, the real TAESD): it builds, the stock CLIPTextEncode conditions it (tokens and pooled vector),
SamplerCustomAdvanced samples it with real CFG, PSEdit's flow paths take it (DDIM Invert with refinement and
Inverted Noise, null-text over tokens + pooled, Triple Guider, Perceptual Guidance through the SD1 TAESD decoder,
FlowEdit), one training step of ``psedit_toy.train --family flow`` runs and its export loads back. Random weights:
shapes and plumbing only; the trained twin's quality is benchmarks/toy_quality.py --model flow's.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from _comfy_env import run_node

try:
    tiny.load_pack()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

import comfy.latent_formats  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy_extras.nodes_custom_sampler as ncs  # noqa: E402
from psedit_pack.nodes import _comfy  # noqa: E402
from psedit_pack.nodes.flowedit import FlowEditGuiderNode  # noqa: E402
from psedit_pack.nodes.guidance import PerceptualGuidanceNode, TripleGuiderNode  # noqa: E402
from psedit_pack.nodes.inversion import DDIMInvert, InvertedNoiseNode  # noqa: E402
from psedit_pack.nodes.nulltext import NullTextInversion  # noqa: E402

import nodes as comfy_nodes  # noqa: E402
from psedit_toy import flow_model as F  # noqa: E402
from psedit_toy import model as M  # noqa: E402
from psedit_toy import scenes as S  # noqa: E402
from psedit_toy import train as T  # noqa: E402

STEPS = 4
CAPTIONS = {"null": "", "source": "a red circle on a gray plain background",
            "edit": "a blue circle on a gray plain background"}


def random_twin(seed: int = 0):
    """(MODEL, CLIP) of an untrained twin, built under inference mode as a loader node builds them: DiT's init with
    the zero-initialised modulations and output layer perturbed, so the velocity is not 0; text weights N(0, 0.02)."""
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(seed)
        model, clip = F.build_model(), M.build_clip()
        net = model.model.diffusion_model
        F.init_weights(net)
        for name, prm in net.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                prm.normal_(0, 0.02)
        tiny.init_random(clip.cond_stage_model, seed + 1, 0.02)
    return model, clip


@pytest.fixture(scope="module")
def twin():
    vae = tiny.taesd_vae("sd15")
    if vae is None:
        pytest.skip(f"needs the real TAESD in {tiny.WEIGHTS / 'taesd'}")
    model, clip = random_twin()
    with torch.inference_mode():
        conds = {k: run_node(comfy_nodes.CLIPTextEncode, clip=clip, text=v)[0] for k, v in CAPTIONS.items()}
        image = torch.from_numpy(S.render(S.training_scenes(1, 0)[0])[0]).float()[None] / 255
        latent = {"samples": vae.encode(image)}
    return model, clip, vae, conds, image, latent


def sigmas_for(model, steps=STEPS):
    with torch.inference_mode():
        return ncs.BasicScheduler().get_sigmas(model, "simple", steps, 1.0)[0]


def sample(guider, latent, sigmas, noise):
    with torch.inference_mode():
        return ncs.SamplerCustomAdvanced().sample(noise, guider, comfy.samplers.sampler_object("euler"), sigmas,
                                                  latent)[0]["samples"]


def test_the_twin_is_an_sd3_flow_model_on_sd1_latents(twin):
    model, clip, _, conds, _, latent = twin
    assert type(model.model.model_config).__name__ == "SD3" and _comfy.is_flow(model)
    fmt = _comfy.latent_format(model)  # SD1.5's under the name ToySD3: never taken for the eps model's
    assert isinstance(fmt, comfy.latent_formats.SD15) and _comfy.model_family(model) == "ToySD3"
    assert fmt.latent_channels == 4 and fmt.taesd_decoder_name == "taesd_decoder"
    assert model.get_model_object("model_sampling").shift == 3.0
    _comfy.check_supported(model, "test")
    tokens, extra = conds["source"][0]
    assert tokens.shape == (1, 77, M.CONTEXT_DIM) and extra["pooled_output"].shape == (1, F.POOLED_DIM)
    ids = T.token_ids(clip, CAPTIONS["source"])
    assert torch.equal(extra["pooled_output"][0], tokens[0, F.pooled_index(ids)])  # the EOS hidden state
    for name, cond in conds.items():
        _comfy.check_conditioning(model, cond, name)
    _comfy.check_latent(model, latent["samples"])


def test_real_cfg_sampling_through_sampler_custom_advanced(twin):
    model, _, vae, conds, _, _ = twin
    sigmas = sigmas_for(model)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    with torch.inference_mode():
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(conds["source"], conds["null"])
        guider.set_cfg(4.5)
    out = sample(guider, {"samples": torch.zeros(1, 4, 16, 16)}, sigmas, ncs.Noise_RandomNoise(0))
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all() and out.std() > 0.1
    with torch.inference_mode():
        assert vae.decode(out).shape == (1, 128, 128, 3)


def test_psedit_flow_paths_take_the_twin(twin):
    """Inversion with refinement and the Inverted Noise hand-over, null-text over tokens and pooled vector, Triple
    Guider with Perceptual Guidance through the SD1 TAESD decoder (the latent format's, not TAESD3's), FlowEdit."""
    if not (tiny.WEIGHTS / "lpips" / "alexnet_features.pth").is_file():
        pytest.skip(f"needs the real LPIPS trunks in {tiny.WEIGHTS / 'lpips'}")
    tiny.register_shared_weights()
    model, _, vae, conds, image, latent = twin
    sigmas = sigmas_for(model)
    assert "taesd_decoder" in _comfy.taesd_decoder_path(model)
    with torch.inference_mode():
        inverted, payload = DDIMInvert.execute(model, latent, sigmas, conds["source"], 1.0, 1)
        noise = InvertedNoiseNode.execute(payload)[0]
        schedule = NullTextInversion.execute(model, payload, conds["null"], conds["source"], 4.5, "null-text", 1,
                                             1e-5, 0.01)[0]
        guider = TripleGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 4.5, 4.5, None,
                                          schedule)[0]
        guided = PerceptualGuidanceNode.execute(guider, vae, image, 0.3, "alex", "x0", "taesd", "normalized")[0]
        flowedit = FlowEditGuiderNode.execute(model, conds["null"], conds["source"], conds["edit"], 3.5, 13.5,
                                                STEPS - 1, 0, 1, 0)[0]
    null_pooled = conds["null"][0][1]["pooled_output"]
    assert any((step[0][1]["pooled_output"] - null_pooled).abs().max() > 0 for step in schedule.conds)
    for g, n in ((guider, noise), (guided, noise), (flowedit, ncs.Noise_EmptyNoise())):
        out = sample(g, inverted if g is not flowedit else latent, sigmas, n)
        assert out.shape == latent["samples"].shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="Inverted Noise"):  # DisableNoise would start a flow model from zeros
        sample(guider, inverted, sigmas, ncs.Noise_EmptyNoise())


def test_an_eps_models_inversion_is_refused(twin):
    """Same latents (4 channels, scale 0.18215), another model: the latent format's name tells them apart."""
    model, _, _, conds, _, latent = twin
    eps = tiny.build_tiny("sd15", "eps")
    with torch.inference_mode():
        _, payload = DDIMInvert.execute(eps, latent, sigmas_for(eps), tiny.conditioning("sd15", 0), 1.0, 0)
        with pytest.raises(ValueError, match="SD15 model but this MODEL is ToySD3"):
            NullTextInversion.execute(model, payload, conds["null"], conds["source"], 4.5, "null-text", 1, 1e-5, 0.01)


def test_one_training_step_and_its_export_load_back(tmp_path):
    a = T.parse_args(["--family", "flow", "--batch", "4", "--work", str(tmp_path)])
    with torch.random.fork_rng():
        tr = T.Trainer(a, M, torch.device("cpu"))
        ids = [T.token_ids(tr.clip, c) for c in (*CAPTIONS.values(), CAPTIONS["source"])]
        T.check_text_forward(tr, ids[:2])  # tokens and pooled as SDClipModel computes them
        z0 = torch.randn(4, 4, 16, 16)
        loss, mse = T.flow_objective(tr.patcher.model.model_sampling)(tr, z0, ids)
        before = tr.unet.final_layer.linear.weight.detach().clone()
        loss.backward()
        tr.opt.step()
    # adaLN-Zero: the velocity starts at 0, so the loss is || eps - z0 ||^2 (about 2 here)
    assert mse.shape == (4,) and 1.0 < loss.item() < 3.5
    assert not torch.equal(before, tr.unet.final_layer.linear.weight)
    tr.step, tr.losses = 1, [loss.item()]
    out = tmp_path / "toy_sd3.safetensors"
    manifest = T.export(tr, out, "digest", "done", [])
    assert manifest["family"] == "flow" and (tmp_path / "toy_sd3.json").is_file()
    assert not (tmp_path / "manifest.json").exists()
    model, clip, vae = M.load(out, taesd=tiny.WEIGHTS / "taesd")  # model.load hands the flow twin to flow_model
    net = model.model.diffusion_model
    assert type(model.model.model_config).__name__ == "SD3" and net.final_layer.linear.weight.is_inference()
    assert torch.equal(net.final_layer.linear.weight, tr.ema_unet.final_layer.linear.weight.half().float())
    assert torch.equal(net.pos_embed, tr.unet.pos_embed)
    with pytest.raises(RuntimeError, match="not a flow model"):
        F.load(M.WEIGHTS)
    # --init: a new run without a checkpoint starts its networks and EMA from the export, exactly
    b = T.parse_args(["--family", "flow", "--batch", "4", "--work", str(tmp_path / "b"), "--init", str(out)])
    with torch.random.fork_rng():
        tr2 = T.Trainer(b, M, torch.device("cpu"))
        tr2.resume()
    for m in (tr2.unet, tr2.ema_unet):
        assert torch.equal(m.final_layer.linear.weight, tr.ema_unet.final_layer.linear.weight.half().float())
    assert tr2.step == 0 and T.init_record(out)["sha256"] == manifest["sha256"]


def test_on_policy_states_are_the_twins_own_cfg_euler_trajectory(tmp_path):
    """``--on-policy``: the states kept are the live twin's CFG-euler trajectory at the sigmas the teacher covers;
    a batch takes its first rows from them (their caption ids, their sigmas) and rolls out anew every ``every``."""
    a = T.parse_args(["--family", "flow", "--batch", "4", "--work", str(tmp_path), "--teacher", str(M.WEIGHTS),
                      "--on-policy", "0.5"])
    cpu = torch.device("cpu")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tr = T.Trainer(a, M, cpu)
        with torch.no_grad():  # a velocity that is not 0 (adaLN-Zero starts it at 0)
            tr.unet.final_layer.linear.weight.normal_(0, 0.02)
        teacher = T.Teacher(M.WEIGHTS, cpu, a.teacher_max_sigma)
        caps = [CAPTIONS["source"], CAPTIONS["edit"]]
        ids = {c: T.token_ids(tr.clip, c) for c in [*caps, ""]}
        sampling = tr.patcher.model.model_sampling
        op = T.OnPolicy(sampling, teacher, 0.5, caps, ids, (4, 16, 16), n=2, steps=12, every=2)
        x, s, rows = op.draw(tr, 3)
        kept = [v for v in op.sigmas[:-1].tolist() if teacher.covers(torch.tensor(v))]
        assert 2 <= len(kept) < 12 and all(0.028 < v <= 0.6 for v in kept)
        assert torch.allclose(op.s, torch.tensor(kept).repeat_interleave(2))
        assert x.shape == (3, 4, 16, 16) and all(float(v) in kept for v in s) and len(rows) == 3
        # the second kept state of trajectory 0 is one CFG euler step of the twin from the first
        x0, x1, s0, s1 = op.x[0:1], op.x[2:3], kept[0], kept[1]
        with torch.no_grad():
            cond = T.text_and_pooled(tr.text, [ids[op.rows[0]], ids[""]])
            t = sampling.timestep(torch.full((2,), s0))
            vc, vu = tr.unet(torch.cat([x0, x0]), t, context=cond[0], y=cond[1]).chunk(2)
        assert torch.allclose(x1, x0 + (s1 - s0) * (vu + 7.5 * (vc - vu)), atol=1e-5)
        first = op.x
        op.draw(tr, 3)
        assert op.x is first  # within ``every`` draws: the same states
        op.draw(tr, 3)
        assert op.x is not first
        loss, mse = T.flow_objective(sampling, teacher, op)(tr, torch.randn(4, 4, 16, 16), [ids[caps[0]]] * 4)
    assert mse.shape == (2,) and torch.isfinite(loss)  # the logged MSE: the data's rows only


def test_the_eps_teacher_predicts_the_flow_target(twin):
    """``--teacher``: the trained eps model's velocity (T1) at a flow point of a real scene is nearer the draw's
    target ``eps - z0`` than the draw's variance, is used only up to ``max_sigma``, and a flow model is refused."""
    _, clip, vae, _, image, _ = twin
    teacher = T.Teacher(M.WEIGHTS, torch.device("cpu"), max_sigma=0.6)
    with torch.inference_mode():
        z0 = comfy.latent_formats.SD15().process_in(vae.encode(image)).repeat(4, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(z0.shape, generator=g)
    s = torch.tensor([0.3, 0.5, 0.6, 0.8])
    x = (1 - s)[:, None, None, None] * z0 + s[:, None, None, None] * eps
    ids = [T.token_ids(clip, S.caption(S.training_scenes(1, 0)[0]))] * 4
    v, covered = teacher.velocity(x, s, ids, eps - z0)
    assert covered.tolist() == [True, True, True, False]
    assert torch.equal(v[3], (eps - z0)[3])  # above max_sigma: the draw's own target
    err = (v[:3] - (eps - z0)[:3]).square().mean().item()
    spread = (eps - z0)[:3].var().item()
    assert err < 0.5 * spread, (err, spread)
    with pytest.raises(SystemExit, match="not an eps model"):
        T.Teacher(F.WEIGHTS, torch.device("cpu"), max_sigma=0.6)
