"""Spreading independent work over the CPU cores: results in order, torch's own thread count restored."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from jlcm_onnx.devices import map_on_cores


def test_results_come_back_in_item_order_and_torch_threads_are_restored() -> None:
    before = torch.get_num_threads()
    seen_threads: set[int] = set()

    def square(value: int) -> int:
        seen_threads.add(torch.get_num_threads())
        return value * value

    assert map_on_cores(square, list(range(50)), description="test") == [v * v for v in range(50)]
    assert seen_threads == {1}  # single-threaded torch inside the workers
    assert torch.get_num_threads() == before


def test_an_error_in_one_item_propagates_and_restores_torch_threads() -> None:
    before = torch.get_num_threads()

    def fail_on_three(value: int) -> int:
        if value == 3:
            raise ValueError("item 3")
        return value

    with pytest.raises(ValueError, match="item 3"):
        map_on_cores(fail_on_three, list(range(6)), description="test")
    assert torch.get_num_threads() == before


def test_items_run_concurrently_when_there_are_several_cores() -> None:
    """Two items that each wait for the other can only finish if they run at the same time."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < 2:
        pytest.skip("one core: items run one after the other")
    barrier = threading.Barrier(2, timeout=10)

    def meet(value: int) -> int:
        barrier.wait()
        return value

    assert map_on_cores(meet, [1, 2], description="test") == [1, 2]
