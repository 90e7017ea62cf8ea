"""Wall time of ``psedit eval`` on N photos, single process and with ``--ray`` on 1 and 2 local workers.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/ray_eval.py [--photos 4] [--workers 1 2] [--size 128] [--steps 10]

Each ``--ray`` run is the command as a user runs it: it starts a local Ray, starts its workers (each loads ComfyUI,
the checkpoint, CLIP and LPIPS), edits, and shuts Ray down. The models are the host tests' tiny ones (tiny SD1.5
UNet with random weights, the real TAESD, a fake text encoder, a tiny CLIP: ``tests/host/tiny.py``,
``tests/host/cli_helpers.py``), the photos scikit-image's, scaled to ``--size`` px. Every run's output folder must
equal the single-process run's byte for byte (checked). Needs ``pip install -e ".[cli,ray]"``.

Reported per run: the wall time, the part spent editing once every worker was ready, and the speed-up over one
worker. Expected scaling (``README``, *Many GPUs with Ray*): a run costs ``start + ceil(photos / workers) x photo``,
where ``photo`` (inversion + each configuration + metrics) is per photo and ``start`` (Ray, a worker process,
ComfyUI, the checkpoint, CLIP and LPIPS loaded once) is per worker, paid in parallel. Editing scales with the
workers while there are at least as many photos as workers and each has its own device; on CPUs the workers share
the machine's cores (one torch thread each), so two workers gain only with two free cores.
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import os
import time
from pathlib import Path

from _common import REPO, device_name, table, tiny  # puts the repository and tests/host on sys.path

# isort: split
import cli_helpers as helpers

from psedit_cli import distributed, pipeline
from psedit_cli.main import main

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image photos, flipped for a second round
LPIPS_DIR = tiny.WEIGHTS / "lpips"


def tiny_models(path) -> pipeline.Models:
    """The checkpoint loader every worker gets (``path`` is never read); defined here, it travels by value."""
    tiny.register_shared_weights()
    return pipeline.Models(tiny.build_tiny("sd15"), tiny.taesd_vae("sd15"), helpers.fake_encode)


def make_photos(folder: Path, n: int, size: int) -> tuple[Path, Path]:
    """``n`` photos (``size`` px square) and their captions.csv."""
    from PIL import Image
    from skimage import data

    images = folder / "images"
    images.mkdir(parents=True)
    lines = ["image,source,edit"]
    for k in range(n):
        name = PHOTOS[k % len(PHOTOS)]
        img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), Image.LANCZOS)
        if k >= len(PHOTOS):
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(images / f"{name}_{k}.png")
        lines.append(f"{name}_{k}.png,a photo of a {name},a painting of a {name}")
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return images, folder / "captions.csv"


class EditTimer:
    """Wraps ``distributed.run_jobs`` (called once every worker is ready) to time the editing alone."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds = time.perf_counter() - start


def run(argv: list[str]) -> float:
    start = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"psedit {' '.join(argv)} failed")
    return time.perf_counter() - start


def same_folders(a: Path, b: Path) -> bool:
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    other = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    return files == other and filecmp.cmpfiles(a, b, files, shallow=False)[0] == files


def main_bench() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--size", type=int, default=128, help="photo side in px")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--inner-iterations", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "bench_out" / "ray_eval")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tiny.import_comfy()
    if tiny.taesd_vae("sd15") is None:
        raise SystemExit(f"needs the real TAESD and LPIPS trunks in {tiny.WEIGHTS}")
    # workers import tiny / cli_helpers: put tests/host on the PYTHONPATH the local Ray hands them
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests" / "host"),
                                                             os.environ.get("PYTHONPATH")]))
    pipeline.load_checkpoint = tiny_models
    timer = distributed.run_jobs = EditTimer(distributed.run_jobs)

    root = a.out / f"{a.photos}x{a.size}px_{a.steps}steps_{int(time.time())}"
    images, captions = make_photos(root / "data", a.photos, a.size)
    clip = helpers.make_clip(root / "clip")
    checkpoint = root / "tiny.safetensors"
    checkpoint.write_bytes(b"")
    common = ["eval", "--checkpoint", str(checkpoint), "--images", str(images), "--captions", str(captions),
              "--clip", str(clip), "--steps", str(a.steps), "--inner-iterations", str(a.inner_iterations),
              "--lpips-dir", str(LPIPS_DIR)]

    rows = [{"run": "single process", "wall": run([*common, "--out", str(root / "single")])}]
    for n in a.workers:
        out = root / f"ray_{n}"
        wall = run([*common, "--out", str(out), "--ray", "--workers", str(n)])
        rows.append({"run": f"--ray, {n} worker{'s' if n > 1 else ''}", "workers": n, "wall": wall,
                     "editing": timer.seconds, "same": "yes" if same_folders(out, root / "single") else "NO"})
    base = next((r for r in rows if r.get("workers") == 1), None)
    for r in rows[1:]:
        if base:
            r["speedup"], r["edit_speedup"] = base["wall"] / r["wall"], base["editing"] / r["editing"]

    print(f"\npsedit eval, {a.photos} photos x {len(pipeline.CONFIGS)} configurations, {a.size} px, {a.steps} steps, "
          f"{a.inner_iterations} null-text iterations, tiny SD1.5 UNet + TAESD; {device_name()}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print(table(rows, [("run", "run", "s"), ("wall", "wall s", ".1f"), ("editing", "editing s (workers ready)", ".1f"),
                       ("speedup", "wall speed-up vs 1 worker", ".2f"),
                       ("edit_speedup", "editing speed-up vs 1 worker", ".2f"),
                       ("same", "files = single process", "s")]))
    print(f"\noutputs in {root}")

if __name__ == "__main__":
    main_bench()
