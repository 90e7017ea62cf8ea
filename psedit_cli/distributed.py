"""``psedit eval --ray``: the sequential run of :mod:`psedit_cli.evaluate`, its photos spread over Ray workers.

One task per photo: a worker inverts it once and runs each configuration left on that inversion
(:func:`psedit_cli.evaluate.edit_photo`, the sequential run's own function). A worker is an actor on one device, a
GPU (``num_gpus=1``) or, on a cluster without GPUs, a CPU slot; it loads ComfyUI, the checkpoint, CLIP and LPIPS
once and then edits photo after photo.

The driver (the ``psedit`` process) is the only writer. It keeps one photo in flight per worker and, as each one
finishes (``ray.wait``), writes its images and rows with the sequential run's functions, one result at a time, so
``results.csv``, resuming, the grids and the tables are the sequential run's. A worker that dies mid-photo (killed,
out of memory, its machine gone) has written nothing: it is replaced and the photo submitted again, up to
:data:`MAX_ATTEMPTS` times. Ray is imported here only, and only with ``--ray``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter, deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from . import evaluate as ev
from .errors import SetupError
from .main import LOCAL_RAY
from .pipeline import CONFIGS, REPO, Settings

log = logging.getLogger(__name__)

LOCAL = LOCAL_RAY  # --ray without an address: start a Ray on this machine
MAX_ATTEMPTS = 3  # a photo whose worker dies this often stops the run (its cause is the photo, not bad luck)
CONNECT_TIMEOUT_S = 5.0
DEFAULT_PORTS = {"": 6379, "ray://": 10001}  # a head node's GCS, Ray Client's server
INSTALL = 'pip install "psedit[ray]"'


# --- what a worker needs ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker loads, as absolute paths (a worker's working directory is not the command's).

    ``loader`` turns the checkpoint path into :class:`psedit_cli.pipeline.Models` (``pipeline.load_checkpoint``);
    Ray pickles it (a module-level function by reference), so its module must import on the workers (the tests hand
    in tiny models this way).
    ``comfyui`` None: each worker uses its own ``COMFYUI_PATH``.
    """

    comfyui: str | None
    checkpoint: str
    clip: str
    lpips_dirs: tuple[str, ...]
    scheduler: str
    loader: Callable
    log_level: int = logging.WARNING

    @classmethod
    def from_args(cls, args, loader: Callable) -> WorkerSpec:
        comfyui = args.comfyui or os.environ.get("COMFYUI_PATH")
        return cls(comfyui=_absolute(comfyui) if comfyui else None, checkpoint=_absolute(args.checkpoint),
                   clip=_absolute(args.clip), lpips_dirs=tuple(_absolute(d) for d in args.lpips_dir),
                   scheduler=args.scheduler, loader=loader,
                   log_level=logging.INFO if args.verbose else logging.WARNING)


def _absolute(path) -> str:
    return str(Path(path).expanduser().resolve())


class EvalWorker:
    """A Ray actor on one device: :meth:`setup` loads ComfyUI, the checkpoint, CLIP and LPIPS once; :meth:`edit`
    then runs one photo per call.

    Loading is a method rather than ``__init__`` so that its errors come back to the driver as the exceptions they
    are (a :class:`SetupError` naming the fix), not as a dead actor with a traceback in its message.
    """

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.models = self.metrics = None

    def setup(self) -> str:
        """Load everything; returns where this worker runs (host and device)."""
        import torch

        from . import main as cli
        from .clip_metrics import ClipEmbedder

        logging.basicConfig(level=self.spec.log_level, format="%(levelname)s %(message)s")
        lpips_dirs = cli.setup_host(self.spec.comfyui, self.spec.scheduler, self.spec.lpips_dirs)
        device = cli.torch_device()
        if device.type == "cpu":  # the worker holds one CPU slot (num_cpus=1): one torch thread, whatever
            torch.set_num_threads(1)  # OMP_NUM_THREADS it inherited (Ray sets 1 only where the driver set none)
        self.metrics = ev.Metrics(ClipEmbedder(self.spec.clip, device=device), lpips_dirs, device=device)
        self.models = self.spec.loader(self.spec.checkpoint)
        return f"{socket.gethostname()} ({_device_name(device)}, pid {os.getpid()})"

    def edit(self, item: ev.Item, todo: list[str], settings: Settings) -> list[ev.Edit]:
        """One photo: its edits (images and rows) for the configurations in ``todo``; writes nothing."""
        return list(ev.edit_photo(self.models, item, todo, settings, self.metrics))


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device}, {torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    return f"{device}, {threads} torch thread{'s' if threads > 1 else ''}"


# --- Ray: import, connect, size the pool ------------------------------------------------------------------------------

def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise SetupError(f"--ray needs Ray on this machine and every worker: {INSTALL} (or pip install ray)") from exc
    return ray


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``ray://HOST[:PORT]`` -> (host, port); Ray's default ports when none is given."""
    scheme = "ray://" if address.startswith("ray://") else ""
    rest = address[len(scheme):]
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host or (port and not port.isdigit()):
        raise SetupError(f"--ray {address!r}: pass 'auto', HOST:PORT (a head node's GCS, port 6379 by default), "
                         "ray://HOST:PORT (Ray Client), or --ray alone for a local Ray")
    return host, int(port) if port else DEFAULT_PORTS[scheme]


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail at once when nothing listens at ``address`` (``ray.init`` itself retries for minutes)."""
    if address in (LOCAL, "auto"):
        return
    host, port = parse_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise SetupError(f"Ray at {address} is unreachable ({exc}): start the cluster (`ray start --head` on its head "
                         "node), check the address and port, or pass --ray alone for a local Ray") from exc


def preflight(address: str) -> None:
    """Ray importable and, unless this process is connected already, something listening at ``address``."""
    ray = import_ray()
    if not ray.is_initialized():
        check_reachable(address)


@contextmanager
def session(address: str):
    """Ray, connected to ``address`` (``local``: started on this machine) and shut down afterwards; a Ray this
    process is already connected to (``ray.init`` called before, e.g. by a test) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        if address != LOCAL:
            log.warning("this process is already connected to a Ray; --ray %s is not used", address)
        log.info("using the Ray this process is connected to")
        yield ray
        return
    check_reachable(address)
    try:
        if address == LOCAL:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SetupError(f"cannot connect to Ray at {address} ({exc}): start the cluster (`ray start --head`), check "
                         "the address, or pass --ray alone for a local Ray") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def plan_workers(resources: dict, requested: int | None, photos: int) -> tuple[int, int]:
    """(how many workers, GPUs for each) from the cluster's resources: one per GPU, or one per CPU slot on a cluster
    without GPUs; ``requested`` (``--workers``) at most that, and never more workers than photos to do."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    slots, kind = (gpus, "GPUs") if gpus else (cpus, "CPUs")
    if slots < 1:
        raise SetupError("the Ray cluster has neither GPUs nor CPUs to run workers on")
    if requested is not None and requested > slots:
        raise SetupError(f"--workers {requested}: the Ray cluster has {slots} {kind}, one per worker; pass at most "
                         f"{slots}")
    return min(requested or slots, photos), 1 if gpus else 0


def worker_env() -> dict:
    """The workers' runtime environment: this checkout first on their ``PYTHONPATH`` (then this process's), so
    that they import the same ``psedit_cli`` (the path must exist there: same layout on every machine)."""
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


# --- the workers ------------------------------------------------------------------------------------------------------

class Pool:
    """The actors, one per device, each started and set up once; a dead one is replaced by :meth:`replace`."""

    def __init__(self, ray, spec: WorkerSpec, gpus: int):
        self.ray, self.spec, self.actors = ray, spec, []
        self.actor_class = ray.remote(EvalWorker).options(num_cpus=1, num_gpus=gpus, max_restarts=0,
                                                          runtime_env=worker_env())

    def start(self, count: int) -> None:
        """Start ``count`` workers and wait until each has loaded everything (the first error stops the run)."""
        log.info("starting %d Ray workers", count)
        refs = [self._new()[1] for _ in range(count)]
        for ref in refs:
            log.info("Ray worker ready on %s", self.ready(ref))

    def _new(self):
        """A new worker and the ref of its setup (not waited for)."""
        actor = self.actor_class.remote(self.spec)
        self.actors.append(actor)
        return actor, actor.setup.remote()

    def ready(self, setup_ref) -> str:
        """Where the worker of ``setup_ref`` runs, once it is set up; its error, as a :class:`SetupError`, if not."""
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(setup_ref)
        except exceptions.RayTaskError as exc:
            cause = _cause(exc)
            raise SetupError(f"Ray worker on {getattr(exc, 'ip', '?')}: {cause}") from exc
        except exceptions.RayError as exc:
            raise SetupError(f"a Ray worker died while loading ComfyUI and the checkpoint ({_first_line(exc)}): "
                             "see its log (out of memory?)") from exc

    def replace(self, actor):
        """A new worker in place of ``actor`` (dead, or killed here): (the new actor, its setup's ref)."""
        self._kill(actor)
        self.actors.remove(actor)
        return self._new()

    def close(self) -> None:
        for actor in self.actors:
            self._kill(actor)
        self.actors = []

    def _kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception as exc:  # already gone: nothing to stop
            log.debug("killing a Ray worker: %s", exc)


def _cause(exc) -> BaseException:
    """The exception a worker raised, without Ray's wrapper (so the command shows its message)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Exception) else exc


def _first_line(exc) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _retryable(ray) -> tuple[type, ...]:
    """The errors of a worker that died (not of the photo's own code): the photo is submitted again."""
    e = ray.exceptions
    return tuple(getattr(e, name) for name in ("RayActorError", "WorkerCrashedError", "OutOfMemoryError",
                                               "ObjectLostError", "NodeDiedError") if hasattr(e, name))


# --- the run ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One photo to do: the configurations it lacks."""

    item: ev.Item
    todo: tuple[str, ...]


def evaluate_on_ray(spec: WorkerSpec, items: list[ev.Item], out: Path, settings: Settings, address: str = LOCAL,
                    workers: int | None = None, progress=None) -> list[dict]:
    """:func:`psedit_cli.evaluate.evaluate` over Ray workers: the same files, rows written here as photos finish,
    resumable the same way; returns every row of ``items``."""
    preflight(address)  # before anything is written
    results = ev.open_run(out, settings)
    jobs = []
    for item in items:
        todo = ev.todo_for(results, item)
        ev.advance(progress, len(CONFIGS) - len(todo))
        if todo:
            jobs.append(Job(replace(item, image=Path(_absolute(item.image))), tuple(todo)))
        elif not ev.has_grid(item, out):
            ev.write_grid(item, out, settings)

    def write(job: Job, edits: list[ev.Edit]) -> None:
        for edit in edits:
            ev.write_edit(job.item, edit, out, results)
        ev.advance(progress, len(edits))
        ev.write_grid(job.item, out, settings)

    if jobs:
        with session(address) as ray:
            count, gpus = plan_workers(ray.cluster_resources(), workers, len(jobs))
            pool = Pool(ray, spec, gpus)
            try:
                pool.start(count)
                run_jobs(ray, pool, jobs, settings, write)
            finally:
                pool.close()
    return ev.finish(items, out, results)


def run_jobs(ray, pool: Pool, jobs: list[Job], settings: Settings, write: Callable[[Job, list], None]) -> None:
    """Keep each worker busy with one photo and hand each finished photo to ``write``, here, one at a time. A
    worker that dies is replaced and its photo queued again (it wrote nothing); a photo that fails on its own
    (a Python error in the method) stops the run with that error."""
    queue, idle = deque(jobs), list(pool.actors)
    tasks, setups, deaths = {}, {}, Counter()
    retryable = _retryable(ray)
    while queue or tasks:
        while idle and queue:
            actor, job = idle.pop(), queue.popleft()
            tasks[actor.edit.remote(job.item, list(job.todo), settings)] = (actor, job)
        if not tasks and not setups:
            raise SetupError("no Ray worker is left to run the remaining photos")
        [ref], _ = ray.wait([*tasks, *setups], num_returns=1)
        if ref in setups:
            log.info("replacement Ray worker ready on %s", pool.ready(ref))
            idle.append(setups.pop(ref))
            continue
        actor, job = tasks.pop(ref)
        try:
            edits = ray.get(ref)
        except retryable as exc:
            deaths[job.item.stem] += 1
            if deaths[job.item.stem] >= MAX_ATTEMPTS:
                raise SetupError(f"{job.item.image.name}: its Ray worker died {MAX_ATTEMPTS} times "
                                 f"({_first_line(exc)}); every other photo's rows are kept. Look at the worker "
                                 "logs (out of memory?), then run the same command again") from exc
            log.warning("%s: its Ray worker died (%s); starting a new worker and running the photo again",
                        job.item.stem, _first_line(exc))
            queue.appendleft(job)
            new, setup_ref = pool.replace(actor)
            setups[setup_ref] = new
            continue
        except ray.exceptions.RayTaskError as exc:
            cause = _cause(exc)
            if cause is exc:
                raise
            raise cause from exc
        write(job, edits)
        idle.append(actor)
