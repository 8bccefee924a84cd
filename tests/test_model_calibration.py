"""The image and OCR models' calibration data are never their evaluation data (skipped where the packages that ship
the pictures and text, scikit-image and gensim, are not installed)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import script


def test_efficientnet_calibration_crops_are_none_of_the_evaluation_photos() -> None:
    pytest.importorskip("skimage")
    efficientnet = script("models/efficientnet.py")
    images = efficientnet.calibration_images(16)
    assert images.shape == (16, 3, 224, 224) and images.dtype == np.float32
    np.testing.assert_array_equal(images, efficientnet.calibration_images(16))  # deterministic
    evaluation = efficientnet.load_images()
    distances = ((images[:, None] - evaluation[None]) ** 2).mean(axis=(2, 3, 4))
    assert distances.min() > 0.01  # measured 0.04 for the closest pair of 64
    feeds = efficientnet.calibration_feeds(16, batch=8)
    assert [feed[efficientnet.INPUT_NAME].shape[0] for feed in feeds] == [8, 8]


def test_ppocr_calibration_lines_are_none_of_the_evaluation_lines() -> None:
    pytest.importorskip("gensim")
    pytest.importorskip("PIL")
    ppocr = script("models/ppocr.py")
    texts = ppocr.calibration_texts(30)
    assert len(set(texts)) == 30 and not set(texts) & set(ppocr.TEXTS)
    assert not {font for font, _ in ppocr.CALIBRATION_FONTS} & {font for font, _ in ppocr.FONTS}
    feeds = ppocr.calibration_feeds(4)
    assert all(feed["x"].shape[:3] == (1, 3, ppocr.IMAGE_HEIGHT) and feed["x"].shape[3] >= 320 for feed in feeds)
