"""The pass list of a compression run, and one run of it through the pass manager.
"""

from __future__ import annotations

import onnx

from jlcm_onnx.analysis.calibration import CalibrationData
from jlcm_onnx.analysis.grouping import RowClusterings
from jlcm_onnx.analysis.plan import CompressionPlan
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.registry import model_needs
from jlcm_onnx.ir.runtime import fold_at_load
from jlcm_onnx.passes.base import Pass
from jlcm_onnx.passes.calibrate_sequentially import CalibrateSequentially
from jlcm_onnx.passes.collect_statistics import CollectStatistics
from jlcm_onnx.passes.encode_weights import EncodeWeights
from jlcm_onnx.passes.manager import PassManager, PipelineRun
from jlcm_onnx.passes.reorder_neurons import ReorderNeurons
from jlcm_onnx.passes.stand_in_encodings import StandInEncodings
from jlcm_onnx.passes.strip_debug_metadata import StripDebugMetadata
from jlcm_onnx.passes.untie_heads import UntieHeads
from jlcm_onnx.passes.upgrade_opset import UpgradeOpset
from jlcm_onnx.pipeline.metadata import write_metadata


def build_pipeline(
    config: CompressionConfig, plan: CompressionPlan, progress: bool, data: CalibrationData | None = None,
    rehearsal: bool = False, clusterings: RowClusterings | None = None,
) -> list[Pass]:
    """The passes of a compression run, in order; the re-ordering pass hands its group sizes to the encoder, and with
    calibration data the statistics of the re-ordered model's layers go to the encoder's joint learning. A
    ``rehearsal`` encodes stand-ins instead (no data used): the same file layout and bytes, nothing fitted. The
    model's opset and IR version are first raised to what the formats' decoders need (DequantizeLinear with blocks,
    with speed 'fast'), and with speed 'fast' tables tied to a language-model head get a copy for the head; the
    exporter's debug metadata goes last (unless ``keep_debug_metadata``). Runs over one model share its row
    ``clusterings``."""
    opset, ir_version = model_needs(config)
    upgrade: list[Pass] = [UpgradeOpset(opset, ir_version)] if opset or ir_version else []
    if config.speed == "fast":
        upgrade.append(UntieHeads(config))
    if rehearsal:
        middle: list[Pass] = [StandInEncodings(config, plan)]
    else:
        calibration = CalibrateSequentially if config.sequential else CollectStatistics
        middle = [] if data is None else [calibration(config, plan, data, progress)]
    reorder = ReorderNeurons(config, plan, clusterings)
    strip: list[Pass] = [] if config.keep_debug_metadata else [StripDebugMetadata()]
    return [*upgrade, reorder, *middle, EncodeWeights(config, plan, progress=progress), *strip]


def run_passes(
    source: onnx.ModelProto,
    config: CompressionConfig,
    plan: CompressionPlan,
    progress: bool,
    data: CalibrationData | None = None,
    rehearsal: bool = False,
    clusterings: RowClusterings | None = None,
) -> PipelineRun:
    """One run of the pipeline over ``source``, which it consumes (edits in place or replaces), with metadata
    written: the compressed model (a fresh message), its tensor records, the notes of the passes and what ran."""
    manager = PassManager(build_pipeline(config, plan, progress, data, rehearsal, clusterings))
    held = [source]
    del source  # the manager holds the only reference: a pass that returns a new model frees the old one
    run = manager.run(held.pop())
    if config.decode_at_load:
        fold_at_load(run.model)
    write_metadata(run.model, config, run.tensors)
    compact = onnx.ModelProto()  # a fresh message: the input's buffers, which the edited one still holds, can go
    compact.CopyFrom(run.model)
    run.model = compact
    return run
