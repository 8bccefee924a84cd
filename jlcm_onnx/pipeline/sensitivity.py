"""Output sensitivity of each weight, measured on calibration data: how much the size planner should care about it.

Data-free, the planner (:mod:`jlcm_onnx.pipeline.size_target`) counts every tensor's relative weight error ``D_t`` the
same. With calibration data it can weigh them by what they do to the model's outputs. To first order the relative output
error of a model whose tensors are quantised with small independent errors is a weighted sum of their weight errors::

    E(y) = sum_t ||y - y^||^2 / ||y||^2  ~  sum_t a_t * D_t          a_t = E_t / D_t(probe)

where ``E_t`` is the output error with tensor t alone replaced by a probe encoding (``PROBE_BITS`` bits, the configured
encoding, k-means stopped at the option table's ``ESTIMATE_ITERATIONS``) and every other weight exact, over up to
``SAMPLES`` calibration samples. The planner then minimises ``sum_t a_t * D_t(b_t, G_t)`` (:func:`weight_errors`), so
bits move to the tensors the outputs feel most.

One onnxruntime session serves every probe: the measured initializers become graph inputs (never copied into it), fed
the original arrays except the probed one. Weights that cannot be fed this way (inside ``If``/``Loop``/``Scan`` bodies,
in ``Constant`` nodes) get the median coefficient of the others. The reference outputs of the samples are kept for every
probe, so the samples are as many as fit in ``OUTPUT_BUDGET_BYTES`` of outputs (at least one): a language model's logits
over a vocabulary of 262,144 are 1 MB per token. Large outputs also mark the models whose probes are costly (every probe
is a forward pass per sample, and a language model has hundreds of tensors), and there few samples suffice: on
SmolLM2-135M (windows of 256 tokens, 50 MB of logits each, so one sample) the coefficients from one sample stay close
to those from five, and one sample halves the probes' time for a slightly higher size-target perplexity.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort

from jlcm_onnx.analysis.calibration import CalibrationData
from jlcm_onnx.analysis.plan import CompressionPlan, TensorChoice
from jlcm_onnx.analysis.site_encoding import encode_site
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.ir.model_skeleton import skeleton
from jlcm_onnx.ir.weight_sites import compressible_sites
from jlcm_onnx.pipeline.distortion import ESTIMATE_ITERATIONS, ErrorTable
from jlcm_onnx.progress import Phase

#: Bits of the probe encoding whose output error is measured (the planner's usual range at 3-4 bits average).
PROBE_BITS = 3
#: Calibration samples the probes are run on, at most.
SAMPLES = 16
#: The reference outputs kept for the probes hold at most this many bytes (fewer samples when they are large).
OUTPUT_BUDGET_BYTES = 64 << 20


def output_sensitivities(
    model: onnx.ModelProto, config: CompressionConfig, data: CalibrationData, providers: list[str],
    progress: bool = False,
) -> dict[str, float]:
    """``a_t = E_t / D_t(probe)`` of every compressible tensor of ``model`` (see the module docstring)."""
    sites = compressible_sites(model, config)
    feedable = [(site, axis) for site, axis in sites if site.graph is model.graph and site.constant_node is None]
    with Phase("output sensitivity", total=len(feedable), enabled=progress) as phase:
        probed = skeleton(model, {site.name for site, _ in feedable})
        session = ort.InferenceSession(probed.SerializeToString(), providers=providers)
        del probed
        originals = {site.name: site.array() for site, _ in feedable}
        samples, reference = [], []
        for sample in itertools.islice(data, SAMPLES):
            reference.append(session.run(None, {**sample, **originals}))
            samples.append(sample)
            if (len(samples) + 1) * sum(np.asarray(o).nbytes for o in reference[0]) > OUTPUT_BUDGET_BYTES:
                break
        energy = sum(_squared_distance(outputs) for outputs in reference)
        probe_config = config.replace(kmeans_iterations=ESTIMATE_ITERATIONS)
        coefficients: dict[str, float] = {}
        for site, row_axis in feedable:
            plan = CompressionPlan(probe_config, choices={site.name: TensorChoice(PROBE_BITS, config.groups)})
            weight = originals[site.name]
            decoded = encode_site(site, row_axis, probe_config, plan).decoded_weight(weight.shape, row_axis)
            weight_error = _squared_distance([decoded], [weight]) / max(_squared_distance([weight]), 1e-300)
            feeds = {**originals, site.name: decoded.astype(weight.dtype, copy=False)}
            del decoded
            output_error = sum(_squared_distance(session.run(None, {**sample, **feeds}), expected)
                               for sample, expected in zip(samples, reference, strict=True))
            coefficients[site.name] = output_error / max(energy, 1e-300) / max(weight_error, 1e-300)
            phase.advance()
    fallback = float(np.median(list(coefficients.values()))) if coefficients else 1.0
    return {site.name: coefficients.get(site.name, fallback) for site, _ in sites}


def weight_errors(errors: ErrorTable, coefficients: dict[str, float]) -> ErrorTable:
    """The planner's table with every tensor's errors scaled by its output sensitivity."""
    return {name: {option: coefficients[name] * error for option, error in options.items()}
            for name, options in errors.items()}


#: Elements of an output taken at a time when squared distances are summed in float64.
DISTANCE_CHUNK = 1 << 20


def _squared_distance(outputs: list, expected: list | None = None) -> float:
    """``sum ||o - e||^2`` over the float outputs (``sum ||o||^2`` without ``expected``), a chunk at a time, so a large
    output (a language model's logits) is not copied whole: each chunk's differences and dot product in float32 (within
    1e-4 of float64's, ample for a coefficient), the chunks summed in float64."""
    total = 0.0
    for index, output in enumerate(outputs):
        flat = np.asarray(output).reshape(-1)
        if not np.issubdtype(flat.dtype, np.floating):
            continue
        other = None if expected is None else np.asarray(expected[index]).reshape(-1)
        for start in range(0, flat.size, DISTANCE_CHUNK):
            chunk = flat[start:start + DISTANCE_CHUNK].astype(np.float32)
            if other is not None:
                chunk -= other[start:start + DISTANCE_CHUNK]
            total += float(np.dot(chunk, chunk))
    return total
