"""Reference model and evaluation harness for the PP-OCRv6 text recognition model (``PP-OCRv6_rec_small``).

This script/module provides everything needed to test the ONNX weight
compressor on a native (not torch-exported) ONNX model, opset 11, with a CTC
head over a multilingual dictionary of 18,708 characters:

* ``export``: copies ``PP-OCRv6_rec_small.onnx`` out of the ``rapidocr==3.10.0``
  pip package (which ships it; no network access), checks its SHA-256 and
  verifies that it loads in onnxruntime with the expected input and output
  shapes. The package's ``__init__`` needs OpenCV and more, so it is never
  imported: install it without dependencies, e.g. into the git-ignored build
  folder::

      pip install --no-deps --target build/ocr-pkgs rapidocr==3.10.0

* ``load_character_list``: the CTC alphabet, read from the model's
  ``character`` metadata entry (PaddleOCR convention: index 0 is the CTC
  blank, then the dictionary lines, then a trailing space).
* ``load_lines``: ``TEXTS`` (fixed English words, sentences, digits and
  punctuation; Latin only) rendered black on white with the DejaVu fonts
  bundled with matplotlib, cycling over ``FONTS``, and preprocessed as
  PaddleOCR does (height 48, aspect ratio kept, width at least 320 with right
  padding, ``(x / 255 - 0.5) / 0.5``, NCHW float32).
* ``calibration_feeds``: lines that are not the evaluation lines: phrases of
  gensim's ``lee_background.cor`` news text and made-up numbers, rendered in
  other fonts (bold, italic, oblique DejaVu and STIX), preprocessed alike.
* ``recognize``: CTC greedy decoding of each line with an onnxruntime session.
* ``evaluate``: compares an original and a compressed ONNX model: file sizes,
  compression ratio, character and exact-line accuracy of each model against
  the ground truth, and the character / line agreement of the compressed
  model's text with the original model's text.

Command line::

    python models/ppocr.py export OUT.onnx
    python models/ppocr.py evaluate ORIGINAL.onnx COMPRESSED.onnx [--json]
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import model_cli

MODEL_FILE = "PP-OCRv6_rec_small.onnx"
#: SHA-256 of ``MODEL_FILE`` as listed in rapidocr 3.10.0's ``default_models.yaml``.
MODEL_SHA256 = "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884"
#: Where ``pip install --no-deps --target build/ocr-pkgs rapidocr==3.10.0`` puts the package.
LOCAL_PACKAGES = Path(__file__).resolve().parents[1] / "build" / "ocr-pkgs"
INSTALL_HINT = "pip install --no-deps --target build/ocr-pkgs rapidocr==3.10.0"
CHARACTER_KEY = "character"
BLANK = ""
IMAGE_HEIGHT = 48
MIN_IMAGE_WIDTH = 320
SESSION_THREADS = 2
#: Fonts bundled with matplotlib that no evaluation line uses, in turn for the calibration lines.
CALIBRATION_FONTS = (("DejaVuSans-Bold.ttf", 30), ("DejaVuSerif-Italic.ttf", 28), ("DejaVuSansMono-Oblique.ttf", 26),
                     ("STIXGeneral.ttf", 34))
#: (DejaVu font file bundled with matplotlib, size in points), used in turn for the lines of ``TEXTS``.
FONTS = (("DejaVuSans.ttf", 32), ("DejaVuSerif.ttf", 28), ("DejaVuSansMono.ttf", 24))
TEXTS = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "OCR",
    "Invoice number: 2024-0117",
    "Total: $1,249.99",
    "Call +1 (555) 012-3456",
    "www.example.com/index.html",
    "user@example.org",
    "3.14159265",
    "42",
    "Monday, March 3rd",
    "Do not enter!",
    "Open 9:00 - 17:30",
    "Temperature 21.5 C",
    "Price per kg: 7.80",
    "Pack my box with five dozen liquor jugs.",
    "All that glitters is not gold.",
    "Section 4.2 (b)",
    "Page 12 of 30",
    "ID: A7X-99Q",
    "50% off",
    "Exit",
    "Keep left",
    "No parking 8am-6pm",
    "Order #88231",
    "Qty 3 x 12.50 = 37.50",
    "Date: 2023/11/05",
    "Time is money.",
    "To be, or not to be?",
    "Error 404: page not found",
    "Version 1.2.3",
    "Sample text",
    "Machine learning",
    "Neural network compression",
    "Quantization to four bits",
    "Battery level 87%",
    "Hamburg, Germany",
    "New York City",
    "Tokyo 2020",
    "London Bridge",
    "Apples & oranges",
    "A+B=C",
    "[draft]",
    "{key: value}",
    "x_1 + y_2",
    "#include <stdio.h>",
    "print('hi')",
    "SUMMARY",
    "Welcome Home",
    "Thank you for your purchase",
    "Fragile - handle with care",
    "Best before 12.08.2025",
    "Serial No. 00451273",
    "Flight LH 454",
    "Gate B12",
    "Seat 23C",
    "Room 101",
    "Speed limit 30",
    "Chapter Seven",
    "The end.",
)


# --------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------


def package_dir() -> Path:
    """Return the folder of the ``rapidocr`` package (importable, or under ``LOCAL_PACKAGES``) without importing it."""
    spec = importlib.util.find_spec("rapidocr")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    local = LOCAL_PACKAGES / "rapidocr"
    if local.is_dir():
        return local
    raise FileNotFoundError(f"rapidocr is not installed; run: {INSTALL_HINT}")


def model_path() -> Path:
    """Return the path of ``PP-OCRv6_rec_small.onnx`` inside the rapidocr package."""
    models = package_dir() / "models"
    path = models / MODEL_FILE
    if not path.is_file():
        found = sorted(p.name for p in models.glob("*.onnx"))
        raise FileNotFoundError(f"{MODEL_FILE} not in {models} (found {found}); run: {INSTALL_HINT}")
    return path


def load_character_list(session: ort.InferenceSession) -> list[str]:
    """Return the CTC alphabet of ``session``: the blank, the ``character`` metadata lines, then a space."""
    metadata = session.get_modelmeta().custom_metadata_map
    if CHARACTER_KEY not in metadata:
        raise KeyError(f"model has no {CHARACTER_KEY!r} metadata entry (keys: {sorted(metadata)})")
    return [BLANK, *metadata[CHARACTER_KEY].splitlines(), " "]


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def export(path: Path) -> None:
    """Copy ``PP-OCRv6_rec_small.onnx`` from the rapidocr package to ``path`` and verify it.

    The input is ``x`` (float32, ``[batch, 3, 48, width]``, batch and width
    dynamic, preprocessed as in ``preprocess``); the output holds per-time-step
    class probabilities (float32, ``[batch, width / 8, 18710]``). A
    ``RuntimeError`` is raised if the file's SHA-256 is not ``MODEL_SHA256``,
    if the input or output shapes differ from these, or if the number of
    classes differs from the size of the ``character`` alphabet.
    """
    path = Path(path)
    source = model_path()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != MODEL_SHA256:
        raise RuntimeError(f"{source}: SHA-256 {digest} != expected {MODEL_SHA256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)

    session = make_session(path)
    characters = load_character_list(session)
    (model_input,), (model_output,) = session.get_inputs(), session.get_outputs()
    if model_input.shape[1:3] != [3, IMAGE_HEIGHT]:
        raise RuntimeError(f"unexpected input shape {model_input.shape}")
    if model_output.shape[-1] != len(characters):
        raise RuntimeError(f"output has {model_output.shape[-1]} classes, alphabet has {len(characters)}")
    print(f"model:      {source}")
    print(f"dictionary: {len(characters) - 2:,} characters in its {CHARACTER_KEY!r} metadata, plus blank and space")


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def font_path(name: str) -> Path:
    """Return the path of the DejaVu font ``name`` bundled with matplotlib."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


def render(text: str, font_name: str, size: int) -> np.ndarray:
    """Render ``text`` black on white as a uint8 ``[h, w, 3]`` image, cropped like a detector box.

    The crop spans the font's full line height (ascent + descent, so it does
    not depend on the letters) and the ink's horizontal extent, with a margin
    of a quarter of the font size on every side.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path(font_name)), size)
    left, _, right, _ = font.getbbox(text)
    ascent, descent = font.getmetrics()
    margin = size // 4
    image = Image.new("RGB", (right - left + 2 * margin, ascent + descent + 2 * margin), "white")
    ImageDraw.Draw(image).text((margin - left, margin), text, font=font, fill="black")
    return np.asarray(image)


def preprocess(image: np.ndarray) -> np.ndarray:
    """Turn one uint8 ``[h, w, 3]`` image into a ``[3, 48, max(320, w')]`` float32 input, as PaddleOCR does.

    The image is resized (bilinear) to height 48 keeping its aspect ratio
    (width ``w' = ceil(48 * w / h)``), normalised to ``(x / 255 - 0.5) / 0.5``
    and padded on the right with zeros up to a width of at least 320.
    """
    from PIL import Image

    height, width = image.shape[:2]
    resized_width = max(1, math.ceil(IMAGE_HEIGHT * width / height))
    resized = Image.fromarray(image).resize((resized_width, IMAGE_HEIGHT), Image.Resampling.BILINEAR)
    normalized = (np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    padded = np.zeros((3, IMAGE_HEIGHT, max(MIN_IMAGE_WIDTH, resized_width)), dtype=np.float32)
    padded[:, :, :resized_width] = normalized
    return padded


@functools.lru_cache(maxsize=1)
def _load_lines_cached() -> tuple[np.ndarray, ...]:
    """Build (once) the arrays returned by ``load_lines``."""
    lines = tuple(preprocess(render(text, *FONTS[i % len(FONTS)])) for i, text in enumerate(TEXTS))
    for line in lines:
        line.setflags(write=False)
    return lines


def calibration_texts(count: int = 64, seed: int = 0) -> list[str]:
    """``count`` distinct calibration lines, none of them an evaluation line: every third a made-up number (an amount, a
    date, a code), the others 2 to 6 consecutive words of gensim's ``lee_background.cor`` news text."""
    import gensim

    corpus = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    words = corpus.read_text(encoding="latin-1").split()
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    while len(texts) < count:
        if len(texts) % 3 == 2:
            number = int(rng.integers(0, 100_000))
            date = f"{number % 28 + 1:02d}.{number % 12 + 1:02d}.20{number % 30:02d}"
            text = [f"No. {number}", f"{number / 100:,.2f}", date, f"#{number:06X}"][len(texts) % 4]
        else:
            start = int(rng.integers(0, len(words) - 6))
            text = " ".join(words[start : start + int(rng.integers(2, 7))])
        if text not in TEXTS and text not in texts:
            texts.append(text)
    return texts


def calibration_feeds(count: int = 64) -> list[dict[str, np.ndarray]]:
    """:func:`calibration_texts` rendered in :data:`CALIBRATION_FONTS` in turn and preprocessed like the evaluation
    lines, one line per feed (widths differ) under the model's input name ``x``."""
    return [{"x": preprocess(render(text, *CALIBRATION_FONTS[i % len(CALIBRATION_FONTS)]))[None]}
            for i, text in enumerate(calibration_texts(count))]


def load_lines() -> list[np.ndarray]:
    """Return the preprocessed evaluation lines, one ``[3, 48, width]`` float32 array per entry of ``TEXTS``.

    Line ``i`` is rendered with ``FONTS[i % len(FONTS)]``; everything is
    deterministic. Fresh writable copies are returned on every call.
    """
    return [line.copy() for line in _load_lines_cached()]


# --------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------


def make_session(path: Path, threads: int = SESSION_THREADS) -> ort.InferenceSession:
    """Create a CPU onnxruntime session with default options and ``threads`` threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ctc_greedy_decode(probabilities: np.ndarray, characters: Sequence[str]) -> str:
    """Decode one ``[time, classes]`` output: argmax per step, collapse repeats, drop the blank (index 0)."""
    best = probabilities.argmax(axis=-1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return "".join(characters[i] for i in best[keep] if i != 0)


def recognize(session: ort.InferenceSession, lines: Sequence[np.ndarray], characters: Sequence[str]) -> list[str]:
    """Run ``session`` on each preprocessed line (batch of one, its own width) and return the decoded texts."""
    input_name = session.get_inputs()[0].name
    texts = []
    for line in lines:
        (output,) = session.run(None, {input_name: np.ascontiguousarray(line[None], dtype=np.float32)})
        texts.append(ctc_greedy_decode(output[0], characters))
    return texts


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each) between ``a`` and ``b``."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Character accuracy (``1 - total edit distance / total reference characters``) and exact-line accuracy."""
    distance = sum(levenshtein(p, r) for p, r in zip(predictions, references, strict=True))
    total = sum(len(r) for r in references)
    return {
        "char_accuracy": 1.0 - distance / total,
        "line_accuracy": float(np.mean([p == r for p, r in zip(predictions, references, strict=True)])),
    }


def evaluate(original: Path, compressed: Path) -> dict[str, Any]:
    """Compare an original and a compressed ONNX model of PP-OCRv6 text recognition.

    Returns file sizes in bytes, the compression ratio (original /
    compressed), the number of lines and characters of ``TEXTS``, the
    ``text_metrics`` of each model against ``TEXTS``, ``agreement`` (the
    ``text_metrics`` of the compressed model's texts against the original
    model's texts) and ``disagreements``: the lines on which the two models
    read different texts. The alphabet is read from the original model.
    """
    original, compressed = Path(original), Path(compressed)
    lines = load_lines()
    session_original, session_compressed = make_session(original), make_session(compressed)
    characters = load_character_list(session_original)
    text_original = recognize(session_original, lines, characters)
    text_compressed = recognize(session_compressed, lines, characters)
    return {
        **model_cli.file_sizes(original, compressed),
        "num_lines": len(TEXTS),
        "num_chars": sum(len(text) for text in TEXTS),
        "original": text_metrics(text_original, TEXTS),
        "compressed": text_metrics(text_compressed, TEXTS),
        "agreement": text_metrics(text_compressed, text_original),
        "disagreements": [
            {"truth": truth, "original": before, "compressed": after}
            for truth, before, after in zip(TEXTS, text_original, text_compressed, strict=True)
            if before != after
        ],
    }


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _format_summary(result: dict[str, Any]) -> str:
    """Render an ``evaluate`` result as a short human-readable summary."""
    agreement = result["agreement"]
    lines = [
        f"size:        {result['original_bytes']:,} -> {result['compressed_bytes']:,} bytes "
        f"(ratio {result['ratio']:.2f}x)",
        f"agreement:   chars {agreement['char_accuracy']:.4f}, lines {agreement['line_accuracy']:.4f} "
        f"over {result['num_lines']} lines ({result['num_chars']} characters)",
        *model_cli.metric_delta_lines(result["original"], result["compressed"]),
    ]
    for row in result["disagreements"]:
        lines.append(f"differs:     {row['truth']!r}: {row['original']!r} -> {row['compressed']!r}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return model_cli.run(__doc__.split("\n\n")[0], export, evaluate, _format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
