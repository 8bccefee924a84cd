"""Calibration data from text: lines padded under a zero mask, or packed windows; fed straight to compress."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

pytest.importorskip("transformers")

from test_cli import invoke  # noqa: E402

import jlcm_onnx  # noqa: E402
from jlcm_onnx import CalibrationError, CompressionConfig  # noqa: E402
from jlcm_onnx.pipeline.calibration_text import calibration_from_text, load_tokenizer  # noqa: E402

from conftest import FLOAT, INT64, make_model, tensor, value  # noqa: E402

WORDS = "the a model weight codebook layer token text small large compress run".split()
TEXT = "\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(40))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return folder


def text_model(rng: np.random.Generator, extra_input: str | None = None) -> onnx.ModelProto:
    """Gather(E, input_ids) @ W, and the attention mask read by an Identity."""
    inputs = [value("input_ids", INT64, ["B", "S"]), value("attention_mask", INT64, ["B", "S"])]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["Y"]),
             helper.make_node("Identity", ["attention_mask"], ["M"])]
    outputs = [value("Y", FLOAT, ["B", "S", 32]), value("M", INT64, ["B", "S"])]
    if extra_input:
        inputs.append(value(extra_input, INT64, ["B", "S"]))
        nodes.append(helper.make_node("Identity", [extra_input], ["P"]))
        outputs.append(value("P", INT64, ["B", "S"]))
    return make_model(nodes, inputs, outputs, [tensor("E", rng.standard_normal((len(WORDS) + 2, 32)).astype("f4")),
                                               tensor("W", rng.standard_normal((32, 32)).astype("f4"))])


def test_lines_are_padded_under_a_zero_mask(tokenizer_dir: Path, rng: np.random.Generator) -> None:
    feed = calibration_from_text(TEXT, load_tokenizer(tokenizer_dir), text_model(rng), max_length=8, samples=16)
    assert set(feed) == {"input_ids", "attention_mask"} and feed["input_ids"].shape == (16, 8)
    lengths = feed["attention_mask"].sum(axis=1)
    assert lengths.min() < 8 and np.all(feed["input_ids"][feed["attention_mask"] == 0] == 0)  # [PAD] under mask 0


def test_packed_windows_have_no_padding(tokenizer_dir: Path, rng: np.random.Generator) -> None:
    feed = calibration_from_text(TEXT, load_tokenizer(tokenizer_dir), text_model(rng), max_length=16, samples=5,
                                 pack=True)
    assert feed["input_ids"].shape == (5, 16) and feed["attention_mask"].all()
    assert 1 not in feed["input_ids"]  # every word is known: no [UNK]


def test_cli_writes_a_file_compress_reads(tokenizer_dir: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    model, text, calibration = tmp_path / "m.onnx", tmp_path / "text.txt", tmp_path / "calib.npz"
    onnx.save(text_model(rng), model)
    text.write_text(TEXT)
    code, stdout, _ = invoke("calibration-data", model, text, "--tokenizer", tokenizer_dir, "-o", calibration,
                             "--max-length", 12, "--samples", 24)
    assert code == 0 and "24 samples of 11 tokens" in stdout and calibration.exists()
    result = jlcm_onnx.compress(model, CompressionConfig(bits=3, min_elements=64), str(calibration))
    (positions,) = [n for n in result.report.notes if "positions used" in n]
    real = int(np.load(calibration)["attention_mask"].sum())
    assert positions.startswith(f"calibration: {real:,} of 264 positions used")


def test_an_input_the_tokenizer_does_not_give_is_named(tokenizer_dir: Path, tmp_path: Path,
                                                       rng: np.random.Generator) -> None:
    with pytest.raises(CalibrationError, match="model input 'position_ids' is not a tokenizer output"):
        calibration_from_text(TEXT, load_tokenizer(tokenizer_dir), text_model(rng, "position_ids"))
    model, text = tmp_path / "m.onnx", tmp_path / "t.txt"
    onnx.save(text_model(rng), model)
    text.write_text(TEXT)
    code, _, stderr = invoke("calibration-data", model, text, "--tokenizer", tmp_path / "nowhere", "-o",
                             tmp_path / "c.npz")
    assert code == 2 and "nowhere" in stderr and not (tmp_path / "c.npz").exists()
