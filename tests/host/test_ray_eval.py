"""Host tier: ``psedit eval --ray`` on a local Ray with 2 CPU workers (started by these tests, stopped after) and tiny
models (tiny SD1.5 UNet, the real TAESD, a fake text encoder, a tiny CLIP). Its output folder equals the
single-process run's file for file, byte for byte; a worker killed mid-photo loses no row and duplicates none; an
interrupted run finishes when run again; a missing Ray, an unreachable address and a worker that cannot load
ComfyUI or the checkpoint are errors that name the fix, with nothing written as done."""

from __future__ import annotations

import csv
import functools
import os
import socket
import sys
from collections import Counter
from pathlib import Path

import pytest
import tiny
import torch

try:
    tiny.load_pack()
except tiny.ComfyUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

ray = pytest.importorskip("ray", reason='needs Ray: pip install "psedit[ray]"')

import cli_helpers as helpers  # noqa: E402

from psedit_cli import distributed, pipeline  # noqa: E402
from psedit_cli import evaluate as ev  # noqa: E402
from psedit_cli.errors import SetupError  # noqa: E402
from psedit_cli.main import main  # noqa: E402

HOST_TESTS = Path(__file__).resolve().parent
LPIPS_DIR = tiny.WEIGHTS / "lpips"
QUICK = ["--steps", "3", "--inner-iterations", "2", "--refine", "1", "--text-window", "0", "0.5",
         "--perceptual-window", "0.3", "1", "--lpips-dir", str(LPIPS_DIR)]

# The loaders below travel to the workers by value (their module is a test file, not importable there); what they
# use (tiny, cli_helpers, psedit_cli) is imported there from PYTHONPATH.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tiny_models(path, kill_on: str | None = None, marker: str | None = None) -> pipeline.Models:
    """The checkpoint loader handed to the workers (``path`` is never read): the CLI tests' tiny models. With
    ``kill_on``, the worker process dies the first time it encodes that caption (``marker`` records that it did)."""
    if tiny.taesd_vae("sd15") is None or not (LPIPS_DIR / "alexnet_features.pth").is_file():
        raise SetupError("needs the real TAESD and LPIPS trunks in ../shared/weights")
    tiny.register_shared_weights()
    encode = functools.partial(_encode_or_die, kill_on, marker) if kill_on else helpers.fake_encode
    return pipeline.Models(tiny.build_tiny("sd15"), tiny.taesd_vae("sd15"), encode)


def _encode_or_die(kill_on: str, marker: str, text: str):
    if text == kill_on and not Path(marker).exists():
        Path(marker).touch()
        os._exit(1)  # as a kill -9 or the OOM killer would: no exception, no cleanup
    return helpers.fake_encode(text)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    if tiny.taesd_vae("sd15") is None or not (LPIPS_DIR / "alexnet_features.pth").is_file():
        pytest.skip("needs the real TAESD and LPIPS trunks in ../shared/weights")
    root = tmp_path_factory.mktemp("ray_inputs")
    images, captions = helpers.make_dataset(root / "data")
    checkpoint = root / "tiny.safetensors"
    checkpoint.write_bytes(b"")  # never read: the loader builds the tiny models
    return {"images": images, "captions": captions, "clip": helpers.make_clip(root / "clip"), "checkpoint": checkpoint}


def argv(inputs, out, *extra) -> list[str]:
    return ["eval", "--checkpoint", str(inputs["checkpoint"]), "--images", str(inputs["images"]), "--captions",
            str(inputs["captions"]), "--clip", str(inputs["clip"]), "--out", str(out), *QUICK, *extra]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The single-process run's output folder, computed with one torch thread: Ray gives each CPU worker one
    (OMP_NUM_THREADS=1), and a CPU's float reductions, so the edits' last bits, depend on the thread count."""
    out = tmp_path_factory.mktemp("reference") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pipeline, "load_checkpoint", tiny_models)
            assert main(argv(inputs, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs: two workers; they find tests/host on their PYTHONPATH. They inherit OMP_NUM_THREADS=2,
    as from a researcher's shell (Ray then keeps it), so each worker must take its one thread itself."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HOST_TESTS), os.environ.get("PYTHONPATH")])))
        mp.setenv("OMP_NUM_THREADS", "2")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        yield ray
        ray.shutdown()


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def keys(out: Path) -> list[tuple[str, str]]:
    with (out / "results.csv").open(newline="") as f:
        return [(r["image"], r["config"]) for r in csv.DictReader(f)]


def assert_same_run(out: Path, reference: Path) -> None:
    """Every file (results.csv, table.md/csv, run.json, the edits, the grids) byte for byte, and each row once."""
    assert Counter(keys(out)) == Counter({(s, c): 1 for s in helpers.PHOTOS for c in pipeline.CONFIGS})
    got, want = files(out), files(reference)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []


# --- (1) the same table -----------------------------------------------------------------------------------------------

def test_ray_run_equals_single_process_run(local_ray, inputs, reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "load_checkpoint", tiny_models)
    out = tmp_path / "out"
    assert main(argv(inputs, out, "--ray")) == 0
    assert "Perceptual + text optimization" in capsys.readouterr().out
    assert_same_run(out, reference)


# --- (2) a worker killed mid-photo ------------------------------------------------------------------------------------

def test_worker_killed_mid_photo_loses_and_duplicates_no_row(local_ray, inputs, reference, tmp_path, monkeypatch,
                                                             caplog):
    marker = tmp_path / "killed"
    monkeypatch.setattr(pipeline, "load_checkpoint", functools.partial(tiny_models, kill_on="a cat",
                                                                       marker=str(marker)))
    out = tmp_path / "out"
    assert main(argv(inputs, out, "--ray")) == 0
    assert marker.exists()  # chelsea's worker died while inverting it
    assert any("chelsea: its Ray worker died" in r.getMessage() for r in caplog.records)
    assert_same_run(out, reference)


# --- (3) interrupted, then resumed ------------------------------------------------------------------------------------

def test_interrupted_ray_run_resumes(local_ray, inputs, reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "load_checkpoint", tiny_models)
    out = tmp_path / "out"
    # Ctrl-C in the driver right after the first photo's rows are written (before its grid); the other photo is
    # still being edited on its worker
    monkeypatch.setattr(ev, "write_grid", helpers.Counter(ev.write_grid, interrupt_on=1))
    assert main(argv(inputs, out, "--ray")) == 130
    assert "run the same command again" in capsys.readouterr().err
    first = keys(out)
    assert len(first) == 3 and len({image for image, _ in first}) == 1
    assert not (out / "table.md").exists()

    monkeypatch.setattr(ev, "write_grid", helpers.Counter(ev.write_grid.fn))
    assert main(argv(inputs, out, "--ray")) == 0
    assert ev.write_grid.calls == 2  # the grid the interruption missed, and the other photo's
    assert_same_run(out, reference)


# --- (4) errors -------------------------------------------------------------------------------------------------------

def assert_nothing_done(out: Path) -> None:
    """No row and no image: at most the settings (run.json) and a results.csv with its header only."""
    rows = keys(out) if (out / "results.csv").is_file() else []
    assert rows == [] and list(out.rglob("*.png")) == []


def test_worker_without_comfyui_or_checkpoint(local_ray, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "load_checkpoint", tiny_models)
    out = tmp_path / "out"
    assert main(argv(inputs, out, "--ray", "--workers", "1", "--comfyui", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "Ray worker on" in err and "is not a ComfyUI checkout" in err and "COMFYUI_PATH" in err
    assert_nothing_done(out)

    monkeypatch.undo()  # the real checkpoint loader, on a file that is no checkpoint
    not_a_checkpoint = tiny.WEIGHTS / "taesd" / "taesd_decoder.safetensors"
    args = argv(inputs, out, "--ray", "--workers", "1")
    args[args.index("--checkpoint") + 1] = str(not_a_checkpoint)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Ray worker on" in err and "pass a full SD1.x or SDXL checkpoint" in err
    assert_nothing_done(out)


def test_missing_ray_and_unreachable_address(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "ray", None)  # as if it were not installed
        assert main(argv(inputs, out, "--ray")) == 2
        assert 'pip install "psedit[ray]"' in capsys.readouterr().err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # even while the tests' own Ray runs
    assert main(argv(inputs, out, "--ray", f"127.0.0.1:{port}")) == 2
    err = capsys.readouterr().err
    assert f"Ray at 127.0.0.1:{port} is unreachable" in err and "ray start --head" in err
    assert main(argv(inputs, out, "--ray", "host:port")) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert not out.exists()  # nothing was written


def test_workers_per_device():
    assert distributed.plan_workers({"CPU": 2.0}, None, photos=5) == (2, 0)  # a CPU slot each
    assert distributed.plan_workers({"CPU": 64.0, "GPU": 8.0}, None, photos=700) == (8, 1)  # a GPU each
    assert distributed.plan_workers({"CPU": 64.0, "GPU": 8.0}, None, photos=3) == (3, 1)  # no idle workers
    assert distributed.plan_workers({"CPU": 64.0, "GPU": 8.0}, 2, photos=700) == (2, 1)
    with pytest.raises(SetupError, match="has 8 GPUs"):
        distributed.plan_workers({"CPU": 64.0, "GPU": 8.0}, 9, photos=700)
    assert distributed.parse_address("ray://head") == ("head", 10001)
    assert distributed.parse_address("10.0.0.1:6380") == ("10.0.0.1", 6380)
    assert distributed.parse_address("head") == ("head", 6379)
