"""Sequential calibration: weights are encoded level by level, each level from statistics taken with every earlier
level already compressed, so each layer is fit to the inputs it will see in the compressed model (docs/method.md,
section 4), as GPTQ does.

Fitting a layer to the float layer's outputs instead (``min |W X - W^ X~|``, target ``W C H~^-1`` with the cross
product ``C = X X~^T``) was measured and dropped: on all-MiniLM-L6-v2 at 3 bits it lowered the fidelity (it fits 128
calibration sentences too closely), and a ridge strong enough to stop that left it no better than this.

The *level* of a weight counts the compressible weights on the deepest path from the model inputs to the activations
its consumers read::

    depth(x)  = max over the nodes n on paths to x of  [level(w) + 1 for each weight w that n reads]   (0: no weight)
    level(w)  = max over the activations x that w's consumers read of  depth(x)

Weights of one level never feed each other (Q, K and V of an attention block share a level), so one onnxruntime pass
over the calibration data collects the Grams of a whole level: a model of L levels takes L passes (all-MiniLM-L6-v2:
25). After a level is encoded (and learned), its decoded weights replace the float ones in a working copy of the
model, which the next pass runs. The encodings go to ``plan.encodings``; the encoder reuses them as they are. The
input model is not changed.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper, numpy_helper

from jlcm_onnx.analysis.activation_inputs import WeightActivations, activation_inputs
from jlcm_onnx.analysis.site_encoding import encode_site
from jlcm_onnx.analysis.statistics import batch_size, collect_statistics
from jlcm_onnx.devices import execution_providers
from jlcm_onnx.ir.weight_sites import compressible_sites, find_weight_sites, names_read_in_bodies
from jlcm_onnx.passes.base import PassResult
from jlcm_onnx.passes.collect_statistics import CalibrationPass
from jlcm_onnx.progress import Phase


class CalibrateSequentially(CalibrationPass):
    """Fills ``plan.statistics`` and ``plan.encodings`` level by level; leaves the model unchanged."""

    needs = frozenset({"choices", "groupings"})
    makes = frozenset({"statistics", "encodings", "layer_errors", "calibration_passes"})

    def call(self, model: onnx.ModelProto) -> PassResult:
        row_axes = {site.name: axis for site, axis in compressible_sites(model, self.config)}
        inputs = activation_inputs(model, row_axes)
        measured = {name: entry for name, entry in inputs.items() if entry.inputs}
        self.plan.statistics.update(collect_statistics(model, set(inputs) - set(measured), [], inputs=inputs))
        working = onnx.ModelProto()
        working.CopyFrom(model)
        sites = {site.name: site for site in find_weight_sites(working)}
        providers = execution_providers(self.plan.device)
        batch = batch_size(model, measured, next(iter(self.data)))
        by_level = defaultdict(list)
        for name, level in weight_levels(working.graph, measured).items():
            by_level[level].append(name)
        total = sum(sites[name].num_elements for name in measured)
        with Phase("sequential calibration", total=total, enabled=self.progress) as phase:
            for level in sorted(by_level):
                names = by_level[level]
                self.plan.statistics.update(
                    collect_statistics(working, names, self.data.batches(batch), inputs=measured, providers=providers,
                                       mask=self.data.mask))
                self.plan.calibration_passes += 1
                for name in names:
                    site, row_axis = sites[name], row_axes[name]
                    encoding = encode_site(site, row_axis, self.config, self.plan)
                    self.plan.encodings[name] = encoding.encoded
                    if encoding.layer_error is not None:
                        self.plan.layer_errors[name] = encoding.layer_error
                    decoded = encoding.decoded_weight(site.shape, row_axis)
                    dtype = helper.tensor_dtype_to_np_dtype(site.tensor.data_type)
                    site.tensor.CopyFrom(numpy_helper.from_array(decoded.astype(dtype), site.tensor.name))
                    phase.advance(site.num_elements)
        return PassResult(model, modified=False)


def weight_levels(graph: onnx.GraphProto, inputs: dict[str, WeightActivations]) -> dict[str, int]:
    """The level of each weight of ``inputs`` (see the module docstring), from one walk over the nodes of ``graph``
    in their (topological) order; a node with ``If``/``Loop``/``Scan`` bodies also depends on the outer tensors its
    bodies read."""
    reads = {name: {i.tensor for i in entry.inputs} for name, entry in inputs.items()}
    depth: dict[str, int] = {}
    levels: dict[str, int] = {}
    for node in graph.node:
        used = set(node.input) | names_read_in_bodies(node)
        weights = [name for name in used if name in reads]
        for weight in weights:
            levels[weight] = max(levels.get(weight, 0), *(depth.get(tensor, 0) for tensor in reads[weight]))
        out = max([depth.get(name, 0) for name in used] + [levels[w] + 1 for w in weights], default=0)
        for output in node.output:
            depth[output] = out
    return levels
