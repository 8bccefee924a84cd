"""Calibration data from a text file and a tokenizer: the step a user scripts before compressing a language model.

Two layouts, both written as one feed (model input name -> int64 array [samples, length]) that
:func:`jlcm_onnx.load_calibration` splits into samples:

- **lines** (the default; encoders such as MiniLM): each non-empty line is a sample, truncated to ``max_length``
  tokens and padded to the longest; the padding's attention mask is 0, so the statistics leave it out;
- **packed** (decoder LLMs): the whole text is tokenized once and cut into windows of exactly ``max_length`` tokens,
  with no padding at all (the last, shorter window is dropped).

At most ``samples`` samples are kept, spread evenly over the text. The tokenizer's outputs are matched to the model's
inputs by name (``input_ids``, ``attention_mask``, ``token_type_ids``); a model input the tokenizer does not give is a
:class:`jlcm_onnx.CalibrationError` naming it. The tokenizer is any Hugging Face tokenizer (``--tokenizer DIR`` loads
one with ``transformers.AutoTokenizer``, offline).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from jlcm_onnx.analysis.calibration import DEFAULT_SAMPLES, model_inputs, read_graph
from jlcm_onnx.errors import CalibrationError


def calibration_from_text(
    text: str,
    tokenizer: Callable[..., Any],
    model: onnx.ModelProto | str | os.PathLike,
    *,
    max_length: int = 128,
    samples: int = DEFAULT_SAMPLES,
    pack: bool = False,
) -> dict[str, np.ndarray]:
    """One feed of up to ``samples`` samples of ``text`` for ``model`` (see the module docstring for the layouts)."""
    if max_length < 2 or samples < 1:
        raise CalibrationError(f"max_length must be >= 2 and samples >= 1 (got {max_length}, {samples})")
    if pack:
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64).reshape(-1)
        windows = ids[: ids.size // max_length * max_length].reshape(-1, max_length)
        if not len(windows):
            raise CalibrationError(f"the text holds {ids.size} tokens, fewer than one window of {max_length}")
        windows = windows[_spread(len(windows), samples)]
        encoded = {"input_ids": windows, "attention_mask": np.ones_like(windows),
                   "token_type_ids": np.zeros_like(windows)}
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise CalibrationError("the text holds no non-empty line")
        lines = [lines[i] for i in _spread(len(lines), samples)]
        encoded = tokenizer(lines, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return _model_feed(encoded, read_graph(model))


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A Hugging Face tokenizer from a local folder (``tokenizer.json`` or the files ``save_pretrained`` writes)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CalibrationError("reading a tokenizer needs transformers: pip install transformers") from None
    if not Path(path).is_dir():
        raise CalibrationError(f"tokenizer {path}: not a folder holding a tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise CalibrationError(f"tokenizer {path}: {str(error).splitlines()[0]}") from None


def _spread(count: int, samples: int) -> np.ndarray:
    """``min(count, samples)`` indices spread evenly over ``range(count)``, in order."""
    return np.unique(np.linspace(0, count - 1, num=min(count, samples)).round().astype(np.int64))


def _model_feed(encoded: Any, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    feed = {}
    for spec in model_inputs(model):
        if spec.name not in encoded:
            raise CalibrationError(f"the model input '{spec.name}' is not a tokenizer output "
                                   f"(it gives {', '.join(sorted(encoded))})")
        feed[spec.name] = np.asarray(encoded[spec.name]).astype(spec.dtype)
    return feed
