"""Weight encodings that are not codebooks of :mod:`jlcm_onnx.encodings.codebook`.

:mod:`jlcm_onnx.encodings.affine_blocks`: uniform levels with a scale and an integer zero point per block of inputs,
the format standard ``DequantizeLinear`` computes and onnxruntime runs in its fused ``MatMulNBits`` kernel.
"""
