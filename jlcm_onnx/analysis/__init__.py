"""What the passes read: calibration data, per-layer statistics (Grams), neuron grouping, the per-tensor plan, and
the plan's encoding of one weight site. Imports :mod:`jlcm_onnx.ir` and :mod:`jlcm_onnx.encodings`, never a layer
above.
"""
