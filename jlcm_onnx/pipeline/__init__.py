"""The compression pipeline: the pass list and its run (:mod:`~jlcm_onnx.pipeline.compress`), the size planner
(distortion tables, sensitivity, size targets), verification and the description of compressed files. Imports every
layer below; only the front ends (the public API in :mod:`jlcm_onnx`, the CLI, the Olive pass) import it.
"""
