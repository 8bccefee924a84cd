"""The weight formats, each an :class:`~jlcm_onnx.encodings.base.Encoding` strategy picked per weight by
:mod:`jlcm_onnx.encodings.registry`, and what they are built from.

Formats: :mod:`~jlcm_onnx.encodings.codebook_formats` (multi-codebook, input blocks, multi-scaling),
:mod:`~jlcm_onnx.encodings.vector_format` (vector codebooks) and :mod:`~jlcm_onnx.encodings.affine_format` (affine
blocks, ``speed="fast"``). Parts: k-means (``kmeans``, ``vector_kmeans``), the codebook fits (``codebook``,
``input_blocks``, ``multi_scaling``, ``outliers``), the affine fit (``affine_blocks``), joint learning (``learning``,
``row_block_learning``, ``error_feedback``, ``mapping_update``, ``vector_learning``), bit packing (``packing``), the
ONNX decoders (``codebook_decoder``, ``affine_decoder``) and the weight error (``sqnr``). Imports
:mod:`jlcm_onnx.ir` and the foundation only.
"""
