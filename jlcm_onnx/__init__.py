"""jlcm-onnx: post-training compression of ONNX models with learnable codebooks and mappings (JLCM, ICLR 2024).

Public API::

    import jlcm_onnx
    result = jlcm_onnx.compress("model.onnx", jlcm_onnx.CompressionConfig(bits=4))
    print(result.report.format_table())
    result.save("model-4bit.onnx")
"""

from jlcm_onnx.analysis.calibration import CalibrationData, load_calibration
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.errors import CalibrationError, ConfigError, JlcmError, ModelError, OutputError
from jlcm_onnx.ir.runtime import fold_at_load, inference_session
from jlcm_onnx.pipeline.calibration_text import calibration_from_text
from jlcm_onnx.pipeline.compress import CompressionResult, compress, save
from jlcm_onnx.pipeline.metadata import read_metadata
from jlcm_onnx.pipeline.verify import OutputFidelity, VerifyReport, verify
from jlcm_onnx.report import CompressionReport, TensorRecord

__version__ = "0.1.0"

__all__ = [
    "CalibrationData",
    "CalibrationError",
    "CompressionConfig",
    "CompressionReport",
    "CompressionResult",
    "ConfigError",
    "JlcmError",
    "ModelError",
    "OutputError",
    "OutputFidelity",
    "TensorRecord",
    "VerifyReport",
    "calibration_from_text",
    "compress",
    "fold_at_load",
    "inference_session",
    "load_calibration",
    "read_metadata",
    "save",
    "verify",
]
