"""Calibration feeds read from files: a ``.npz`` file is one feed; in a folder, the ``<input name>.npy`` files together
form one feed and every ``.npz`` file one more (files in name order, others ignored).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jlcm_onnx.errors import CalibrationError
from jlcm_onnx.ir.sessions import first_line


def read_feed_files(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(a label naming the feed in error messages, the feed) for every feed of the file or folder ``path``."""
    if path.is_file():
        if path.suffix != ".npz":
            raise CalibrationError(f"calibration file {path} is not a .npz file (or give a folder of .npy/.npz files)")
        yield f"calibration file {path}", _load_npz(path)
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        arrays = [f for f in files if f.suffix == ".npy"]
        archives = [f for f in files if f.suffix == ".npz"]
        if not arrays and not archives:
            raise CalibrationError(f"calibration folder {path} holds no .npy or .npz files")
        if arrays:
            yield f"calibration folder {path}", {f.stem: _load_npy(f) for f in arrays}
        for archive in archives:
            yield f"calibration file {archive}", _load_npz(archive)
    else:
        raise CalibrationError(f"calibration data {path} does not exist")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise CalibrationError(f"cannot read calibration file {path}: {first_line(error)}") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise CalibrationError(f"cannot read calibration file {path}: {first_line(error)}") from None
