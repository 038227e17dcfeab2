"""Run any per-image job on Ray: shards go to a pool of Ray actors, each of which builds the job's worker once.

Each actor builds the job's worker (models loaded once per actor: one GPU each, or CPU threads) and labels
whole shards; the driver hands each actor its next shard as one finishes, and writes each finished shard
into the job directory as it arrives, so the driver's memory does not grow with the dataset and a killed
job resumes from its finished shards. Only plain data crosses actor boundaries: a shard travels as JSON text
and comes back as JSON text; the worker's constructor arguments travel with the actor (no object store), so
a replacement actor can always be built.

On a cluster:

- **Weights on the workers' nodes.** Workers get model names and paths (``omnilabel.models.registry``
  ``WeightRef``) and find them on their own node; nothing of the driver's file system is assumed.
- **Start-up failures are one line.** An actor whose worker cannot be built (missing weights, no CUDA, a
  bad teacher file) reports its error, with its node, and the job stops at once with ``WorkerStartError``:
  that message, no Ray traceback (the worker's traceback is its cause, which ``--debug`` shows).
- **Nodes come and go.** An actor that dies (its process crashed, its node was removed) is replaced, and its
  shards go back to the queue for any live actor; a shard is retried ``MAX_RETRIES`` times. A shard whose
  worker raises (a bug, not a lost node) has its images recorded as failed and the job goes on.
- **Threads and priority.** Each actor reserves a share of the cluster's CPUs (``worker_resources``) and
  runs as many torch, OpenMP and MKL threads as Ray gave it, set before torch starts its pools, so workers
  never oversubscribe a node. The local Ray that omnilabel starts runs its workers at normal priority (Ray's
  default is nice 15, which lets any busy process starve them); an actor that finds itself niced says so.
- **Only omnilabel speaks.** Ray's own log lines on the driver go to ``omnilabel-driver.log`` in Ray's log
  folder of the session (``ray_log_path``), not to the console.

This module and ``omnilabel.jobs.ray_train`` are the only ones that import ray. Any job whose worker is
``Worker(*args)(tasks) -> records`` (``pseudomask``, ``predict``) runs through ``run_on_ray``.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import logging
import logging.handlers
import math
import os
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from omnilabel.errors import JobError, OmnilabelError
from omnilabel.events import OnEvent, emit
from omnilabel.jobs.options import JobOptions

#: CPUs each Ray Train worker reserves on a CPU-only run: a fraction, so that N workers fit on N cores beside
#: Ray Train's own actors. With ``cuda`` a worker reserves 1 CPU and 1 GPU.
WORKER_CPUS = 0.5
#: Times a shard is retried after the actor running it died (and times a Ray Train worker group restarts).
MAX_RETRIES = 2
#: Shards given to one actor at a time (the next one waits in its queue while it labels the first).
SHARDS_IN_FLIGHT = 2
#: The thread-count environment variables an actor sets before torch starts its pools.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: Connections tried to a ``ray://`` address whose client server fails to start a server for this client.
CLIENT_ATTEMPTS = 3
#: Where Ray's own driver-side log lines go, in Ray's log folder of the session.
DRIVER_LOG = "omnilabel-driver.log"


class WorkerStartError(JobError):
    """A Ray worker could not build its models; the message is the worker's own, with its node."""


class RemoteTraceback(Exception):
    """The traceback of an error raised in a Ray worker (the cause of a ``WorkerStartError``)."""


def worker_resources(job: JobOptions) -> dict[str, float]:
    """What one Ray Train worker of ``job`` reserves from Ray (see ``WORKER_CPUS``)."""
    return {"CPU": 1.0, "GPU": 1.0} if job.gpu else {"CPU": WORKER_CPUS}


def actor_resources(job: JobOptions, n_actors: int) -> dict[str, float]:
    """What one per-image actor reserves: the cluster's CPUs shared evenly among ``n_actors``, at most the
    CPUs of the smallest node (so an actor fits on any node), plus one GPU under ``cuda``.

    Raises:
        JobError: ``cuda`` was asked for and the cluster has no GPU.
    """
    import ray

    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = [float(r.get("CPU", 0)) for r in alive if r.get("CPU", 0) > 0]
    total = sum(cpus) or 1.0
    share = min(total / max(n_actors, 1), min(cpus) if cpus else 1.0)
    share = math.floor(share) if share >= 1 else round(share, 2)
    if not job.gpu:
        return {"CPU": max(share, 0.01)}
    gpus = sum(float(r.get("GPU", 0)) for r in alive)
    if gpus < 1:
        raise JobError(f"--device {job.device}: the Ray cluster has no GPU; use --device cpu")
    return {"CPU": max(share, 0.01), "GPU": 1.0}


def ray_log_path() -> Path:
    """Where this driver's Ray log lines go: Ray's log folder of the session (a temporary folder for a Ray
    client, whose session lives on the head node)."""
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None)
    folder = Path(node.get_logs_dir_path()) if node is not None else Path(tempfile.gettempdir()) / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / DRIVER_LOG


def _capture_ray_logging() -> logging.handlers.MemoryHandler:
    """Hold the log records Ray's start-up makes (``ray._private``: notices, warnings) away from the console
    until its log folder is known. (``ray.init`` clears the handlers of the ``ray`` logger itself.)"""
    logger = logging.getLogger("ray._private")
    buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    logger.addHandler(buffer)
    logger.propagate = False
    return buffer


def _send_ray_logging_to_file(buffer: logging.handlers.MemoryHandler) -> None:
    """From now on every ``ray`` log record of this process goes to ``ray_log_path``, the held ones first."""
    try:
        target: logging.Handler = logging.FileHandler(ray_log_path())
    except OSError:
        target = logging.NullHandler()
    target.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    buffer.setTarget(target)
    buffer.flush()
    private = logging.getLogger("ray._private")
    private.removeHandler(buffer)
    private.propagate = True
    logger = logging.getLogger("ray")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(target)
    logger.propagate = False
    _send_ray_messages_to_log()


def _send_ray_messages_to_log() -> None:
    """Ray's driver prints the cluster's error messages (a raylet that died, with its last log lines) to this
    process's stdout from a background thread; they go to the driver log instead. The job reports what it
    does about them itself (a lost worker is a warning). Ray's private hook: left alone if it is not there."""
    from ray._private import worker

    if not callable(getattr(worker, "print_to_stdstream", None)):
        return
    log = logging.getLogger("ray.driver_messages")

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            log.warning("(%s) %s", data.get("pid", "ray"), line)

    worker.print_to_stdstream = to_log


def init_ray(job: JobOptions) -> None:
    """Start (or join) Ray quietly: no dashboard, no log forwarding, Ray's log lines to its log folder.

    With no address, a new local Ray in this process (even where ``RAY_ADDRESS`` is set or ``ray start`` ran
    here) whose workers run at normal priority. ``ray://HOST:PORT`` connects as a Ray client.

    Raises:
        JobError: Ray cannot be started or reached.
    """
    import ray

    if ray.is_initialized():
        return
    buffer = _capture_ray_logging()
    client = job.address is not None and job.address.startswith("ray://")
    kwargs: dict[str, Any] = {"log_to_driver": False}
    if not client:
        kwargs.update(include_dashboard=False, configure_logging=False)
    for attempt in range(1, CLIENT_ATTEMPTS + 1):
        try:
            if job.address is None:
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 1),
                         _system_config={"worker_niceness": 0}, **kwargs)
            else:
                ray.init(address=job.address, **kwargs)
            break
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if client and attempt < CLIENT_ATTEMPTS and "client server failed" in str(exc).lower():
                # The head's client server starts one server process per client, and that start
                # sometimes fails on its own; a new connection gets a new one.
                ray.shutdown()
                continue
            _send_ray_logging_to_file(buffer)
            hint = ""
            if client and importlib.util.find_spec("grpc") is None:
                hint = " (a Ray client needs `pip install omnilabel[cluster]`)"
            raise JobError(f"cannot start or reach Ray at {job.address or 'a local instance'}: "
                           f"{one_line(exc)}{hint}") from exc
    _send_ray_logging_to_file(buffer)


def set_worker_threads(cpus: float) -> int:
    """Set this process's torch, OpenMP and MKL threads to the CPUs Ray gave it (at least 1); returns it."""
    threads = max(int(cpus), 1)
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)
    return threads


class _ShardActor:
    """One Ray actor: builds the worker once (keeping its error instead of dying), then runs shards."""

    def __init__(self, worker_factory: Callable[..., Any], worker_args: tuple, decode: Callable[[Any], Any]) -> None:
        import socket

        import ray

        assigned = ray.get_runtime_context().get_assigned_resources()
        self.info: dict[str, Any] = {"node": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                                     "pid": os.getpid(), "nice": os.nice(0),
                                     "threads": set_worker_threads(assigned.get("CPU", 1.0)), "error": None}
        self.decode = decode
        self.worker = None
        try:
            self.worker = worker_factory(*worker_args)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops the job with it
            self.info["error"] = {"message": str(exc) if isinstance(exc, OmnilabelError) else one_line(exc),
                                  "traceback": traceback.format_exc()}

    def ready(self) -> dict[str, Any]:
        return self.info

    def run(self, index: int, text: str) -> tuple[int, str]:
        tasks = [self.decode(t) for t in json.loads(text)]
        return index, json.dumps(self.worker(tasks), separators=(",", ":"))  # type: ignore[misc]


@dataclasses.dataclass
class _Slot:
    """One actor of the pool and what it is doing."""

    actor: Any
    ready_ref: Any
    info: dict[str, Any] | None = None
    running: set[int] = dataclasses.field(default_factory=set)


def run_on_ray(worker_factory: Callable[..., Any], worker_args: tuple, shards: dict[int, list[Any]], *,
               job: JobOptions, decode: Callable[[Any], Any], on_event: OnEvent | None = None
               ) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Label shards on a pool of Ray actors; yields ``(shard index, records)`` as shards finish (any order).

    Args:
        worker_factory: ``worker_factory(*worker_args)`` builds a worker; ``worker(tasks) -> records``.
        worker_args: picklable constructor arguments (small: they travel with each actor).
        shards: shard index → tasks (dataclasses of plain data with an ``image_id``).
        job: Ray address, workers, device.
        decode: turns one task's JSON dict back into a task.
        on_event: a ``worker`` event as each actor is up; ``warning`` events: a lost worker, a worker running
            at low priority.

    Raises:
        WorkerStartError: a worker could not build its models (the worker's message and node).
        JobError: Ray cannot start; a shard's actor died more than ``MAX_RETRIES`` times; no worker is left.
    """
    import ray

    init_ray(job)
    if not shards:
        return
    n_actors = max(1, min(job.workers, len(shards)))
    resources = actor_resources(job, n_actors)
    # Thread counts in the environment before the actor's process starts (before torch exists there); the
    # actor sets torch's own from what Ray assigned it.
    threads = {name: str(max(int(resources["CPU"]), 1)) for name in THREAD_ENV}
    remote = ray.remote(_ShardActor).options(num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0),
                                             max_restarts=0, max_concurrency=1,
                                             runtime_env={"env_vars": threads})
    queue = collections.deque(sorted(shards))
    attempts: collections.Counter[int] = collections.Counter()
    slots: list[_Slot] = []
    inflight: dict[Any, tuple[_Slot, int]] = {}
    replacements = MAX_RETRIES * n_actors
    niced_warned = False

    def start() -> _Slot:
        actor = remote.remote(worker_factory, worker_args, decode)
        slot = _Slot(actor, actor.ready.remote())
        slots.append(slot)
        return slot

    def feed(slot: _Slot) -> None:
        while queue and len(slot.running) < SHARDS_IN_FLIGHT:
            index = queue.popleft()
            text = json.dumps([dataclasses.asdict(t) for t in shards[index]], separators=(",", ":"))
            inflight[slot.actor.run.remote(index, text)] = (slot, index)
            slot.running.add(index)

    def lose(slot: _Slot, reason: str) -> None:
        nonlocal replacements
        slots.remove(slot)
        for ref in [r for r, (s, _) in inflight.items() if s is slot]:
            del inflight[ref]
        for index in sorted(slot.running):
            attempts[index] += 1
            if attempts[index] > MAX_RETRIES:
                raise JobError(f"shard {index} failed on Ray: its worker was lost {attempts[index]} times "
                               f"(last: {reason})")
            queue.appendleft(index)
        node = (slot.info or {}).get("node", "unknown node")
        emit(on_event, "warning", message=f"a Ray worker on {node} was lost ({reason}); its shards go to the others")
        ray.kill(slot.actor, no_restart=True)
        if replacements > 0:
            replacements -= 1
            start()
        live = [s for s in slots if s.info is not None]
        if not slots:
            raise JobError(f"every Ray worker was lost (last: {reason}); rerun the job to finish it")
        if not live:
            need = ", ".join(f"{v:g} {k}" for k, v in resources.items())
            emit(on_event, "warning", message=f"no Ray worker is running: the job goes on once Ray has started a "
                                              f"replacement (it needs {need} free on one node)")
        for s in live:
            feed(s)

    try:
        for _ in range(n_actors):
            start()
        while inflight or queue:
            waiting = [s.ready_ref for s in slots if s.info is None] + list(inflight)
            done, _ = ray.wait(waiting, num_returns=1)
            ref = done[0]
            if ref in inflight:
                slot, index = inflight.pop(ref)
                slot.running.discard(index)
                try:
                    got, text = ray.get(ref)
                    records = json.loads(text)
                except ray.exceptions.RayActorError as exc:
                    slot.running.add(index)
                    lose(slot, _actor_error(exc))
                    continue
                except ray.exceptions.RayTaskError as exc:
                    got, records = index, _failed_shard(shards[index], slot, exc)
                yield got, records
                feed(slot)
                continue
            slot = next(s for s in slots if s.ready_ref == ref)
            try:
                info = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                lose(slot, _actor_error(exc))
                continue
            if info["error"] is not None:
                error, node = info["error"], info["node"]
                message = str(error["message"]).removeprefix(f"node {node}: ")
                raise WorkerStartError(f"a Ray worker on node {node} could not start: {message}"
                                       ) from RemoteTraceback(error["traceback"])
            slot.info = info
            emit(on_event, "worker", **{k: info[k] for k in ("node", "node_id", "pid", "threads", "nice")})
            if info["nice"] > 0 and not niced_warned:
                niced_warned = True
                emit(on_event, "warning", message=(
                    f"Ray workers on {info['node']} run at nice {info['nice']}: any other busy process will starve "
                    "them. Start Ray's nodes with RAY_worker_niceness=0 (see docs/cluster.md)"))
            feed(slot)
    except ray.exceptions.RayError as exc:
        raise JobError(f"the job failed on Ray: {one_line(exc)}") from exc
    finally:
        for slot in slots:
            ray.kill(slot.actor, no_restart=True)


def _failed_shard(tasks: list[Any], slot: _Slot, exc: BaseException) -> list[dict[str, Any]]:
    """One error record per image of a shard whose worker raised: recorded, and the job goes on."""
    cause = getattr(exc, "cause", None) or exc
    node = (slot.info or {}).get("node", "unknown node")
    message = f"the worker on {node} failed on this shard: {one_line(cause)}"
    return [{"image_id": int(t.image_id), "error": message} for t in tasks]


def _actor_error(exc: BaseException) -> str:
    """A lost actor's error in a few words: its type and the start of its first line."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:100]}{'…' if len(first) > 100 else ''}"


def one_line(exc: BaseException) -> str:
    """An error for a one-line message: omnilabel's own as it is, any other as its type and last line."""
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {text[-1] if text else ''}" if not isinstance(exc, OmnilabelError) else str(exc)


def ray_executor(job: JobOptions, worker_factory: Callable[..., Any], decode: Callable[[Any], Any],
                 on_event: OnEvent | None = None
                 ) -> Callable[[tuple, dict[int, list[Any]]], Iterable[tuple[int, list[dict[str, Any]]]]]:
    """An executor (see ``omnilabel.jobs.runner``) that runs shards on Ray, for any per-image job."""

    def run(worker_args: tuple, shards: dict[int, list[Any]]) -> Iterable[tuple[int, list[dict[str, Any]]]]:
        return run_on_ray(worker_factory, worker_args, shards, job=job, decode=decode, on_event=on_event)

    return run
