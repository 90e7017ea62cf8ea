"""Shared benchmark plumbing: ComfyUI as a library, tiny/full models from tests/host/tiny.py, timing, peak memory."""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "host"))
sys.path.insert(0, str(REPO))

import tiny  # noqa: E402, F401  (re-exported; needs the path above)


def memory_note() -> str:
    return "peak = CUDA allocator peak above the start" if torch.cuda.is_available() else "peak = process RSS peak"


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}"


class PeakMemory:
    """Peak memory during a block: on a GPU the CUDA allocator's peak above the block's start; on the CPU the
    process's peak resident set size (absolute, polled every few ms), since the allocator keeps freed memory.
    ``extra_mb`` is the peak above the block's start on either device."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb, self.extra_mb = interval, 0.0, 0.0

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import psutil

        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self._peak = max(self._peak, self._proc.memory_info().rss)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            self.extra_mb = self.peak_mb
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.peak_mb = self._peak / 2**20
            self.extra_mb = (self._peak - self._base) / 2**20
        return False


@contextmanager
def timed(result: dict, key: str = "seconds"):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    result[key] = time.perf_counter() - t


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; ``columns`` = (key, header, format); a missing or None value leaves the cell empty."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if r.get(k) is not None else "" for k, _, f in columns) + " |"
            for r in rows]
    return "\n".join([head, rule, *body])


WEIGHTS_NOTE = "decoded through the real TAESD (../shared/weights) when COMFYUI_PATH is set"
