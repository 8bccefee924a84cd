"""Latency of several files of one model measured round-robin in one process: the A/B that a busy machine allows.

``bench/memory.py`` measures each file in a fresh process, one after the other, so a few minutes of another load on
the machine move one file's numbers and not the others' (2-core cloud machines drift by up to +-50%). Here every
file gets its own session up front and the files take turns, one inference each per round, for ``--rounds`` rounds:
a drift slows every file alike, and each file's median over the rounds is compared with the first file's (the
reference, usually the fp32 model) measured in the same rounds.

Command line::

    python bench/latency_ab.py REFERENCE.onnx OTHER.onnx ... [--batch 1] [--seq 16] [--rounds 40] [--json OUT.json]

Inputs are those of ``bench/memory.py`` (pseudo-random word-piece ids for token inputs); default onnxruntime session
options with 2 intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import DEFAULT_THREADS, make_inputs  # noqa: E402

WARMUP = 3


def round_robin(paths: list[Path], batch: int, seq: int, rounds: int, threads: int = DEFAULT_THREADS) -> list[float]:
    """The median latency in ms of each file over ``rounds`` rounds of one inference per file."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in paths]
    feeds = [make_inputs(session, batch, seq) for session in sessions]
    for session, feed in zip(sessions, feeds, strict=True):
        for _ in range(WARMUP):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for index, (session, feed) in enumerate(zip(sessions, feeds, strict=True)):
            start = time.perf_counter()
            session.run(None, feed)
            times[index].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(series) for series in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="the reference model first, then the others")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    medians = round_robin(args.models, args.batch, args.seq, args.rounds)
    rows = [{"model": str(path), "ms": round(ms, 3), "x_reference": round(ms / medians[0], 3)}
            for path, ms in zip(args.models, medians, strict=True)]
    for row in rows:
        print(f"{row['model']}: {row['ms']:.2f} ms ({row['x_reference']:.2f}x the reference)")
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "seq": args.seq, "rounds": args.rounds, "rows": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
