"""How much memory a run may use, how the work inside one tensor is cut to fit it, and what a run will need.

**Chunks.** The encoders' working arrays (float64 k-means values, sort orders, prefix sums, codes) cost about
:data:`WORKING_BYTES_PER_WEIGHT` bytes per weight they hold at once. Row groups are independent, so an encoder takes a
tensor a *chunk* of whole groups at a time, writes that chunk's codes and codebooks into the tensor's arrays and drops
its working arrays: the peak grows with the chunk, not with the tensor, and the result is byte-identical to encoding
the tensor at once. Each of the ``workers`` threads encoding tensors side by side gets an equal share of
:data:`WORKING_SHARE` of the budget::

    chunk weights = clip(WORKING_SHARE * max_memory / (workers * WORKING_BYTES_PER_WEIGHT), MIN, MAX)

**Estimate.** Before any work a run's peak is estimated from the shapes alone::

    peak ~ BASELINE + resident + workers * chunk bytes + largest unchunked work + Grams
    resident = (RESIDENT_COPIES [+ CALIBRATION_COPIES]) * model bytes                   (a model run whole)
             = OUTPUT_COPIES * output bytes + workers * LARGEST_COPIES * largest weight
               + SEGMENT_RUN_COPIES * segment bytes                                      (a model run in segments)

where the unchunked work is the one k-means of a multi-scaling tensor's shared codebook (all its weights at once) or,
with calibration data, the learning of the largest tensor that has a Gram (a block of at most
:data:`jlcm_onnx.encodings.row_block_learning.LEARNING_BLOCK_WEIGHTS` weights, or a whole multi-scaling tensor), and the
Grams are the calibration statistics of every compressed tensor (fp64 [cols, cols] each; for a model run in segments,
which moves each finished Gram to a temporary file, those of the tensors being encoded). A run whose estimate
exceeds ``max_memory`` is refused before it starts, with the estimate in the message, rather than killed part-way.

**Allocator.** glibc serves an allocation of at least its *mmap threshold* with a mapping of its own, handed back to
the system when freed; smaller ones come from heaps whose free space it keeps. Its threshold starts at 128 KB and
rises to the size of each mapped block freed, up to 32 MB, after which the encoders' arrays of a few MB come from the
heaps, each thread's apart, and what they free stays there: a calibrated run on a 268M-parameter model peaked anywhere
from 3.7 to 4.4 GB. The encoder hands that memory back after each tensor (:func:`release_freed_memory`, glibc's
``malloc_trim``, which also returns free pages inside the heaps): 3.1 GB on that run, at no cost in time. Fixing the
threshold instead (``mallopt``) bounded it too (4 MB: 3.3 GB) but made every array of a few MB a fresh mapping, and
the page faults cost 20-60% of the run time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass

from jlcm_onnx.errors import MemoryBudgetError
from jlcm_onnx.report import format_bytes

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # musl, macOS: no malloc_trim
    _LIBC = None

#: Peak bytes per weight of an encoder's chunk (input blocks with importances; plain k-means needs about 100).
WORKING_BYTES_PER_WEIGHT = 160
#: Share of the budget the encoding chunks of all workers may use together.
WORKING_SHARE = 0.25
MIN_CHUNK_WEIGHTS = 1 << 16
#: Larger chunks gain nothing measurable in speed (the per-chunk overhead is a few numpy calls).
MAX_CHUNK_WEIGHTS = 1 << 20
#: Default budget: this share of the memory available when the run starts.
DEFAULT_SHARE = 0.8
#: The interpreter with numpy, torch and onnxruntime imported.
BASELINE_BYTES = 600 << 20
#: The input's weights a run holds at its peak, in model sizes: the weights stay in their file until read
#: (:mod:`jlcm_onnx.ir.lazy_weights`), and the onnxruntime session of the input's reference outputs holds them once,
#: with its activations (a tied LM head's transposed table: measured 1.26 on a 268M-parameter LLM).
RESIDENT_COPIES = 1.5
#: And with calibration data: a batch of activations (at most 256 MB) and the weights rewritten in memory beside the
#: calibration session's (measured: 2.65 GB while collecting statistics on the 268M-parameter LLM, 2.5x its file).
CALIBRATION_COPIES = 0.5
#: A model above the segment size never has its weights in memory at once (:mod:`jlcm_onnx.ir.segmented_run`): its
#: run holds the output about three times at its peak (the encodings, their tensors in the graph, onnxruntime's copy
#: while the output is checked), each worker's weight (its pages, or its float32 matrix) and, running a
#: segment, its weights and activations (measured on a 1.5B-parameter fp32 decoder: bench/scale.py).
OUTPUT_COPIES, LARGEST_COPIES, SEGMENT_RUN_COPIES = 3.0, 1.0, 3.0
#: Peak bytes per weight of the one k-means over all of a multi-scaling tensor's weights (its shared codebook).
UNCHUNKED_BYTES_PER_WEIGHT = 140
#: Peak bytes per weight of learning one tensor's codes and codebooks from its Gram (whole tensor at once; measured
#: 120 on 10M- and 42M-weight matrices).
LEARNING_BYTES_PER_WEIGHT = 125


def available_memory() -> int:
    """Bytes of memory the kernel says are available (``MemAvailable``), else the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_max_memory() -> int:
    """The budget when none is given: :data:`DEFAULT_SHARE` of the available memory."""
    return int(DEFAULT_SHARE * available_memory())


def peak_rss() -> int:
    """The process's peak resident set size so far, in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_memory() -> None:
    """Hands memory the process has freed back to the system (glibc's ``malloc_trim``; nothing elsewhere), so the
    next large step starts from what is really in use rather than from the allocator's free lists."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def chunk_weights(max_memory: int, workers: int) -> int:
    """Weights an encoder may hold in one chunk under ``max_memory`` with ``workers`` threads (see the module
    docstring)."""
    share = WORKING_SHARE * max_memory / (max(workers, 1) * WORKING_BYTES_PER_WEIGHT)
    return int(min(max(share, MIN_CHUNK_WEIGHTS), MAX_CHUNK_WEIGHTS))


@dataclass(frozen=True)
class RowChunk:
    """Rows ``[row_start, row_stop)`` of a matrix, which are exactly its groups ``[group_start, group_stop)``."""

    row_start: int
    row_stop: int
    group_start: int
    group_stop: int

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_stop)

    @property
    def groups(self) -> slice:
        return slice(self.group_start, self.group_stop)


def group_chunks(group_sizes: tuple[int, ...], cols: int, max_weights: int) -> Iterator[RowChunk]:
    """Consecutive runs of whole groups of about ``max_weights`` weights or fewer (a group larger than that is a chunk
    of its own)."""
    row = group = 0
    while group < len(group_sizes):
        first_row, first_group = row, group
        row += group_sizes[group]
        group += 1
        while group < len(group_sizes) and (row - first_row + group_sizes[group]) * cols <= max_weights:
            row += group_sizes[group]
            group += 1
        yield RowChunk(first_row, row, first_group, group)


def row_chunks(rows: int, cols: int, max_weights: int) -> Iterator[slice]:
    """Consecutive row ranges of at most ``max_weights`` weights (at least one row each)."""
    step = max(1, max_weights // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def estimated_peak(model_bytes: int, chunk: int, workers: int, unchunked_weights: int = 0, learned_weights: int = 0,
                   gram_bytes: int = 0, calibrated: bool = False, segmented: Segmented | None = None) -> int:
    """The estimate of the module docstring, in bytes."""
    unchunked = max(unchunked_weights * UNCHUNKED_BYTES_PER_WEIGHT, learned_weights * LEARNING_BYTES_PER_WEIGHT)
    if segmented is None:
        resident = (RESIDENT_COPIES + CALIBRATION_COPIES * calibrated) * model_bytes
    else:
        resident = (OUTPUT_COPIES * segmented.output_bytes + workers * LARGEST_COPIES * segmented.largest_bytes
                    + SEGMENT_RUN_COPIES * segmented.segment_bytes)
    return int(BASELINE_BYTES + resident + workers * chunk * WORKING_BYTES_PER_WEIGHT + unchunked + gram_bytes)


@dataclass(frozen=True)
class Segmented:
    """What the resident memory of a model run a segment at a time depends on: the estimated output's bytes, the
    largest weight's and a segment's (:data:`jlcm_onnx.ir.segmented_run.SEGMENT_BYTES`)."""

    output_bytes: int
    largest_bytes: int
    segment_bytes: int


def check_budget(estimate: int, budget: int) -> None:
    """Raises :class:`MemoryBudgetError` when ``estimate`` exceeds ``budget``."""
    if estimate > budget:
        raise MemoryBudgetError(
            f"this run needs about {format_bytes(estimate)} of memory (estimated from the model's shapes), more than "
            f"max_memory {format_bytes(budget)}: raise --max-memory or free memory")
