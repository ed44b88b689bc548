"""Running a manifest on a Ray cluster (https://docs.ray.io): `refgen batch MANIFEST --out DIR --ray`.

    from engine.batch import read_manifest
    from engine.batch.distributed import run_batch_on_ray
    summary = run_batch_on_ray(read_manifest("npcs.jsonl"), "out/npcs")                  # a local cluster: every GPU here
    summary = run_batch_on_ray(read_manifest("npcs.jsonl"), "out/npcs", address="auto")  # the cluster this node is in

The same plan, ids, outputs and results file as the local run (engine/batch/run.py), made by Ray actors:
- One actor per GPU (num_gpus=1 each) when the cluster has GPUs, else one per CPU slot (num_cpus=1, one torch
  thread each); `actors=N` asks for N. Each actor holds ONE loaded Engine, reused across its units, and loads another
  only when a unit names another model.
- Actors are fed whole WorkUnits (plan_batch), never single lines, so merged batches and the pictures stay those of
  the local run. Units are handed out by group (model, adapter signature, size): an actor keeps taking its group's
  units; when its group is empty it starts a group nobody has started (of its model first), and only then takes
  units from the end of the group with the most left. Each actor has at most `in_flight` units submitted (2: the
  next one is queued while it makes the current one).
- Actors write nothing. An actor returns a unit's PNG bytes (with provenance) for the outputs that were missing when
  the unit was submitted; the driver (this process) writes them atomically into `out` and appends the records: it
  stays the single writer of the folder and of results.jsonl, and the output folder need not be shared by the
  nodes. Input images named by the manifest (init images, references, masks, characters) are read by the actors:
  they must exist at the same paths on every node (a shared filesystem), as the model weights must.
- Fault tolerance, with Ray's own primitives: actors are created with max_restarts and max_task_retries, so an actor
  that dies (killed, OOM, a lost node) is restarted (it loads its engine again) and the units it held are run again
  on it. The driver writes a unit's files and records only when its result arrives, and a unit's result arrives
  once, so a killed actor's unit is redone and recorded exactly once; nothing is written twice, nothing is lost.
  An actor out of restarts is dropped; its units go to the others (each at most once more, so a unit that kills
  every process it runs in fails instead of killing the pool); with no actor left the run stops with
  RayClusterError, and rerunning the command resumes (the results file and the PNGs written so far are kept).
- Resume: as the local run (the skip check and the results file are run_batch's).

Ray is an optional extra (`pip install 'refgen[ray]'`) and is imported only here, when a Ray run starts.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from ..errors import RefgenError
from .manifest import Manifest
from .plan import MAX_MERGED_IMAGES, WorkUnit, group_key
from .run import BatchSummary, LineRecord, RecordCallback, UnitOutput, _Engines, make_unit, missing_outputs, run_batch, write_unit

INSTALL_HINT = "pip install 'refgen[ray]'"
CONNECT_SECONDS = 5.0  # how long --ray-address may take to answer a TCP connection
log = logging.getLogger("refgen.batch")


class RayUnavailableError(RefgenError):
    """A Ray run was asked for and the ray package is not installed."""


class RayClusterError(RefgenError):
    """The Ray cluster cannot be reached, lacks the resources asked for, or lost every actor of a run."""


def import_ray():
    """The ray module; RayUnavailableError naming the install command when it is missing."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(f"--ray needs Ray, an optional extra: {INSTALL_HINT}") from exc
    return ray


def load_model(model: str, device: Optional[str] = None, dtype: Optional[str] = None):
    """Engine.load in an actor (a function Ray can ship by reference)."""
    from .. import Engine

    return Engine.load(model, device, dtype)


class UnitMaker:
    """The body of one Ray actor: one loaded engine at a time, reused across units; makes units, writes nothing."""

    def __init__(self, load_engine: Callable[[str], object], threads: Optional[int]):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self._engines = _Engines(load_engine)

    def make(self, unit: WorkUnit, missing: list[str]) -> UnitOutput:
        return make_unit(unit, self._engines.get, missing)

    def pid(self) -> int:
        return os.getpid()


@dataclass
class RayUnits:
    """A run_batch runner that makes the units on Ray actors (see the module docstring).

    address: None starts a local cluster for the run (and stops it after); "auto", "HOST:6379" or "ray://HOST:10001"
    joins an existing one. When Ray is already initialised in this process, that connection is used as it is.
    actors: how many actors (default: the cluster's GPUs, else its CPUs). threads: torch threads of a CPU actor.
    `actors_started` lists the actor handles of the run in progress (tests kill one)."""

    address: Optional[str] = None
    actors: Optional[int] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    threads: int = 1
    load_engine: Optional[Callable[[str], object]] = None
    in_flight: int = 2
    max_restarts: int = 4
    max_task_retries: int = 2
    actors_started: list = field(default_factory=list, init=False, repr=False)

    def __call__(self, units: list[WorkUnit], out: Path) -> Iterator[tuple[LineRecord, int]]:
        if not units:
            return
        ray = import_ray()
        build_tiny_model(units)
        with connected(ray, self.address, self.actors, self.device):
            workers = self._start(ray)
            try:
                yield from self._feed(ray, workers, units, out)
            finally:
                for worker in workers:
                    ray.kill(worker)
                self.actors_started.clear()

    def _start(self, ray) -> list:
        """The actors: one per GPU (or CPU slot), each with one torch thread on CPU."""
        gpu = use_gpus(ray, self.device)
        kind = "GPU" if gpu else "CPU"
        available = int(ray.cluster_resources().get(kind, 0))
        count = self.actors or available
        if count < 1 or count > available:
            raise RayClusterError(f"{count} Ray actors asked for, the cluster has {available} {kind}s")
        load = self.load_engine or functools.partial(load_model, device=self.device, dtype=self.dtype)
        actor = ray.remote(UnitMaker).options(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1,
                                              max_restarts=self.max_restarts, max_task_retries=self.max_task_retries)
        workers = [actor.remote(load, None if gpu else self.threads) for _ in range(count)]
        self.actors_started[:] = workers
        return workers

    def _feed(self, ray, workers: list, units: list[WorkUnit], out: Path) -> Iterator[tuple[LineRecord, int]]:
        """Keep each actor `in_flight` units deep, take results as they come (ray.wait), write them."""
        queue = Groups(units)
        alive = dict(enumerate(workers))
        groups: dict[int, Optional[tuple]] = dict.fromkeys(alive)
        running: dict = {}  # ObjectRef -> (unit, actor index)
        retried: set[str] = set()  # units (by first line id) already resubmitted after an actor was lost

        def submit(index: int) -> None:
            while index in alive and sum(owner == index for _, owner in running.values()) < self.in_flight:
                unit = queue.take(groups[index])
                if unit is None:
                    return
                groups[index] = group_key(unit.lines[0])
                running[alive[index].make.remote(unit, missing_outputs(out, unit))] = (unit, index)

        for index in alive:
            submit(index)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            unit, index = running.pop(ref)
            try:
                made = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # out of restarts: drop the actor, give its unit a second home
                if alive.pop(index, None) is not None:
                    log.warning("Ray actor %d is gone after %d restarts: %s", index, self.max_restarts, exc)
                if unit.lines[0].id not in retried and alive:
                    retried.add(unit.lines[0].id)
                    queue.put_back(unit)
                    for other in alive:
                        submit(other)
                    continue
                made = UnitOutput(error=f"the Ray actor running this unit died: {exc}")
            except ray.exceptions.RayError as exc:
                made = UnitOutput(error=f"Ray: {exc}")
            yield from write_unit(unit, made, out)
            if not alive and (running or queue):
                raise RayClusterError("every Ray actor of this run died; rerun the same command to resume "
                                      f"(the results so far are in {out})")
            submit(index)


class Groups:
    """Units waiting to run, by group (model, adapter signature, size), groups in plan order."""

    def __init__(self, units: list[WorkUnit]):
        self._waiting: dict[tuple, deque] = {}
        for unit in units:
            self._waiting.setdefault(group_key(unit.lines[0]), deque()).append(unit)
        self._started: set[tuple] = set()

    def __bool__(self) -> bool:
        return any(self._waiting.values())

    def take(self, group: Optional[tuple]) -> Optional[WorkUnit]:
        """The next unit of `group`; else the first unstarted group's (of the same model first); else the last unit
        of the group with the most left; None when nothing waits."""
        if group is not None and self._waiting.get(group):
            return self._waiting[group].popleft()
        fresh = [key for key, waiting in self._waiting.items() if waiting and key not in self._started]
        if fresh:
            key = min(fresh, key=lambda key: group is not None and key[0] != group[0])  # min: the first of the best
            self._started.add(key)
            return self._waiting[key].popleft()
        fullest = max(self._waiting.values(), key=len, default=None)
        return fullest.pop() if fullest else None

    def put_back(self, unit: WorkUnit) -> None:
        self._waiting.setdefault(group_key(unit.lines[0]), deque()).appendleft(unit)


def build_tiny_model(units: list[WorkUnit]) -> None:
    """Build the built-in tiny model here before actors load it: two actors must not build it at once."""
    if any(unit.model == "tiny" for unit in units):
        from .. import paths, tiny

        tiny.ensure_tiny_model(paths.cache_dir())


def use_gpus(ray, device: Optional[str]) -> bool:
    """GPU actors when the cluster has GPUs and no CPU device was asked for."""
    return ray.cluster_resources().get("GPU", 0) >= 1 and (device is None or device.startswith("cuda"))


@contextmanager
def connected(ray, address: Optional[str], actors: Optional[int], device: Optional[str]) -> Iterator[None]:
    """Ray initialised for the run: as it is when this process already is; else a local cluster (address None: CPU
    slots for `actors` CPU actors when there is no GPU or device is cpu) or the cluster at `address`; shut down after."""
    if ray.is_initialized():
        yield
        return
    if address not in (None, "auto"):
        check_reachable(address)
    options = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if address is None and actors and (device == "cpu" or not _local_gpus()):
        options.update(num_cpus=actors, num_gpus=0)
    try:
        ray.init(address=address or "local", **options)  # "local": a new cluster, never one `ray start` left running
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayClusterError(f"cannot start or reach the Ray cluster{f' at {address}' if address else ''}: {exc}") from exc
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, seconds: float = CONNECT_SECONDS) -> None:
    """A TCP connection to the head before ray.init, which retries an address nobody answers for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayClusterError(f"--ray-address {address!r}: give auto, HOST:PORT (the head's GCS, 6379 by default) "
                              "or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as exc:
        raise RayClusterError(f"cannot reach the Ray head at {address} ({exc}); is `ray start --head` running there, "
                              "and is the port open?") from None


def _local_gpus() -> int:
    """CUDA devices on this machine, without importing torch when CUDA_VISIBLE_DEVICES says none."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    import torch

    return torch.cuda.device_count()


def run_batch_on_ray(manifest: Manifest, out: Union[str, Path], address: Optional[str] = None,
                     actors: Optional[int] = None, device: Optional[str] = None, dtype: Optional[str] = None,
                     on_record: Optional[RecordCallback] = None, max_images: int = MAX_MERGED_IMAGES,
                     threads: int = 1) -> BatchSummary:
    """run_batch with the units made on Ray actors (see the module docstring). Raises RayUnavailableError without
    the ray package, before anything is written."""
    import_ray()
    runner = RayUnits(address=address, actors=actors, device=device, dtype=dtype, threads=threads)
    return run_batch(manifest, out, on_record=on_record, max_images=max_images, runner=runner)
