"""Where the work runs: ``"cpu"`` or ``"cuda"`` as onnxruntime execution providers (calibration statistics, verify)
and as a torch device (joint learning), and how independent CPU work is spread over the cores. Asking for CUDA where it
is not installed is a one-line :class:`JlcmError`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TypeVar

import onnxruntime as ort
import torch

from jlcm_onnx.errors import ConfigError, JlcmError
from jlcm_onnx.progress import Phase

DEVICES = ("cpu", "cuda")

Item = TypeVar("Item")
Result = TypeVar("Result")


def execution_providers(device: str) -> list[str]:
    """onnxruntime providers for ``device``; raises :class:`JlcmError` when CUDA is not installed."""
    check_device(device)
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise JlcmError(f"device cuda: this onnxruntime has no CUDAExecutionProvider (it has {', '.join(available)}); "
                        "install onnxruntime-gpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def torch_device(device: str) -> str:
    """The torch device for ``device``; raises :class:`JlcmError` when torch has no CUDA."""
    check_device(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise JlcmError("device cuda: this torch build has no usable CUDA device (install a CUDA build of torch)")
    return device


def check_device(device: str) -> None:
    """Raises :class:`ConfigError` unless ``device`` is one of :data:`DEVICES`."""
    if device not in DEVICES:
        raise ConfigError("device", device, f"one of {', '.join(DEVICES)}")


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def map_on_cores(function: Callable[[Item], Result], items: Sequence[Item], *, description: str,
                 weight: Callable[[Item], float] | None = None, progress: bool = False,
                 postfix: Callable[[Result], str] | None = None) -> list[Result]:
    """``[function(item) for item in items]`` on one thread per CPU core, torch single-threaded meanwhile: the items'
    numpy and torch work releases the GIL, and their small ops gain nothing from torch's own threads. ``function``
    must not share mutable state between items. Progress counts each finished item as ``weight(item)`` (its share of the
    work; 1 without ``weight``) and shows ``postfix(result)`` of the latest result."""
    weigh = weight or (lambda _: 1.0)
    cores = cpu_cores()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(1, min(cores, len(items)))) as pool, \
                Phase(description, total=sum(weigh(item) for item in items), enabled=progress) as phase:
            futures = {pool.submit(function, item): index for index, item in enumerate(items)}
            results: list[Result | None] = [None] * len(items)
            for future in as_completed(futures):
                index = futures[future]
                results[index] = future.result()
                phase.advance(weigh(items[index]), postfix(results[index]) if postfix else "")
            return results  # type: ignore[return-value] - every slot is filled
    finally:
        torch.set_num_threads(threads)
