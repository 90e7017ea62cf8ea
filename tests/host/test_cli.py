"""Host tier: ``psedit`` on tiny models (tiny SD1.5 UNet, real TAESD, fake text encoder, tiny CLIP from a config)."""

from __future__ import annotations

import csv
import hashlib

import pytest
import tiny
import torch

try:
    tiny.load_pack()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

from PIL import Image  # noqa: E402

from psedit_cli import evaluate as ev  # noqa: E402
from psedit_cli import pipeline  # noqa: E402
from psedit_cli.main import build_parser, main  # noqa: E402

SETTINGS = pipeline.Settings(steps=4, inner_iterations=2, refine=1, text_window=(0.0, 0.5),
                             perceptual_window=(0.25, 1.0))


def fake_encode(text: str):
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return tiny.conditioning("sd15", seed)


@pytest.fixture(scope="module")
def models():
    vae = tiny.taesd_vae("sd15")
    if vae is None:
        pytest.skip("needs the real TAESD in ../shared/weights")
    tiny.register_shared_weights()
    return pipeline.Models(tiny.build_tiny("sd15"), vae, fake_encode)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    tok_dir = tiny.comfy_path() / "comfy" / "sd1_tokenizer"
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": tokenizer.vocab_size, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)  # transformers initialises from the global generator; tests only
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32,
                                                                                         "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name, img in (("astronaut", data.astronaut()), ("chelsea", data.chelsea())):
        Image.fromarray(img).resize((68, 64)).save(folder / f"{name}.png")
    captions = folder / "captions.csv"
    captions.write_text("image,source,edit\nastronaut.png,an astronaut,an astronaut in a red suit\n"
                        "chelsea.png,a cat,a tiger\n")
    return folder, captions


def test_clip_metrics_match_hand_computation(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    clip = ev.ClipEmbedder(clip_dir)
    img = tiny.photo(64)
    e_i, e_t = clip.images([img]), clip.texts(["a photo", "a tiger"])
    model, proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        pil = Image.fromarray((img[0].numpy() * 255).round().astype("uint8"))
        hand_i = model.get_image_features(**proc(images=[pil], return_tensors="pt"))
        hand_t = model.get_text_features(**proc(text=["a photo", "a tiger"], return_tensors="pt", padding=True))
    hand_i, hand_t = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (hand_i, hand_t))
    cos = torch.nn.functional.cosine_similarity(hand_i, hand_t[1:2]).item()
    assert ev.clip_score(e_i, e_t[1:2]).item() == pytest.approx(max(100 * cos, 0), abs=1e-3)
    img2 = img.flip(2)
    e_i2 = clip.images([img2])
    with torch.no_grad():
        pil2 = Image.fromarray((img2[0].numpy() * 255).round().astype("uint8"))
        hand_i2 = model.get_image_features(**proc(images=[pil2], return_tensors="pt"))
    hand_i2 = hand_i2 if isinstance(hand_i2, torch.Tensor) else hand_i2.pooler_output
    want = torch.nn.functional.cosine_similarity(hand_i2 - hand_i, hand_t[1:2] - hand_t[0:1]).item()
    got = ev.clip_directional_similarity(e_i, e_i2, e_t[0:1], e_t[1:2]).item()
    assert got == pytest.approx(want, abs=1e-4)


def test_eval_end_to_end_and_resume(models, clip_dir, dataset, tmp_path):
    folder, captions = dataset
    items = ev.read_captions(captions, folder)
    out = tmp_path / "out"
    clip = ev.ClipEmbedder(clip_dir)
    calls = {"prepare": 0, "run": 0}
    real_prepare, real_run = ev.prepare, ev.run_config

    def counting_prepare(*a, **k):
        calls["prepare"] += 1
        return real_prepare(*a, **k)

    def counting_run(*a, **k):
        calls["run"] += 1
        return real_run(*a, **k)

    ev.prepare, ev.run_config = counting_prepare, counting_run
    try:
        class Stop(Exception):
            pass

        def stop_after_four(row, n=[0]):  # noqa: B006 (a counter)
            n[0] += 1
            if n[0] == 4:
                raise Stop

        with pytest.raises(Stop):
            ev.evaluate(models, items, out, SETTINGS, clip, lpips_dirs=[tiny.WEIGHTS / "lpips"],
                        on_row=stop_after_four)
        assert calls == {"prepare": 2, "run": 4}
        with (out / "results.csv").open() as f:
            assert len(list(csv.DictReader(f))) == 4  # every finished row was flushed
        calls.update(prepare=0, run=0)
        rows = ev.evaluate(models, items, out, SETTINGS, clip, lpips_dirs=[tiny.WEIGHTS / "lpips"])
        assert calls == {"prepare": 1, "run": 2}  # only chelsea's last two configurations were redone
        calls.update(prepare=0, run=0)
        ev.evaluate(models, items, out, SETTINGS, clip, lpips_dirs=[tiny.WEIGHTS / "lpips"])
        assert calls == {"prepare": 0, "run": 0}
    finally:
        ev.prepare, ev.run_config = real_prepare, real_run
    assert len(rows) == 6
    for row in rows:
        for k in ("psnr", "lpips", "clip_score", "clip_dir"):
            assert torch.isfinite(torch.tensor(float(row[k])))
        assert 5 < float(row["psnr"]) < 60 and 0 <= float(row["lpips"]) < 1
    for config in pipeline.CONFIGS:
        assert sorted(p.name for p in (out / config).iterdir()) == ["astronaut.png", "chelsea.png"]
    grid = Image.open(out / "grids" / "chelsea.png")
    assert grid.size == (64 * 4, 64)  # 68 px wide photo cropped to 64, then source + 3 edits
    table = (out / "table.md").read_text()
    for name in ("Null-text", "Text optimization", "Perceptual + text optimization"):
        assert name in table
    with (out / "table.csv").open() as f:
        means = list(csv.DictReader(f))
    assert [m["images"] for m in means] == ["2", "2", "2"]
    textopt = [float(r["psnr"]) for r in rows if r["config"] == "textopt"]
    assert float(means[1]["psnr"]) == pytest.approx(sum(textopt) / 2, rel=1e-6)


def test_configurations_differ(models, dataset):
    folder, _ = dataset
    p = pipeline.prepare(models, ev.load_image(folder / "chelsea.png"), "a cat", "a tiger", SETTINGS)
    out = {c: pipeline.run_config(c, models, p, SETTINGS) for c in pipeline.CONFIGS}
    assert out["nulltext"].shape == (1, 64, 64, 3)
    assert not torch.allclose(out["nulltext"], out["textopt"], atol=1e-3)
    assert not torch.allclose(out["textopt"], out["perceptual"], atol=1e-3)


def test_cli_errors(tmp_path, dataset, capsys, monkeypatch):
    folder, captions = dataset
    args = ["eval", "--checkpoint", str(tmp_path / "x.safetensors"), "--images", str(folder), "--captions",
            str(captions), "--out", str(tmp_path / "o")]
    assert main([*args, "--clip", str(tmp_path / "no_clip")]) == 2
    assert "config.json" in capsys.readouterr().err
    monkeypatch.delenv("COMFYUI_PATH")
    with pytest.raises(pipeline.SetupError, match="COMFYUI_PATH"):
        pipeline.setup_comfy(None)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,caption\n")
    with pytest.raises(pipeline.SetupError, match="image,source,edit"):
        ev.read_captions(bad, folder)
    parsed = build_parser().parse_args(["edit", "--checkpoint", "c", "--image", "i.png", "--source", "a", "--edit",
                                        "b", "--out", "o.png", "--text-window", "0", "0.3"])
    assert parsed.text_window == [0.0, 0.3] and parsed.method == "null-text" and parsed.steps == 50
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--checkpoint", "c"])
