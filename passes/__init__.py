"""Graph passes of jlcm-onnx, installed as ``jlcm_onnx.passes``.

Each pass is a small class with one job (see :mod:`jlcm_onnx.passes.base`); the compression pipeline in
:mod:`jlcm_onnx.pipeline.compress` lists them in order.
"""
