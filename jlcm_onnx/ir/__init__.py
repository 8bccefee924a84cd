"""The model layer: an ONNX model's weights and graph, whatever is compressed in it.

Weight sites (which initializer feeds which node input, and its rows), lazily read external data, the model skeleton
used for statistics and stand-in runs, folding a neuron permutation into the graph, decoders packed as model-local
functions, and loading, checking, saving and running models. Imports only the foundation modules
(:mod:`jlcm_onnx.config`, :mod:`jlcm_onnx.errors`, :mod:`jlcm_onnx.report`, ...), never a layer above.
"""
