"""Where the work runs: ``"cpu"`` or ``"cuda"`` as onnxruntime execution providers (calibration statistics, verify)
and as a torch device (joint learning). Asking for CUDA where it is not installed is a one-line :class:`JlcmError`."""

from __future__ import annotations

import onnxruntime as ort

from jlcm_onnx.errors import ConfigError, JlcmError

DEVICES = ("cpu", "cuda")


def execution_providers(device: str) -> list[str]:
    """onnxruntime providers for ``device``; raises :class:`JlcmError` when CUDA is not installed."""
    check_device(device)
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise JlcmError(f"device cuda: this onnxruntime has no CUDAExecutionProvider (it has {', '.join(available)}); "
                        "install onnxruntime-gpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def torch_device(device: str) -> str:
    """The torch device for ``device``; raises :class:`JlcmError` when torch has no CUDA."""
    check_device(device)
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise JlcmError("device cuda: this torch build has no usable CUDA device (install a CUDA build of torch)")
    return device


def check_device(device: str) -> None:
    """Raises :class:`ConfigError` unless ``device`` is one of :data:`DEVICES`."""
    if device not in DEVICES:
        raise ConfigError("device", device, f"one of {', '.join(DEVICES)}")
