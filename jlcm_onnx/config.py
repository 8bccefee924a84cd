"""The one validated configuration object of a compression run.

Every field is checked when the object is built; a bad value raises :class:`~jlcm_onnx.errors.ConfigError` naming the
field and the value. The CLI builds the same object (from ``--config FILE`` and its flags) so both share one set of
defaults.
"""

from __future__ import annotations

import fnmatch
import glob
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from jlcm_onnx.config_values import check_int, check_positive, parse_size
from jlcm_onnx.errors import ConfigError, JlcmError

#: Consumer kinds whose weight inputs can be compressed, with the input slots that hold weights.
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "MatMul": (1,), "Gemm": (1,), "Conv": (1,), "ConvTranspose": (1,), "Gather": (0,),
    "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2),  # W and R, [directions, gates * hidden, inputs]
}
#: Consumer kinds that read a large float tensor as plain data, on any input (learned positional tables added to the
#: activations, an STFT basis or a hand-written cell's weights cut by Slice): compressed when no weight input reads it.
DATA_READERS = ("Add", "Sub", "Mul", "Div", "Where", "Concat", "Slice")
#: Every consumer kind ``op_types`` may name.
OP_TYPES = (*WEIGHT_SLOTS, *DATA_READERS)

#: The widest code: codes are packed at 1 to 8 bits (:mod:`jlcm_onnx.encodings.packing`).
MAX_BITS = 8
CODEBOOK_DTYPES = ("float16", "float32")
ENCODINGS = ("multi-codebook", "multi-scaling")
MAPPINGS = ("proximal", "naive", "frozen")
INITS = ("error-feedback", "kmeans")
TARGETS = ("target_size", "target_ratio", "target_bits_per_weight")
SPEEDS = ("small", "balanced", "fast")
AFFINE_OFFSETS = ("integer", "float")
#: Bits and block sizes of the affine-blocks format that onnxruntime's fused MatMulNBits kernel runs.
FAST_BITS = (2, 4, 8)
FAST_MIN_BLOCK = 16
#: onnxruntime 1.32's 2-bit kernel runs ~20x slower than the dense product with blocks of 16 (bench/decode_speed.py).
FAST_MIN_BLOCK_2_BITS = 32
FAST_DEFAULT_BLOCK = 32
#: Fields that bound how a run works but not what it writes.
RUN_ONLY_FIELDS = ("max_memory", "workers", "ray_address")
#: The default most estimated latency of speed 'balanced', a multiple of the dense products' (one token, batch 1).
DEFAULT_MAX_LATENCY_RATIO = 2.0
#: Fields added after files were written, with the default that leaves them out of a file's recorded settings.
LATER_FIELDS: dict[str, Any] = {"overrides": [], "vector_dim": 1, "max_latency_ratio": DEFAULT_MAX_LATENCY_RATIO}
#: What picks the weights of a per-tensor override, from the least specific to the most: the op type of any of the
#: weight's readers, and a glob on the weight's name.
OVERRIDE_SELECTORS = ("op_type", "name")
#: The settings an override may give its weights.
OVERRIDE_SETTINGS = ("bits", "groups", "outlier_fraction", "speed")


@dataclass(frozen=True)
class CompressionConfig:
    """Settings of a compression run.

    Attributes:
        bits: bits per weight index (1..8); each codebook holds ``2**bits`` values.
        groups: codebooks (or scales) per tensor, each shared by a contiguous range of output rows; ``None`` gives
            every output row its own (the default, and the most accurate).
        encoding: ``"multi-codebook"`` (a codebook of ``2**bits`` values per group) or ``"multi-scaling"`` (one
            codebook shared by all groups of a tensor, and a scale per group: cheaper when groups are small).
        block_size: when set, every row is also cut into blocks of this many consecutive inputs and each block gets
            a scale and an offset (codebook dtype) on top of its row group's codebook, which then holds normalised
            values: ``32 / block_size`` more bits per weight (fp16), for weights whose scale changes along the
            input axis (a model dequantised from GGUF blocks, say). With it, ``groups=1`` (one normalised codebook
            per tensor) is usually the best use of the bytes. Multi-codebook encoding only.
        vector_dim: inputs of a row that share one code (vector codebooks, d > 1): a codebook of ``2**(bits * d)``
            d-dimensional entries per group, one ``bits * d``-bit code per d consecutive inputs (so still ``bits``
            bits per weight), learned GPTVQ-style with calibration data. ``bits * vector_dim`` must be at most 8. With
            ``groups`` unset, groups share each codebook among enough rows that codebooks cost at most 1/8 bit per
            weight. A weight whose rows do not split into whole vectors keeps scalar codebooks. Not with speed 'fast'
            or multi-scaling.
        reorder: with ``groups`` set, cluster output rows by distribution and re-order them so each cluster is a
            contiguous group, folding the permutation into the next layer (outputs unchanged).
        min_elements: weights with fewer elements are left as they are.
        op_types: consumer kinds whose weight input is compressed (subset of :data:`OP_TYPES`: the weight inputs
            of MatMul, Gemm, Conv, ConvTranspose, Gather, LSTM, GRU and RNN, and tensors read as data by
            :data:`DATA_READERS` when no weight input reads them).
        include: glob patterns; when not empty, only weights whose name matches one are compressed.
        exclude: glob patterns of weight names never compressed.
        codebook_dtype: storage type of codebook values, ``"float16"`` or ``"float32"``.
        kmeans_iterations: the most Lloyd iterations per codebook (it stops earlier once assignments are stable).
        outlier_fraction: fraction of each tensor's weights (those farthest from their row mean) kept beside the
            codebooks as (int32 index, value in the codebook dtype) pairs (dense-and-sparse); 0 disables it. Not
            applied to embedding tables read by a lone Gather, which are decoded row by row.
        target_size: file size to hit, in bytes or as text (``"40MB"``, ``"1.5 GiB"``); with any target, bits and
            groups are chosen per tensor (the ``bits`` and ``groups`` fields are ignored) and the written file meets
            the target within 1%; with calibration data each tensor's error counts by its measured effect on the
            outputs (:mod:`jlcm_onnx.pipeline.sensitivity`).
        target_ratio: the file must be this many times smaller than the input file.
        target_bits_per_weight: average stored bits per compressed weight (codebooks, maps and outliers included).
        mapping: with calibration data, how codes move while codebooks are learned: ``"proximal"`` (the paper's
            update: a weight may only step to a neighbouring codeword), ``"naive"`` (to any codeword, the update the
            paper rejects, for ablation) or ``"frozen"`` (codes kept from k-means, codebooks only).
        init: with calibration data, where the learning starts: ``"error-feedback"`` (GPTQ-style codes against the
            k-means codebooks, each column's error pushed onto the columns not yet assigned, then a least-squares
            codebook refit) or ``"kmeans"`` (the data-free encoding).
        learning_steps: optimiser steps of the joint learning per layer after the init (with calibration data only);
            0 by default: on all-MiniLM-L6-v2 at 3 bits, proximal steps after the error-feedback init did not raise
            the fidelity and doubled the time (``python bench/calibration.py``, README "calibration").
        sequential: with calibration data, take each layer's statistics with the layers before it already compressed
            (one onnxruntime pass per level of the network) so it learns to correct their error; otherwise one pass
            on the float model.
        seed: seed of every random choice, so equal inputs give byte-identical outputs.
        speed: ``"small"`` (codebooks everywhere: the smallest file for its accuracy, every weight decoded by generic
            ops on each run, several times slower than the dense model) or ``"fast"`` (affine blocks,
            :mod:`jlcm_onnx.encodings.affine_blocks`: uniform ``bits``-bit levels with a scale and a zero point per
            ``block_size`` inputs, default 32, written as standard ``DequantizeLinear``, which onnxruntime fuses with
            MatMul/Gemm into its ``MatMulNBits`` kernel; an embedding table read by one Gather keeps a row decoder,
            over per-row codebooks without input blocks, or over its affine blocks with float offsets). ``"fast"``
            takes bits 2, 4 or 8 and raises the model's ai.onnx opset to 21 (25 for 2 bits); a model that
            ``onnx.version_converter`` cannot upgrade keeps its opset and gets codebooks (the report says why).
            ``"balanced"``: per weight, affine blocks or codebooks, codebooks where they save the most weight error
            per nanosecond they add, within ``max_latency_ratio`` (:mod:`jlcm_onnx.pipeline.balanced_speed`); only
            weights read by MatMul or Gemm, at 2, 4 or 8 bits, can be fused; ``block_size`` sizes the affine blocks.
        max_latency_ratio: with speed 'balanced', the most estimated time of the compressed weights' products, a
            multiple of the dense products' time at one token (from the cost model in the package).
        affine_offsets: with speed 'fast', what each affine block stores beside its scale: ``"integer"``, a zero point
            of the codes' type (DequantizeLinear's own: b bits per block); ``"float"``, an offset in the codebook dtype,
            carried exactly beside the fused product by a product of the block sums of the layer's input (a product
            1/B the layer's size); the grid is then free to sit anywhere, which reproduces weights that came from
            GGUF Q4_1-style blocks exactly. A weight read by a Gemm, or by one MatMul whose inputs do not split into
            whole blocks, keeps integer zero points.
        decode_at_load: write the codebook decoders without their run-time gate, so that any onnxruntime (C++,
            mobile, web, with no jlcm_onnx import) constant-folds them once at load: dense speed and dense memory
            from the small file (what :func:`jlcm_onnx.inference_session` does with ``keep_compressed=False``). With
            speed 'fast' it applies to the weights onnxruntime cannot fuse (Conv, ConvTranspose, shared weights):
            decoded once at load instead of dequantised on every run.
        keep_debug_metadata: keep the exporter's per-node debug metadata (torch's dynamo exporter writes a Python
            stack trace, an FX node dump and module scopes on every node: 0.6 MB on MiniLM, 3.7 MB on SmolLM2), which
            is otherwise dropped from the output (the report says how much); a model's own ``metadata_props`` are
            always kept.
        overrides: per-tensor settings over the ones above, coremltools-style: a list of objects, each with one
            selector, ``op_type`` (a weight any of whose readers is of that type, one of :data:`OP_TYPES`) or ``name``
            (a glob on the weight's name), and settings among :data:`OVERRIDE_SETTINGS`, e.g.
            ``[{"op_type": "Gather", "bits": 8}, {"name": "*attention*", "bits": 6}]``. The global settings apply
            first, then every op-type override that picks the weight, then every name override, each in list order
            (the later wins). A ``speed`` of ``"small"`` or ``"fast"`` gives a weight its own format. With speed
            'fast', bits must be 2, 4 or 8. Not with a size target (which chooses every tensor's bits); ``exclude``
            leaves a weight dense with or without one.
        max_memory: the memory the run may use, in bytes or as text (``"4GB"``); ``None``: 80% of what is available
            when it starts. It sizes the chunks of rows the encoders take at a time (the output does not depend on
            it), and a run whose estimated peak exceeds it is refused before it starts
            (:mod:`jlcm_onnx.memory_budget`). Not stored in the compressed model's metadata.
        workers: encode the weights in this many worker processes (``None``: threads of this process, one per core).
            The output is byte-identical either way (:mod:`jlcm_onnx.workers`). Not stored in the metadata.
        ray_address: encode the weights as tasks on a Ray cluster (``"local"``: start one on this machine;
            ``"auto"``, ``"ray://host:10001"``: join one; needs the ``ray`` extra); byte-identical output. Not with
            ``workers``, not stored in the metadata.

    Example:
        >>> CompressionConfig(bits=3).bits
        3
        >>> CompressionConfig(bits=9)
        Traceback (most recent call last):
        ...
        jlcm_onnx.errors.ConfigError: config field 'bits' = 9 is invalid: expected an integer in 1..8
    """

    bits: int = 4
    groups: int | None = None
    encoding: str = "multi-codebook"
    block_size: int | None = None
    vector_dim: int = 1
    reorder: bool = True
    min_elements: int = 1024
    op_types: tuple[str, ...] = OP_TYPES
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    codebook_dtype: str = "float16"
    kmeans_iterations: int = 100
    outlier_fraction: float = 0.002
    target_size: int | str | None = None
    target_ratio: float | None = None
    target_bits_per_weight: float | None = None
    mapping: str = "proximal"
    init: str = "error-feedback"
    learning_steps: int = 0
    sequential: bool = False
    seed: int = 0
    speed: str = "small"
    max_latency_ratio: float = DEFAULT_MAX_LATENCY_RATIO
    affine_offsets: str = "integer"
    decode_at_load: bool = False
    keep_debug_metadata: bool = False
    overrides: tuple[dict[str, Any], ...] = ()
    max_memory: int | str | None = None
    workers: int | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        check_int(self, "bits", 1, MAX_BITS)
        if self.groups is not None:
            check_int(self, "groups", 1, None)
        if self.block_size is not None:
            check_int(self, "block_size", 2, None)
        check_int(self, "vector_dim", 1, MAX_BITS)
        check_int(self, "min_elements", 1, None)
        check_int(self, "kmeans_iterations", 1, None)
        check_int(self, "seed", 0, None)
        check_int(self, "learning_steps", 0, None)
        if self.workers is not None:
            check_int(self, "workers", 1, None)
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address):
            raise ConfigError("ray_address", self.ray_address, "'local', 'auto' or a cluster address")
        if self.ray_address is not None and self.workers is not None:
            raise ConfigError("workers", self.workers, "unset with ray_address (Ray runs its own workers)")
        if self.mapping not in MAPPINGS:
            raise ConfigError("mapping", self.mapping, f"one of {list(MAPPINGS)}")
        if self.init not in INITS:
            raise ConfigError("init", self.init, f"one of {list(INITS)}")
        fraction = self.outlier_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 <= fraction <= 0.1:
            raise ConfigError("outlier_fraction", fraction, "a number in [0, 0.1]")
        for name in ("op_types", "include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(item, str) for item in value):
                raise ConfigError(name, value, "a list of strings")
            object.__setattr__(self, name, tuple(value))
        unknown = sorted(set(self.op_types) - set(OP_TYPES))
        if unknown or not self.op_types:
            raise ConfigError("op_types", list(self.op_types), f"a non-empty subset of {list(OP_TYPES)}")
        if self.encoding not in ENCODINGS:
            raise ConfigError("encoding", self.encoding, f"one of {list(ENCODINGS)}")
        if self.vector_dim > 1 and self.block_size is not None and self.block_size % self.vector_dim:
            raise ConfigError("vector_dim", self.vector_dim, f"a divisor of block_size {self.block_size} (a vector "
                              "lies in one input block)")
        if self.vector_dim > 1 and self.encoding == "multi-scaling":
            raise ConfigError("vector_dim", self.vector_dim, "1 with encoding 'multi-scaling' (vector codebooks are "
                              "one codebook per group)")
        if self.block_size is not None and self.encoding == "multi-scaling":
            raise ConfigError("block_size", self.block_size, "unset with encoding 'multi-scaling' (input blocks "
                              "scale per-group codebooks)")
        for name in ("reorder", "sequential", "decode_at_load", "keep_debug_metadata"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "true or false")
        for name in ("target_size", "max_memory"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parse_size(getattr(self, name), name))
        check_positive(self, "target_ratio", 1.0)
        check_positive(self, "target_bits_per_weight", 0.0)
        targets = [name for name in TARGETS if getattr(self, name) is not None]
        if len(targets) > 1:
            raise ConfigError(targets[1], getattr(self, targets[1]), f"no second target besides {targets[0]}")
        if self.target is None and self.bits * self.vector_dim > MAX_BITS:
            raise ConfigError("vector_dim", self.vector_dim, f"at most {MAX_BITS // self.bits} with {self.bits} bits "
                              f"(a vector's code has bits x vector_dim bits, at most {MAX_BITS})")
        self._check_speed()
        self._check_overrides()
        if self.codebook_dtype not in CODEBOOK_DTYPES:
            raise ConfigError("codebook_dtype", self.codebook_dtype, f"one of {list(CODEBOOK_DTYPES)}")

    def _check_speed(self) -> None:
        if self.speed not in SPEEDS:
            raise ConfigError("speed", self.speed, f"one of {list(SPEEDS)}")
        if self.affine_offsets not in AFFINE_OFFSETS:
            raise ConfigError("affine_offsets", self.affine_offsets, f"one of {list(AFFINE_OFFSETS)}")
        check_positive(self, "max_latency_ratio", 1.0)
        if self.speed == "small":
            return
        if self.vector_dim > 1:
            raise ConfigError("vector_dim", self.vector_dim, f"1 with speed '{self.speed}' (affine blocks are scalar)")
        if self.speed == "fast" and self.bits not in FAST_BITS:
            raise ConfigError("bits", self.bits, "2, 4 or 8 with speed 'fast' (the bits of onnxruntime's fused "
                              "MatMulNBits kernel)")
        block, least = self.block_size, FAST_MIN_BLOCK_2_BITS if self.bits == 2 else FAST_MIN_BLOCK
        if block is not None and (block < least or block & (block - 1)):
            raise ConfigError("block_size", block, f"a power of 2 >= {least} with speed '{self.speed}' and "
                              f"{self.bits} bits (what onnxruntime's fused kernel runs fast)")
        if self.target is not None:
            raise ConfigError(self.target[0], self.target[1], f"unset with speed '{self.speed}' (size targets "
                              "choose among codebook formats only, for now)")

    def _check_overrides(self) -> None:
        expected = (f"a list of objects, each with one of {list(OVERRIDE_SELECTORS)} and settings among "
                    f"{list(OVERRIDE_SETTINGS)}")
        if isinstance(self.overrides, str | dict) or not isinstance(self.overrides, list | tuple):
            raise ConfigError("overrides", self.overrides, expected)
        for item in self.overrides:
            selectors = [key for key in OVERRIDE_SELECTORS if isinstance(item, dict) and key in item]
            if len(selectors) != 1 or set(item) - set(OVERRIDE_SELECTORS) - set(OVERRIDE_SETTINGS) or len(item) < 2:
                raise ConfigError("overrides", item, expected)
            picked = item[selectors[0]]
            if selectors[0] == "op_type" and picked not in OP_TYPES:
                raise ConfigError("overrides", item, f"an op_type among {list(OP_TYPES)}")
            if not isinstance(picked, str):
                raise ConfigError("overrides", item, "a name glob given as a string")
            settings = {key: value for key, value in item.items() if key in OVERRIDE_SETTINGS}
            if settings.get("speed", "small") not in ("small", "fast"):
                raise ConfigError("overrides", item, "a speed of 'small' or 'fast' (a weight's own format)")
            try:
                replace(self, overrides=(), target_size=None, target_ratio=None, target_bits_per_weight=None,
                        **settings)
            except ConfigError as error:
                raise ConfigError("overrides", item, f"valid settings ({error.expected})") from None
        object.__setattr__(self, "overrides", tuple(dict(item) for item in self.overrides))
        if self.overrides and self.target is not None:
            raise ConfigError("overrides", list(self.overrides), "unset with a size target (which chooses every "
                              "tensor's bits); use exclude to leave weights dense")

    def override_settings(self, name: str, op_types: Iterable[str]) -> dict[str, Any]:
        """The settings :attr:`overrides` give a weight named ``name`` whose readers are of ``op_types``: op-type
        overrides first, then name overrides, each in list order (the later wins); empty when none picks it."""
        readers = set(op_types)
        merged: dict[str, Any] = {}
        for selector in OVERRIDE_SELECTORS:
            for item in self.overrides:
                picked = item.get(selector)
                if picked is not None and (picked in readers if selector == "op_type"
                                           else fnmatch.fnmatchcase(name, picked)):
                    merged.update({key: value for key, value in item.items() if key in OVERRIDE_SETTINGS})
        return merged

    def tensor_speed(self, name: str, op_types: Iterable[str]) -> str:
        """The speed of the weight ``name`` read by ``op_types``: an override's, else the run's, where 'balanced'
        (whose planner gives each weight it fuses a 'fast' override) leaves a weight in codebooks: 'small'."""
        default = "small" if self.speed == "balanced" else self.speed
        return self.override_settings(name, op_types).get("speed", default)

    def with_tensor_speeds(self, fast: Iterable[str]) -> CompressionConfig:
        """A copy that gives the weights named in ``fast`` speed 'fast' (name overrides, after the others)."""
        speeds = tuple({"name": glob.escape(name), "speed": "fast"} for name in fast)
        return replace(self, overrides=(*self.overrides, *speeds))

    @property
    def fuses_any(self) -> bool:
        """True when some weight may get affine blocks: speed 'fast', or an override giving it."""
        return self.speed == "fast" or any(item.get("speed") == "fast" for item in self.overrides)

    @property
    def codebook_block_size(self) -> int | None:
        """The input blocks of codebook encodings: ``block_size``, except with speed 'fast' or 'balanced', where it
        sizes the affine blocks and the codebooks have none."""
        return self.block_size if self.speed == "small" else None

    @property
    def max_bits(self) -> int:
        """The most bits per weight a tensor may get: 8, or ``8 // vector_dim`` with vector codebooks."""
        return MAX_BITS // self.vector_dim

    @property
    def affine_block_size(self) -> int:
        """The inputs per scale of the affine blocks of speed 'fast' (and of the weights 'balanced' fuses)."""
        return self.block_size or FAST_DEFAULT_BLOCK

    @property
    def target(self) -> tuple[str, float] | None:
        """The size target as (field name, value), or None."""
        return next(((name, getattr(self, name)) for name in TARGETS if getattr(self, name) is not None), None)

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    def encoding_settings(self) -> dict[str, Any]:
        """:meth:`to_dict` without the fields that only bound the run (:data:`RUN_ONLY_FIELDS`), and without the
        fields added later that hold their default (:data:`LATER_FIELDS`, so files written without them keep the
        bytes they had before the field existed): what a compressed model's metadata records."""
        return {key: value for key, value in self.to_dict().items()
                if key not in RUN_ONLY_FIELDS and not (key in LATER_FIELDS and value == LATER_FIELDS[key])}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompressionConfig:
        """Builds a config from a mapping such as a parsed JSON file; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(unknown[0], values[unknown[0]], f"a known field ({', '.join(sorted(known))})")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> CompressionConfig:
        """Reads a JSON object of config fields."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise JlcmError(f"cannot read config file {path}: {error}") from None
        if not isinstance(values, dict):
            raise JlcmError(f"config file {path} must hold a JSON object of config fields")
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> CompressionConfig:
        """A copy with some fields changed (and validated)."""
        return type(self).from_dict({**self.to_dict(), **changes})
