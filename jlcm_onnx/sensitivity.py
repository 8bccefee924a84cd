"""Output sensitivity of each weight, measured on calibration data: how much the size planner should care about it.

Data-free, the planner (:mod:`jlcm_onnx.size_target`) counts every tensor's relative weight error ``D_t`` the same. With
calibration data it can weigh them by what they do to the model's outputs. To first order the relative output error
of a model whose tensors are quantised with small independent errors is a weighted sum of their weight errors::

    E(y) = sum_t ||y - y^||^2 / ||y||^2  ~  sum_t a_t * D_t          a_t = E_t / D_t(probe)

where ``E_t`` is the output error with tensor t alone replaced by a probe encoding (``PROBE_BITS`` bits, the
configured encoding) and every other weight exact, over up to ``SAMPLES`` calibration samples. The planner then
minimises ``sum_t a_t * D_t(b_t, G_t)`` (:func:`weight_errors`), so bits move to the tensors the outputs feel most.

One onnxruntime session serves every probe: the measured initializers become graph inputs (never copied into it), fed
the original arrays except the probed one. Weights that cannot be fed this way (inside ``If``/``Loop``/``Scan``
bodies, in ``Constant`` nodes) get the median coefficient of the others. The reference outputs of the samples are kept
for every probe, so the samples are as many as fit in ``OUTPUT_BUDGET_BYTES`` of outputs (at least one): a
language model's logits over a vocabulary of 262,144 are 1 MB per token.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from jlcm_onnx.calibration import CalibrationData
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.distortion import ErrorTable
from jlcm_onnx.model_skeleton import skeleton
from jlcm_onnx.passes.site_encoding import encode_site
from jlcm_onnx.passes.weight_sites import compressible_row_axis, find_weight_sites
from jlcm_onnx.plan import CompressionPlan, TensorChoice

#: Bits of the probe encoding whose output error is measured (the planner's usual range at 3-4 bits average).
PROBE_BITS = 3
#: Calibration samples the probes are run on, at most.
SAMPLES = 16
#: The reference outputs kept for the probes hold at most this many bytes (fewer samples when they are large).
OUTPUT_BUDGET_BYTES = 256 << 20


def output_sensitivities(
    model: onnx.ModelProto, config: CompressionConfig, data: CalibrationData, providers: list[str],
    progress: bool = False,
) -> dict[str, float]:
    """``a_t = E_t / D_t(probe)`` of every compressible tensor of ``model`` (see the module docstring)."""
    sites = [(site, compressible_row_axis(site, config)[0]) for site in find_weight_sites(model)]
    sites = [(site, axis) for site, axis in sites if axis is not None]
    feedable = [(site, axis) for site, axis in sites if site.graph is model.graph and site.constant_node is None]
    probed = skeleton(model, {site.name for site, _ in feedable})
    session = ort.InferenceSession(probed.SerializeToString(), providers=providers)
    del probed
    originals = {site.name: site.array() for site, _ in feedable}
    samples, reference = [], []
    for sample in itertools.islice(data, SAMPLES):
        reference.append(session.run(None, {**sample, **originals}))
        samples.append(sample)
        if len(samples) * sum(np.asarray(o).nbytes for o in reference[0]) >= OUTPUT_BUDGET_BYTES:
            break
    energy = sum(_energy(outputs) for outputs in reference)
    coefficients: dict[str, float] = {}
    for site, row_axis in tqdm(feedable, desc="output sensitivity", unit="tensor", disable=not progress, leave=False):
        plan = CompressionPlan(config, choices={site.name: TensorChoice(PROBE_BITS, config.groups)})
        weight = originals[site.name]
        decoded = encode_site(site, row_axis, config, plan).decoded_weight(weight.shape, row_axis)
        weight_error = float(np.sum((decoded - weight) ** 2) / max(np.sum(weight.astype(np.float64) ** 2), 1e-300))
        feeds = {**originals, site.name: decoded.astype(weight.dtype)}
        output_error = sum(_energy([a - b for a, b in zip(session.run(None, {**sample, **feeds}), expected,
                                                           strict=True)])
                           for sample, expected in zip(samples, reference, strict=True))
        coefficients[site.name] = output_error / max(energy, 1e-300) / max(weight_error, 1e-300)
    fallback = float(np.median(list(coefficients.values()))) if coefficients else 1.0
    return {site.name: coefficients.get(site.name, fallback) for site, _ in sites}


def weight_errors(errors: ErrorTable, coefficients: dict[str, float]) -> ErrorTable:
    """The planner's table with every tensor's errors scaled by its output sensitivity."""
    return {name: {option: coefficients[name] * error for option, error in options.items()}
            for name, options in errors.items()}


def _energy(outputs: list[np.ndarray]) -> float:
    """Sum of squares of the float outputs."""
    return float(sum(np.sum(np.asarray(o, dtype=np.float64) ** 2) for o in outputs
                     if np.issubdtype(np.asarray(o).dtype, np.floating)))
