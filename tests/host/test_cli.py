"""Host tier: the ``psedit`` command on tiny models (tiny SD1.5 UNet, the real TAESD as the VAE, a fake text encoder,
a tiny CLIP built from a config), its argument parsing and errors, and its metrics against hand computations."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import tiny
import torch

try:
    tiny.load_pack()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

import cli_helpers as helpers  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from psedit_cli import evaluate as ev  # noqa: E402
from psedit_cli import pipeline  # noqa: E402
from psedit_cli.clip_metrics import ClipEmbedder  # noqa: E402
from psedit_cli.errors import SetupError  # noqa: E402
from psedit_cli.images import LABEL_HEIGHT, load_photo  # noqa: E402
from psedit_cli.main import build_parser, main  # noqa: E402
from psedit_core.lpips_loader import get_lpips  # noqa: E402
from psedit_core.metrics import lpips_distance, psnr  # noqa: E402

LPIPS_DIR = tiny.WEIGHTS / "lpips"
FAST = ["--steps", "4", "--inner-iterations", "2", "--refine", "1", "--text-window", "0", "0.5",
        "--perceptual-window", "0.25", "1", "--lpips-dir", str(LPIPS_DIR)]
SETTINGS = pipeline.Settings(steps=4, inner_iterations=2, refine=1, text_window=(0.0, 0.5),
                             perceptual_window=(0.25, 1.0))


@pytest.fixture(scope="module")
def models():
    vae = tiny.taesd_vae("sd15")
    if vae is None or not (LPIPS_DIR / "alexnet_features.pth").is_file():
        pytest.skip("needs the real TAESD and LPIPS trunks in ../shared/weights")
    tiny.register_shared_weights()
    return pipeline.Models(tiny.build_tiny("sd15"), vae, helpers.fake_encode)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return helpers.make_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return helpers.make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"")  # never read: load_checkpoint is replaced by the tiny models
    return path


@pytest.fixture
def cli(monkeypatch, models, checkpoint):
    """``main`` with the checkpoint loader replaced by the tiny models, and counters on the pipeline."""
    monkeypatch.setattr(pipeline, "load_checkpoint", lambda path: models)
    counters = {"prepare": helpers.Counter(ev.prepare), "run": helpers.Counter(ev.run_config)}
    monkeypatch.setattr(ev, "prepare", counters["prepare"])
    monkeypatch.setattr(ev, "run_config", counters["run"])
    return counters


def read_rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --- (1) psedit eval end to end, interrupted and resumed --------------------------------------------------------------

def test_eval_end_to_end_interrupt_and_resume(cli, dataset, clip_dir, checkpoint, tmp_path, capsys):
    images, captions = dataset
    out = tmp_path / "out"
    argv = ["eval", "--checkpoint", str(checkpoint), "--images", str(images), "--captions", str(captions),
            "--clip", str(clip_dir), "--out", str(out), *FAST]

    cli["run"].interrupt_on = 5  # Ctrl-C while chelsea's second configuration runs
    assert main(argv) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert (cli["prepare"].calls, cli["run"].calls) == (2, 5)
    first = read_rows(out / "results.csv")
    assert [(r["image"], r["config"]) for r in first] == [
        ("astronaut", "nulltext"), ("astronaut", "textopt"), ("astronaut", "perceptual"), ("chelsea", "nulltext")]

    # A line cut short by the interruption, and a row deleted by hand: both are redone, nothing else.
    kept = [r for r in first if (r["image"], r["config"]) != ("astronaut", "textopt")]
    text = ev._csv_text(kept, header=True) + "chelsea,textopt,21.3"
    (out / "results.csv").write_text(text)
    cli["run"].interrupt_on, cli["prepare"].calls, cli["run"].calls = None, 0, 0
    assert main(argv) == 0
    assert (cli["prepare"].calls, cli["run"].calls) == (2, 3)
    rows = read_rows(out / "results.csv")
    assert sorted((r["image"], r["config"]) for r in rows) == sorted(
        (s, c) for s in helpers.PHOTOS for c in pipeline.CONFIGS)
    redone = next(r for r in rows if (r["image"], r["config"]) == ("astronaut", "textopt"))
    original = next(r for r in first if (r["image"], r["config"]) == ("astronaut", "textopt"))
    for k in ev.METRICS:  # the pipeline is deterministic: the redone edit scores the same
        assert float(redone[k]) == pytest.approx(float(original[k]), rel=1e-5, abs=1e-6)
    stdout = capsys.readouterr().out
    assert "Perceptual + text optimization" in stdout

    cli["prepare"].calls, cli["run"].calls = 0, 0
    assert main(argv) == 0  # all done: nothing is recomputed, nothing is appended
    assert (cli["prepare"].calls, cli["run"].calls) == (0, 0)
    assert read_rows(out / "results.csv") == rows

    check_outputs(out, rows, images)


def check_outputs(out, rows, images):
    for row in rows:
        values = {k: float(row[k]) for k in ev.METRICS}
        assert all(math.isfinite(v) for v in values.values()), row
        assert 5 < values["psnr"] < 60 and 0 <= values["lpips"] < 1
        assert 0 < values["clip_score"] <= 100 and -1 <= values["clip_dir"] <= 1
    source = load_photo(images / "chelsea.png")
    for row in (r for r in rows if r["image"] == "chelsea"):  # metrics are those of the files written
        edited = load_photo(out / row["config"] / "chelsea.png")
        assert float(row["psnr"]) == pytest.approx(psnr(edited.movedim(-1, 1), source.movedim(-1, 1)).item(),
                                                   abs=1e-4)
    for config in pipeline.CONFIGS:
        assert sorted(p.name for p in (out / config).iterdir()) == ["astronaut.png", "chelsea.png"]
        assert Image.open(out / config / "chelsea.png").size == (64, 64)  # 68x64 centre-cropped to 64x64
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["astronaut.png", "chelsea.png"]
    grid = Image.open(out / "grids" / "chelsea.png")
    assert grid.size == (4 * 64, 64 + LABEL_HEIGHT)  # source + 3 edits, a label band above
    pixels = torch.from_numpy(np.asarray(grid, dtype="float32"))
    edit = torch.from_numpy(np.asarray(Image.open(out / "textopt" / "chelsea.png"), dtype="float32"))
    assert torch.equal(pixels[LABEL_HEIGHT:, 128:192], edit)  # the second edit tile is the textopt image
    assert pixels[:LABEL_HEIGHT].max() > 200 and pixels[:LABEL_HEIGHT].mean() < 60  # white text on black

    table = read_rows(out / "table.csv")
    assert [t["method"] for t in table] == ["Null-text", "Text optimization", "Perceptual + text optimization"]
    for t in table:
        sel = [r for r in rows if r["config"] == t["config"]]
        assert int(t["images"]) == len(sel) == 2
        for k in ev.METRICS:
            assert float(t[k]) == pytest.approx(sum(float(r[k]) for r in sel) / 2, rel=1e-9)
    md = (out / "table.md").read_text(encoding="utf-8").splitlines()
    assert len(md) == 5 and md[2].startswith("| Null-text | 2 | ") and md[4].startswith("| Perceptual + text")
    assert f"{float(table[1]['psnr']):.2f}" in md[3]


def test_eval_refuses_to_mix_settings(tmp_path):
    ev.check_run(tmp_path, SETTINGS)
    ev.check_run(tmp_path, SETTINGS)  # same settings: resumes
    with pytest.raises(SetupError, match=r"other settings \(beta: None -> 2.0\).*new --out"):
        ev.check_run(tmp_path, pipeline.Settings(**{**SETTINGS.__dict__, "beta": 2.0}))


def test_edit_command_writes_the_edit(cli, dataset, checkpoint, tmp_path, capsys):
    images, _ = dataset
    out = tmp_path / "tiger.png"
    assert main(["edit", "--checkpoint", str(checkpoint), "--image", str(images / "chelsea.png"), "--source", "a cat",
                 "--edit", "a tiger", "--out", str(out), "--resize", "40", *FAST]) == 0
    assert "wrote" in capsys.readouterr().out
    edited = torch.from_numpy(np.asarray(Image.open(out), dtype="float32"))
    assert edited.shape == (40, 40, 3)  # 68x64 -> shorter side 40 -> 43x40 -> centre-cropped to 40x40
    assert edited.std() > 5  # an image, not a constant


def test_configurations_differ(models, dataset):
    images, _ = dataset
    p = pipeline.prepare(models, load_photo(images / "chelsea.png"), "a cat", "a tiger", SETTINGS)
    out = {c: pipeline.run_config(c, models, p, SETTINGS) for c in pipeline.CONFIGS}
    assert out["nulltext"].shape == (1, 64, 64, 3)
    assert (out["nulltext"] - out["textopt"]).abs().max() > 1e-2
    assert (out["textopt"] - out["perceptual"]).abs().max() > 1e-2


def test_perceptual_gradient_follows_the_workflows(models, dataset):
    """``--gradient auto``: full on SD1.x (the SD1.5 workflows' choice), x0 on SDXL; the two give other edits."""
    assert pipeline.gradient_for(models.model, "auto") == "full"
    assert pipeline.gradient_for(tiny.build_tiny("sdxl"), "auto") == "x0"
    assert pipeline.gradient_for(models.model, "x0") == "x0"
    # the strength follows the gradient as in the workflows (tests/workflows checks their widgets against STRENGTH)
    assert (pipeline.strength_for("full", None), pipeline.strength_for("x0", None)) == (3.0, 1.0)
    assert pipeline.strength_for("full", 0.5) == 0.5 and SETTINGS.strength is None
    images, _ = dataset
    p = pipeline.prepare(models, load_photo(images / "chelsea.png"), "a cat", "a tiger", SETTINGS)
    out = {g: pipeline.run_config("perceptual", models, p, dataclasses.replace(SETTINGS, gradient=g))
           for g in ("auto", "x0", "full")}
    assert torch.equal(out["auto"], out["full"])
    assert (out["x0"] - out["full"]).abs().max() > 1e-3


# --- (2) arguments and errors -----------------------------------------------------------------------------------------

def test_parser_defaults_and_required():
    parsed = build_parser().parse_args(["edit", "--checkpoint", "c", "--image", "i.png", "--source", "a", "--edit",
                                        "b", "--out", "o.png", "--text-window", "0", "0.3", "--method", "none"])
    assert parsed.text_window == [0.0, 0.3] and parsed.method == "none" and parsed.config == "perceptual"
    assert (parsed.steps, parsed.gamma, parsed.beta, parsed.strength) == (50, 7.5, None, None)  # beta, strength: auto
    assert (parsed.lpips_net, parsed.decoder, parsed.inner_iterations, parsed.resize) == ("vgg", "taesd", 10, 0)
    assert parsed.perceptual_window == [0.2, 0.8] and parsed.gradient == "auto"
    for bad in (["eval", "--checkpoint", "c"], ["edit", "--checkpoint", "c", "--image", "i", "--source", "a",
                                                "--edit", "b", "--out", "o", "--decoder", "sdxl"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def eval_args(checkpoint, dataset, tmp_path, *extra):
    images, captions = dataset
    return ["eval", "--checkpoint", str(checkpoint), "--images", str(images), "--captions", str(captions),
            "--out", str(tmp_path / "o"), *extra]


def test_missing_or_invalid_clip_names_the_files(checkpoint, dataset, tmp_path, capsys):
    assert main(eval_args(checkpoint, dataset, tmp_path, "--clip", str(tmp_path / "nope"))) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "save_pretrained" in err and "openai/clip-vit-large-patch14" in err
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert main(eval_args(checkpoint, dataset, tmp_path, "--clip", str(half))) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "vocab.json" in err and "config.json;" not in err
    assert not (tmp_path / "o").exists()  # nothing ran


def test_missing_comfyui(checkpoint, dataset, clip_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert main(eval_args(checkpoint, dataset, tmp_path, "--clip", str(clip_dir))) == 2
    err = capsys.readouterr().err
    assert "--comfyui" in err and "COMFYUI_PATH" in err
    assert main(eval_args(checkpoint, dataset, tmp_path, "--clip", str(clip_dir), "--comfyui", str(tmp_path))) == 2
    assert "not a ComfyUI checkout" in capsys.readouterr().err


def test_bad_inputs_name_the_fix(checkpoint, dataset, clip_dir, tmp_path, capsys, monkeypatch):
    args = eval_args(checkpoint, dataset, tmp_path, "--clip", str(clip_dir))
    assert main([*args, "--text-window", "0.5", "0.2"]) == 2
    assert "START < END" in capsys.readouterr().err
    assert main([*args[:2], str(tmp_path / "none.ckpt"), *args[3:]]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "--scheduler", "nope"]) == 2
    assert "karras" in capsys.readouterr().err  # lists ComfyUI's schedulers
    images, _ = dataset
    edit = ["edit", "--image", str(images / "chelsea.png"), "--source", "a", "--edit", "b", "--out",
            str(tmp_path / "e.png")]
    not_a_checkpoint = tiny.WEIGHTS / "taesd" / "taesd_decoder.safetensors"
    assert main([*edit, "--checkpoint", str(not_a_checkpoint)]) == 2
    assert "pass a full SD1.x or SDXL checkpoint" in capsys.readouterr().err
    assert main([*edit[:2], str(tmp_path / "none.png"), *edit[3:], "--checkpoint", str(checkpoint)]) == 2
    assert "none.png does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    for text, message in (("file,caption\n", "image,source,edit"), ("image,source,edit\n", "no images"),
                          ("image,source,edit\nchelsea.png,a cat,\n", "line 2"),
                          ("image,source,edit\nmissing.png,a,b\n", "missing.png"),
                          ("image,source,edit\nchelsea.png,a,b\nchelsea.jpg,a,b\n", "same name stem")):
        bad.write_text(text)
        with pytest.raises(SetupError, match=message):
            ev.read_captions(bad, images)


def test_needs_the_checkout(tmp_path, monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, pipeline.PACK)
    with pytest.raises(SetupError, match=r"pip install -e \."):
        pipeline.load_pack(tmp_path)
    assert pipeline.PACK not in sys.modules


def test_resize_and_crop(dataset):
    images, _ = dataset
    assert load_photo(images / "chelsea.png").shape == (1, 64, 64, 3)  # 68 -> 64: 2 px cut on each side
    assert load_photo(images / "chelsea.png", resize=36).shape == (1, 32, 32, 3)  # 38x36 -> 32x32
    full = load_photo(images / "chelsea.png")
    raw = torch.from_numpy(np.asarray(Image.open(images / "chelsea.png"), dtype="float32") / 255)
    assert torch.equal(full[0], raw[:, 2:66])  # centred


# --- (3) metrics against hand computations ----------------------------------------------------------------------------

def hand_clip(folder, images, texts):
    """CLIP embeddings computed by hand: CLIP's normalisation of 32 px images, the towers and their projections."""
    from transformers import CLIPModel, CLIPTokenizer

    model, tok = CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    pixels = torch.stack([(i[0].movedim(-1, 0) - mean) / std for i in images])
    ids = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        e_i = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        e_t = model.text_projection(model.text_model(input_ids=ids["input_ids"],
                                                     attention_mask=ids["attention_mask"]).pooler_output)
    return e_i, e_t


def photo32(flip=False):
    img = torch.from_numpy(np.asarray(Image.fromarray(
        (tiny.photo(helpers.CLIP_SIZE)[0].numpy() * 255).round().astype("uint8")), dtype="float32") / 255)[None]
    return img.flip(2) if flip else img


def test_clip_metrics_match_hand_computation(models, clip_dir):
    src, edit = photo32(), photo32(flip=True)
    texts = ["an astronaut", "a robot in space"]
    h_i, h_t = hand_clip(clip_dir, [src, edit], texts)
    clip = ClipEmbedder(clip_dir)
    assert torch.allclose(clip.images([src, edit]), h_i, atol=1e-4)
    scorer = ev.Metrics(clip, [LPIPS_DIR]).for_image(src, *texts)
    row = scorer.row(edit)
    cos = torch.nn.functional.cosine_similarity(h_i[1], h_t[1], dim=0).item()
    assert cos > 0.01  # the clamp at 0 does not hide the comparison
    assert row["clip_score"] == pytest.approx(max(100 * cos, 0.0), abs=1e-3)
    want_dir = torch.nn.functional.cosine_similarity(h_i[1] - h_i[0], h_t[1] - h_t[0], dim=0).item()
    assert row["clip_dir"] == pytest.approx(want_dir, abs=1e-4)
    assert abs(want_dir) > 1e-3  # not trivially zero
    no_proc = helpers.make_clip(clip_dir.parent / "clip_no_processor", processor=False)
    assert torch.allclose(ClipEmbedder(no_proc).images([src]), h_i[:1], atol=1e-4)  # CLIP's defaults from config


def test_psnr_and_lpips_rows(models, clip_dir):
    src = photo32().repeat(1, 2, 2, 1)  # 64x64, 8-bit values
    sign = torch.where(src < 0.5, 1.0, -1.0)
    scorer = ev.Metrics(ClipEmbedder(clip_dir), [LPIPS_DIR]).for_image(src, "a", "b")
    row = scorer.row(src + sign * 4 / 255)  # every value off by 4 levels: PSNR = 20 log10(255 / 4)
    assert row["psnr"] == pytest.approx(20 * math.log10(255 / 4), abs=1e-3)
    assert scorer.row(src)["lpips"] == pytest.approx(0.0, abs=1e-6)
    flipped = src.flip(2)
    lp = scorer.row(flipped)["lpips"]
    alex = get_lpips("alex", search_dirs=[LPIPS_DIR], allow_download=False)
    by_hand = lpips_distance(alex, flipped.movedim(-1, 1), src.movedim(-1, 1)).item()
    assert lp > 0.05 and lp == pytest.approx(by_hand, rel=1e-5)
