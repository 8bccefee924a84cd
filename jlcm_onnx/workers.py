"""Where independent jobs run: threads of this process (the default), worker processes on this machine, or a Ray
cluster.

Each weight is encoded on its own once the statistics exist, so the encoder hands its jobs to one of three backends
and gets the results back in job order, whatever order they finished in; a job computes the same bytes anywhere, so
the output is byte-identical across backends:

- **threads** (``Workers()``): one per CPU core in this process (:func:`jlcm_onnx.devices.map_on_cores`); the
  jobs' numpy and torch work releases the GIL.
- **processes** (``Workers(processes=N)``): N worker processes (started with ``spawn``, torch single-threaded in
  each); a job pickles small, as a weight still in its file travels as its path and offset.
- **Ray** (``Workers(ray_address=...)``): tasks of one CPU each on the cluster at the address (``auto``, ``ray://host
  :10001``) or, for ``local``, a cluster started on this machine. Each job is given its weight's values just before
  it is submitted (another machine cannot read this one's files), and at most twice the cluster's CPUs of jobs are in
  flight, so the values in the object store stay bounded.

Progress is one bar over all jobs. A job that fails in a worker raises :class:`WorkerError` naming its job, and the
other jobs are cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, TypeVar

from jlcm_onnx.devices import map_on_cores
from jlcm_onnx.errors import JlcmError
from jlcm_onnx.progress import Phase

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Jobs in flight per Ray CPU (the values they carry wait in the object store).
RAY_IN_FLIGHT_PER_CPU = 2


class WorkerError(JlcmError):
    """A job failed in a worker process or on a Ray cluster; the message names the job and the worker's error."""


@dataclass(frozen=True)
class Workers:
    """Where jobs run (see the module docstring): ``processes`` worker processes, or the Ray cluster at
    ``ray_address``; neither: threads of this process (config fields ``workers`` and ``ray_address``, checked
    there)."""

    processes: int | None = None
    ray_address: str | None = None


def map_jobs(function: Callable[[Item], Result], items: Sequence[Item], workers: Workers, *, description: str,
             name: Callable[[Item], str], weight: Callable[[Item], float] | None = None, progress: bool = False,
             postfix: Callable[[Result], str] | None = None,
             portable: Callable[[Item], Item] | None = None) -> list[Result]:
    """``[function(item) for item in items]`` on ``workers``. ``function`` must be a module-level function (it is
    pickled for processes and Ray), ``name(item)`` names a job in errors, ``weight(item)`` is its share of the
    progress bar (1 without it), ``postfix(result)`` the bar's note on the latest result, and ``portable(item)`` the
    item as sent to Ray (with its data rather than references to this machine's files)."""
    if workers.ray_address is not None:
        return _on_ray(function, items, workers.ray_address, description, name, weight, progress, postfix,
                       portable or (lambda item: item))
    if workers.processes is None:
        return map_on_cores(function, items, description=description, weight=weight, progress=progress,
                            postfix=postfix)
    weigh = weight or (lambda _: 1.0)
    results: list[Any] = [None] * len(items)
    context = get_context("spawn")
    with ProcessPoolExecutor(min(workers.processes, max(len(items), 1)), mp_context=context,
                             initializer=_single_threaded) as pool, \
            Phase(description, total=sum(weigh(item) for item in items), enabled=progress) as phase:
        futures: dict[Future, int] = {pool.submit(function, item): index for index, item in enumerate(items)}
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                index = futures.pop(future)
                results[index] = _result(future, name(items[index]), "a worker process", futures)
                phase.advance(weigh(items[index]), postfix(results[index]) if postfix else "")
    return results


def _result(future: Future, job: str, where: str, pending: dict[Future, int]) -> Any:
    try:
        return future.result()
    except Exception as error:  # noqa: BLE001 - whatever failed there is reported here, by job
        for other in pending:
            other.cancel()
        raise WorkerError(f"{job} failed in {where}: {_brief(error)}") from error


def _single_threaded() -> None:
    """Worker process start: torch on one thread (each process is one job at a time)."""
    import torch

    torch.set_num_threads(1)


def _on_ray(function: Callable[[Item], Result], items: Sequence[Item], address: str, description: str,
            name: Callable[[Item], str], weight: Callable[[Item], float] | None, progress: bool,
            postfix: Callable[[Result], str] | None, portable: Callable[[Item], Item]) -> list[Result]:
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False, include_dashboard=False,
                 logging_level=logging.ERROR)
    task = ray.remote(num_cpus=1, max_retries=0)(_call)
    limit = RAY_IN_FLIGHT_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
    weigh = weight or (lambda _: 1.0)
    results: list[Any] = [None] * len(items)
    in_flight: dict[Any, int] = {}
    following = iter(range(len(items)))
    with Phase(description, total=sum(weigh(item) for item in items), enabled=progress) as phase:
        for index in following:
            in_flight[task.remote(function, portable(items[index]))] = index
            if len(in_flight) >= limit:
                break
        while in_flight:
            [ready], _ = ray.wait(list(in_flight), num_returns=1)
            index = in_flight.pop(ready)
            try:
                results[index] = ray.get(ready)
            except Exception as error:  # noqa: BLE001 - a task's failure, by job
                for reference in in_flight:
                    ray.cancel(reference)
                raise WorkerError(f"{name(items[index])} failed on the Ray cluster: {_brief(error)}") from error
            phase.advance(weigh(items[index]), postfix(results[index]) if postfix else "")
            for following_index in following:
                in_flight[task.remote(function, portable(items[following_index]))] = following_index
                break
    return results


def _call(function: Callable[[Item], Result], item: Item) -> Result:
    """A Ray task: ``function(item)`` (Ray takes only Python functions as tasks; ``function`` may be any picklable
    callable)."""
    return function(item)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise JlcmError("ray_address needs Ray: pip install 'jlcm-onnx[ray]'") from None
    return ray


def _brief(error: BaseException) -> str:
    """The error's type and the last non-empty line of its message (a task error's message ends with the cause)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return _brief(cause)
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
