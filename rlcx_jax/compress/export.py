"""The shipped artifact: one binary file holding a (quantized, sparse) policy, and its loader.

File layout (format 3; integers little-endian, "varint" = unsigned LEB128)::

    4 bytes   magic b"RLCX"
    1 byte    format version (3)
    varint    length M, then M bytes: the metadata, UTF-8 JSON compressed by zlib with a preset
              dictionary (`_ZDICT`: the keys and the usual values of this format, so a header that
              says what every header says costs a few bytes): net_config, obs_shape, action_spec,
              head, qspec, include/exclude, user meta, payload codec, and the leaf table
              [[path, shape], ...]
    varint    length L, then L bytes: one binary record per leaf, in the table's order
              (`_pack_record`): storage / index encoding / scheme flags in one byte, then bits,
              stored count, gap width and stream length, and the shape of the scales, as needed
    payload   the blobs of every leaf back to back (index, values, then scales / zero points /
              exponents / codebook), each of a length that follows from its record; with
              `payload_codec="lzma"` the payload is one raw LZMA2 stream instead: a lossless
              entropy-coding stage over codes, indices and floats, the role Huffman coding plays in
              Han et al. 2016's Deep Compression (prune, quantize, entropy-code)

For the 64x64 CartPole actor everything but the payload (magic, lengths, metadata, leaf records)
takes about 65 bytes, where format 2 (an 8-byte magic and a zlib JSON header with per-leaf dicts
and blob offsets, ~560 bytes) spent more than the int8 codes themselves. `load` still reads format 2.

Per leaf, values are either float32 / float16 (unquantized) or integer codes (`quant.QTensor`)
packed at exactly `bits` bits each (`pack_bits`: 4-bit codes two per byte, 2-bit four per byte,
3/5/6/7/... bits straddling bytes), plus the scales and zero points (uniform), max exponents (log)
or the codebook (k-means). Codes are stored unsigned, offset by the scheme's `qmin`.

Sparsity: the entries equal to zero (the zero code of a quantized leaf; the all-zero bit pattern
of a float leaf) need not be stored. Every leaf takes the smallest of three index encodings:

- "dense": every value, no index;
- "bitmap": one bit per entry (1 = stored) + the stored values;
- "gaps" (r bits): a run-length stream in the spirit of Han et al. 2016's relative indices: for each
  stored entry the number of skipped zeros a is written as floor(a / E) escape symbols E = 2^r - 1
  (each: skip E more, store nothing) followed by a mod E; r in 1..16 is chosen per leaf. At 90%
  sparsity the best r (4 or 5) costs ~5 bits per stored entry, close to the 4.7-bit entropy bound
  and half the bitmap's 10 bits. Unlike Han et al.'s filler zeros, an escape carries no value.

Zeros are found from the values themselves, so masks only matter for what is zeroed before
quantization (and for k-means, which then reserves code 0 for exact zero). `load` rebuilds every
leaf through `quant.dequantize`, the same arithmetic as `quant.fake_quant`, so the loaded parameters
equal `quant.quantize_tree(params, qspec, include, exclude, masks)` bit for bit. The file is written
to a temporary name and renamed (atomic); its size on disk is the reported size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import lzma
import math
import os
import struct as pystruct
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlcx_jax import nets
from rlcx_jax.checkpoint import from_jsonable, to_jsonable
from rlcx_jax.compress.quant import (
    DEFAULT_INCLUDE,
    QTensor,
    QuantSpec,
    code_range,
    dequantize,
    flatten_with_paths,
    masks_by_path,
    quantize_codes,
    select_paths,
)
from rlcx_jax.nets.policy import executed_action, greedy_action, sample_action

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "Artifact",
    "export",
    "load",
    "breakdown",
    "dense_float32_bytes",
    "pack_bits",
    "unpack_bits",
]

MAGIC = b"RLCX"
FORMAT_VERSION = 3  # 3: binary leaf records, dictionary-compressed metadata; 2: zlib JSON header
_MAGIC_V2 = b"RLCXQNT1"
FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16}
MAX_GAP_BITS = 16
_HEADER_LEN = pystruct.Struct("<I")  # format 2
# The preset zlib dictionary of format 3's metadata (fixed with the format: changing it breaks
# reading). zlib finds matches in it as in earlier data, nearest (cheapest) at its end.
_ZDICT = (
    b'{"net_config":{"torso":"cnn","hidden":[256,256],"activation":"relu","separate_critic":false,'
    b'"conv_features":16,"conv_kernel":3},"obs_shape":[10,10,4],"action_spec":{"discrete":false,'
    b'"num_actions":0,"shape":[1],"low":-2.0,"high":2.0},"head":"q","qspec":{"scheme":"kmeans","bits":4,'
    b'"symmetric":false,"per_channel":true,"range_method":"percentile","percentile":99.99,"kmeans_iters":16,'
    b'"kmeans_init":"linear"},"include":[".*"],"exclude":[],"meta":{"env":"CartPole-v1"},'
    b'"payload_codec":"lzma","leaves":[["torso/Conv_0/bias",[16]],["torso/Conv_0/kernel",[3,3,4,16]],'
    b'["torso/Dense_0/bias",[256]],["torso/Dense_0/kernel",[1024,256]],["q_head/bias",[6]],'
    b'["q_head/kernel",[256,6]],["value_head/bias",[1]],["value_head/kernel",[64,1]],'
    b'["critic_torso/Dense_0/bias",[64]],["critic_torso/Dense_0/kernel",[4,64]],'
    b'["critic_torso/Dense_1/bias",[64]],["critic_torso/Dense_1/kernel",[64,64]],["log_std",[1]]]}'
    b'{"net_config":{"torso":"mlp","hidden":[64,64],"activation":"tanh","separate_critic":true,'
    b'"conv_features":16,"conv_kernel":3},"obs_shape":[4],"action_spec":{"discrete":true,'
    b'"num_actions":2,"shape":[],"low":null,"high":null},"head":"actor_critic","qspec":{"scheme":"uniform",'
    b'"bits":8,"symmetric":true,"per_channel":false,"range_method":"minmax","percentile":99.99,'
    b'"kmeans_iters":16,"kmeans_init":"optimal"},"include":[".*kernel"],"exclude":[],"meta":{},'
    b'"payload_codec":"none","leaves":[["actor_torso/Dense_0/bias",[64]],'
    b'["actor_torso/Dense_0/kernel",[4,64]],["actor_torso/Dense_1/bias",[64]],'
    b'["actor_torso/Dense_1/kernel",[64,64]],["policy_head/bias",[2]],["policy_head/kernel",[64,2]]]}'
)
_FORMAT3_NET_FIELDS = ("torso", "hidden", "activation", "separate_critic", "conv_features", "conv_kernel")
"""The `NetConfig` fields format 3 was fixed with (and its dictionary holds): always written. A field added
to `NetConfig` later is written only when it differs from its default, so the headers of networks that do
not use it keep their size; a missing field loads as its default (changing such a default would need a
new format version)."""
PAYLOAD_CODECS = ("none", "lzma")
# Raw LZMA2 (no container header: small files stay small), strongest preset; the payloads are tiny.
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


# ----------------------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------------------
def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers < 2^bits at `bits` bits each, LSB first: ceil(n * bits / 8) bytes."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    v = np.asarray(values).reshape(-1)
    if v.size and (v.min() < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values must lie in [0, 2^{bits}) to pack at {bits} bits")
    v = v.astype(np.uint32)
    bitmatrix = (v[:, None] >> np.arange(bits, dtype=np.uint32)) & np.uint32(1)
    return np.packbits(bitmatrix.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` uint32 values."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    if len(data) < math.ceil(count * bits / 8):
        raise ValueError(f"{len(data)} bytes cannot hold {count} values of {bits} bits")
    raw = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits, bitorder="little")
    bitmatrix = raw.reshape(count, bits).astype(np.uint32)
    return (bitmatrix << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def _nbytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


# ----------------------------------------------------------------------------------------------
# Index encodings of the stored (non-zero) positions
# ----------------------------------------------------------------------------------------------
def _skips(positions: np.ndarray) -> np.ndarray:
    """Zeros skipped before each stored position (positions ascending)."""
    return np.diff(positions, prepend=-1) - 1


def _gap_stream(positions: np.ndarray, r: int) -> np.ndarray:
    escape = 2**r - 1
    skips = _skips(positions)
    n_escapes = skips // escape
    lengths = n_escapes + 1
    stream = np.full(int(lengths.sum()), escape, dtype=np.uint32)
    stream[np.cumsum(lengths) - 1] = skips - n_escapes * escape
    return stream


def _gap_positions(stream: np.ndarray, r: int) -> np.ndarray:
    escape = 2**r - 1
    emit = stream != escape
    advance = np.where(emit, stream.astype(np.int64) + 1, escape)
    return (np.cumsum(advance) - 1)[emit]


def _choose_index(n: int, positions: np.ndarray, value_bits: int, sparse: bool) -> tuple[str, int]:
    """(encoding, r) of smallest size; ties prefer dense, then bitmap."""
    nnz = positions.size
    values = _nbytes(nnz, value_bits)
    best = ("dense", 0, _nbytes(n, value_bits))
    if not sparse:
        return best[:2]
    candidates = [("bitmap", 0, _nbytes(n, 1) + values)]
    skips = _skips(positions)
    for r in range(1, MAX_GAP_BITS + 1):
        stream_len = nnz + int((skips // (2**r - 1)).sum())
        candidates.append(("gaps", r, _nbytes(stream_len, r) + values))
    for cand in candidates:
        if cand[2] < best[2]:
            best = cand
    return best[:2]


def _encode_index(kind: str, r: int, n: int, positions: np.ndarray) -> tuple[dict[str, Any], bytes]:
    if kind == "dense":
        return {}, b""
    if kind == "bitmap":
        bitmap = np.zeros(n, np.uint8)
        bitmap[positions] = 1
        return {}, pack_bits(bitmap, 1)
    stream = _gap_stream(positions, r)
    return {"r": r, "m": int(stream.size)}, pack_bits(stream, r) if stream.size else b""


def _decode_index(rec: Mapping[str, Any], n: int, blob: bytes) -> np.ndarray:
    kind = rec["index"]
    if kind == "dense":
        return np.arange(n)
    if kind == "bitmap":
        return np.flatnonzero(unpack_bits(blob, 1, n))
    if kind == "gaps":
        stream = unpack_bits(blob, rec["r"], rec["m"]) if rec["m"] else np.zeros(0, np.uint32)
        return _gap_positions(stream, rec["r"])
    raise ValueError(f"Unknown index encoding {kind!r}")


# ----------------------------------------------------------------------------------------------
# Format 3's binary leaf records
# ----------------------------------------------------------------------------------------------
_STORAGES = ("float32", "float16", "quant")
_INDEXES = ("dense", "bitmap", "gaps")
_SCHEMES = ("uniform", "log", "kmeans")


def _varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, high bit set on every byte but the last."""
    if value < 0:
        raise ValueError(f"varint of a negative number {value}")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Cursor:
    """Reads bytes and varints off a buffer; running past its end is a clear ValueError."""

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"Truncated artifact: {self.what} ends early")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value


def _pack_record(rec: Mapping[str, Any]) -> bytes:
    """One leaf's encoding (everything but its path and shape, which the metadata's table holds)."""
    quant = rec["storage"] == "quant"
    flags = _STORAGES.index(rec["storage"]) | _INDEXES.index(rec["index"]) << 2
    if quant:
        flags |= _SCHEMES.index(rec["scheme"]) << 4 | int(rec["symmetric"]) << 6 | int(rec["zero_reserved"]) << 7
    out = bytearray([flags])
    if quant:
        out.append(rec["bits"])
    if rec["index"] != "dense":
        out += _varint(rec["nnz"])
    if rec["index"] == "gaps":
        out.append(rec["r"])
        out += _varint(rec["m"])
    if quant and rec["scheme"] == "kmeans":
        out += _varint(rec["codebook_size"])
    elif quant:
        out.append(len(rec["param_shape"]))
        for dim in rec["param_shape"]:
            out += _varint(dim)
    return bytes(out)


def _unpack_record(cur: _Cursor, path: str, shape: list[int]) -> dict[str, Any]:
    flags = cur.byte()
    try:
        storage, index = _STORAGES[flags & 3], _INDEXES[flags >> 2 & 3]
        scheme = _SCHEMES[flags >> 4 & 3] if storage == "quant" else None
    except IndexError:
        raise ValueError(f"Corrupt artifact: leaf {path!r} has an unknown encoding (flags {flags:#04x})") from None
    rec: dict[str, Any] = {"path": path, "shape": shape, "storage": storage, "index": index}
    if scheme is not None:
        rec.update(scheme=scheme, symmetric=bool(flags >> 6 & 1), zero_reserved=bool(flags >> 7 & 1), bits=cur.byte())
    rec["nnz"] = int(np.prod(shape)) if index == "dense" else cur.varint()
    if index == "gaps":
        rec["r"] = cur.byte()
        rec["m"] = cur.varint()
    if scheme == "kmeans":
        rec["codebook_size"] = cur.varint()
    elif scheme is not None:
        rec["param_shape"] = [cur.varint() for _ in range(cur.byte())]
    return rec


def _blob_lengths(rec: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(name, bytes) of a leaf's blobs in payload order, from its record alone."""
    n = int(np.prod(rec["shape"]))
    index = {"dense": 0, "bitmap": _nbytes(n, 1), "gaps": _nbytes(rec.get("m", 0), rec.get("r", 1))}[rec["index"]]
    if rec["storage"] != "quant":
        return [("index", index), ("values", rec["nnz"] * np.dtype(FLOAT_DTYPES[rec["storage"]]).itemsize)]
    out = [("index", index), ("values", _nbytes(rec["nnz"], rec["bits"]))]
    if rec["scheme"] == "kmeans":
        return out + [("codebook", 4 * rec["codebook_size"])]
    count = int(np.prod(rec["param_shape"]))
    if rec["scheme"] == "log":
        return out + [("exponent", count)]
    out.append(("scale", 4 * count))
    if not rec["symmetric"]:
        out.append(("zero_point", _nbytes(count, rec["bits"])))
    return out


def _locate_blobs(records: list[dict[str, Any]], payload_size: int) -> None:
    """Give every record the [offset, length] of its blobs (they follow each other in order)."""
    offset = 0
    for rec in records:
        rec["blobs"] = {}
        for name, length in _blob_lengths(rec):
            rec["blobs"][name] = [offset, length]
            offset += length
    if offset != payload_size:
        problem = "Truncated artifact" if offset > payload_size else "Corrupt artifact (trailing bytes)"
        raise ValueError(f"{problem}: the leaf records describe {offset} payload bytes, the file holds {payload_size}")


# ----------------------------------------------------------------------------------------------
# Leaves
# ----------------------------------------------------------------------------------------------
class _Writer:
    """Collects payload blobs and their [offset, length]."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.offset = 0

    def add(self, data: bytes) -> list[int]:
        self.parts.append(data)
        ref = [self.offset, len(data)]
        self.offset += len(data)
        return ref


def _encode_values_and_index(
    rec: dict[str, Any],
    writer: _Writer,
    flat: np.ndarray,
    keep: np.ndarray,
    value_bits: int,
    sparse: bool,
    to_bytes: Callable[[np.ndarray], bytes],
) -> None:
    positions = np.flatnonzero(keep)
    kind, r = _choose_index(flat.size, positions, value_bits, sparse)
    if kind == "dense":
        positions = np.arange(flat.size)
    extra, index_blob = _encode_index(kind, r, flat.size, positions)
    rec.update(index=kind, nnz=int(positions.size), **extra)
    rec["blobs"]["index"] = writer.add(index_blob)
    rec["blobs"]["values"] = writer.add(to_bytes(flat[positions]))


def _encode_float(rec: dict[str, Any], writer: _Writer, value: np.ndarray, float_dtype: str, sparse: bool) -> None:
    dtype = FLOAT_DTYPES[float_dtype]
    flat = np.ascontiguousarray(value.astype(dtype).reshape(-1))
    uint = np.uint32 if dtype == np.float32 else np.uint16
    keep = flat.view(uint) != 0  # bit pattern, so -0.0 is kept
    rec.update(storage=float_dtype)
    _encode_values_and_index(rec, writer, flat, keep, 8 * flat.itemsize, sparse, lambda v: v.astype(dtype).tobytes())


def _encode_quant(rec: dict[str, Any], writer: _Writer, q: QTensor, sparse: bool) -> None:
    codes = np.asarray(q.codes, np.int64)
    zero = q.zero_code()
    keep = np.ones(codes.shape, bool) if zero is None else codes != np.asarray(zero)
    flat = (codes - q.qmin).reshape(-1)
    rec.update(storage="quant", scheme=q.scheme, bits=q.bits, symmetric=q.symmetric, zero_reserved=q.zero_reserved)
    _encode_values_and_index(rec, writer, flat, keep.reshape(-1), q.bits, sparse, lambda v: pack_bits(v, q.bits))
    if q.scheme == "uniform":
        scale = np.asarray(q.scale, np.float32)
        rec["param_shape"] = list(scale.shape)
        rec["blobs"]["scale"] = writer.add(scale.tobytes())
        if not q.symmetric:
            rec["blobs"]["zero_point"] = writer.add(pack_bits(np.asarray(q.zero_point), q.bits))
    elif q.scheme == "log":
        exponent = np.asarray(q.exponent)
        rec["param_shape"] = list(exponent.shape)
        rec["blobs"]["exponent"] = writer.add(exponent.astype(np.int8).tobytes())
    else:
        codebook = np.asarray(q.codebook, np.float32)
        rec["codebook_size"] = int(codebook.size)
        rec["blobs"]["codebook"] = writer.add(codebook.tobytes())


def _blob(payload: memoryview, rec: Mapping[str, Any], name: str) -> bytes:
    offset, length = rec["blobs"][name]
    if offset + length > len(payload):
        raise ValueError(f"Truncated artifact: blob {name!r} of {rec['path']!r} lies past the end")
    return bytes(payload[offset : offset + length])


def _decode_quant(rec: Mapping[str, Any], payload: memoryview, positions: np.ndarray) -> QTensor:
    shape, bits = tuple(rec["shape"]), rec["bits"]
    scheme, symmetric = rec["scheme"], rec["symmetric"]
    qmin, _ = code_range(scheme, bits, symmetric)
    fields: dict[str, Any] = {}
    zero: Any = 0
    if scheme == "uniform":
        pshape = tuple(rec["param_shape"])
        count = int(np.prod(pshape))
        fields["scale"] = jnp.asarray(np.frombuffer(_blob(payload, rec, "scale"), np.float32).reshape(pshape))
        if symmetric:
            zp = np.zeros(pshape, np.int32)
        else:
            zp = unpack_bits(_blob(payload, rec, "zero_point"), bits, count).astype(np.int32).reshape(pshape)
        fields["zero_point"] = jnp.asarray(zp)
        zero = zp
    elif scheme == "log":
        pshape = tuple(rec["param_shape"])
        exponent = np.frombuffer(_blob(payload, rec, "exponent"), np.int8).astype(np.int32).reshape(pshape)
        fields["exponent"] = jnp.asarray(exponent)
    else:
        fields["codebook"] = jnp.asarray(np.frombuffer(_blob(payload, rec, "codebook"), np.float32))
    codes = np.broadcast_to(np.asarray(zero, np.int64), shape).copy().reshape(-1)
    stored = unpack_bits(_blob(payload, rec, "values"), bits, rec["nnz"]).astype(np.int64) + qmin
    codes[positions] = stored
    return QTensor(
        codes=jnp.asarray(codes.reshape(shape).astype(np.int32)),
        scheme=scheme,
        bits=bits,
        symmetric=symmetric,
        zero_reserved=rec["zero_reserved"],
        **fields,
    )


def _decode_leaf(rec: Mapping[str, Any], payload: memoryview) -> np.ndarray | QTensor:
    """Float32 values of a float leaf, or the QTensor of a quantized one."""
    shape = tuple(rec["shape"])
    n = int(np.prod(shape))
    positions = _decode_index(rec, n, _blob(payload, rec, "index"))
    if rec["storage"] == "quant":
        return _decode_quant(rec, payload, positions)
    dtype = FLOAT_DTYPES[rec["storage"]]
    flat = np.zeros(n, dtype)
    flat[positions] = np.frombuffer(_blob(payload, rec, "values"), dtype)
    return flat.astype(np.float32).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=2)
def _quantize_leaves(values: dict[str, jax.Array], masks: dict[str, jax.Array], qspec: QuantSpec) -> dict[str, QTensor]:
    """Codes of the selected leaves, in one compiled program (eager op-by-op dispatch would compile
    each primitive per shape); jitted and eager quantization agree bitwise."""
    return {k: quantize_codes(v, qspec, mask=masks.get(k)) for k, v in values.items()}


@jax.jit
def _dequantize_leaves(qtensors: dict[str, QTensor]) -> dict[str, jax.Array]:
    return {k: dequantize(q) for k, q in qtensors.items()}


def _write_atomic(path: str, data: bytes) -> int:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".rlcx", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return os.path.getsize(path)


def _float_leaf(path: str, leaf: Any) -> np.ndarray:
    value = np.asarray(leaf)
    if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f"Parameter {path!r} has dtype {value.dtype}; only floating leaves can be exported")
    return value.astype(np.float32)


def _jsonable(obj: Any) -> Any:
    """Plain JSON values from nested dicts / lists / dataclasses / NumPy and JAX scalars."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return to_jsonable(obj)


def _net_config_json(net_config: Any) -> dict[str, Any]:
    """`to_jsonable(net_config)` without the later fields that hold their defaults (`_FORMAT3_NET_FIELDS`)."""
    full = to_jsonable(net_config)
    default = to_jsonable(type(net_config)())
    return {k: v for k, v in full.items() if k in _FORMAT3_NET_FIELDS or v != default.get(k)}


def _metadata(
    net_config: Any,
    obs_shape: Sequence[int] | None,
    action_spec: Any,
    head: str,
    qspec: QuantSpec | None,
    include: Sequence[str],
    exclude: Sequence[str],
    meta: Mapping[str, Any] | None,
) -> dict[str, Any]:
    return {
        "net_config": None if net_config is None else _net_config_json(net_config),
        "obs_shape": None if obs_shape is None else [int(d) for d in obs_shape],
        "action_spec": None if action_spec is None else to_jsonable(action_spec),
        "head": head,
        "qspec": None if qspec is None else qspec.to_dict(),
        "include": list(include),
        "exclude": list(exclude),
        "meta": _jsonable(dict(meta or {})),
    }


def export(
    params: Any,
    path: str | os.PathLike[str],
    *,
    masks: Any = None,
    qspec: QuantSpec | None = None,
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = (),
    net_config: nets.NetConfig | None = None,
    obs_shape: Sequence[int] | None = None,
    action_spec: nets.ActionSpec | None = None,
    head: str = "actor_critic",
    meta: Mapping[str, Any] | None = None,
    float_dtype: str = "float32",
    sparse: bool = True,
    payload_codec: str = "none",
) -> int:
    """Write `params` (a nested dict of float arrays) as one artifact file; return its size in bytes.

    qspec: quantize the leaves selected by include/exclude (`quant.select_paths`) to integer codes;
    None stores every leaf as float. masks: pruning masks parallel to params (see
    `quant.quantize_tree`). float_dtype: "float32" or "float16" for unquantized leaves (float16 is
    lossy: loaded values are then the float16 roundings). sparse=False forces dense storage.
    payload_codec: "none", or "lzma" to entropy-code the payload (lossless; see the module docstring).
    net_config / obs_shape / action_spec / head let `load(...).policy` rebuild the network via
    `nets.make`; `meta` is any JSON-serialisable dict (e.g. env name, returns, sparsity).
    """
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {sorted(FLOAT_DTYPES)}, got {float_dtype!r}")
    if payload_codec not in PAYLOAD_CODECS:
        raise ValueError(f"payload_codec must be one of {PAYLOAD_CODECS}, got {payload_codec!r}")
    if qspec is not None:
        qspec.validate()
    selected = select_paths(params, include, exclude) if qspec is not None else []
    mask_of = {k: np.asarray(m).astype(bool) for k, m in masks_by_path(params, masks).items()}
    values = {name: _float_leaf(name, leaf) for name, leaf in flatten_with_paths(params).items()}
    codes = (
        _quantize_leaves({k: values[k] for k in selected}, {k: mask_of[k] for k in selected if k in mask_of}, qspec)
        if selected
        else {}
    )
    writer = _Writer()
    records = []
    for name, value in values.items():
        mask = mask_of.get(name)
        rec: dict[str, Any] = {"path": name, "shape": list(value.shape), "blobs": {}}
        if name in codes:
            _encode_quant(rec, writer, codes[name], sparse)
        else:
            if mask is not None:
                value = np.where(mask, value, np.float32(0.0))
            _encode_float(rec, writer, value, float_dtype, sparse)
        records.append(rec)
    header = _metadata(net_config, obs_shape, action_spec, head, qspec, include, exclude, meta)
    header["payload_codec"] = payload_codec
    header["leaves"] = [[rec["path"], rec["shape"]] for rec in records]
    payload = b"".join(writer.parts)
    if payload_codec == "lzma":
        payload = lzma.compress(payload, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, _ZDICT)
    meta_bytes = squeeze.compress(json.dumps(header, separators=(",", ":")).encode("utf-8")) + squeeze.flush()
    table = b"".join(_pack_record(rec) for rec in records)
    data = b"".join(
        [MAGIC, bytes([FORMAT_VERSION]), _varint(len(meta_bytes)), meta_bytes, _varint(len(table)), table, payload]
    )
    return _write_atomic(os.fspath(path), data)


def same_parameters(a: Any, b: Any) -> bool:
    """Two parameter trees with the same paths and bit-identical arrays at every path."""
    flat_a, flat_b = flatten_with_paths(a), flatten_with_paths(b)
    return flat_a.keys() == flat_b.keys() and all(
        np.array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k])) for k in flat_a
    )


def dense_float32_bytes(params: Any, **metadata: Any) -> int:
    """Bytes of the uncompressed baseline: the same file format, every leaf dense float32.

    Pass the same metadata keywords (net_config, meta, ...) as the compressed export to compare
    file with file.
    """
    with tempfile.TemporaryDirectory() as tmp:
        return export(params, os.path.join(tmp, "dense.rlcx"), sparse=False, **metadata)


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------
def _nest(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(value)
    return tree


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A loaded artifact: float32 parameters (dequantized, masked) and what describes them."""

    params: dict[str, Any]
    net_config: nets.NetConfig | None
    obs_shape: tuple[int, ...] | None
    action_spec: nets.ActionSpec | None
    head: str
    qspec: QuantSpec | None
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    meta: dict[str, Any]
    nbytes: int

    def network(self) -> nn.Module:
        """The Flax module, rebuilt with `nets.make` from the stored metadata."""
        if self.net_config is None or self.obs_shape is None or self.action_spec is None:
            raise ValueError("This artifact was exported without net_config, obs_shape and action_spec")
        return nets.make(self.net_config, self.obs_shape, self.action_spec, head=self.head)

    @functools.cached_property
    def _programs(self) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
        """(greedy, sample): the jitted mode and the jitted executed action of the policy."""
        network, spec = self.network(), self.action_spec
        assert spec is not None  # network() checked it

        def policy_out(params: Any, obs: jax.Array) -> jax.Array:
            out: jax.Array = network.apply({"params": params}, obs, method="policy")  # type: ignore[assignment]
            return out

        def greedy(params: Any, obs: jax.Array) -> jax.Array:
            return greedy_action(policy_out(params, obs), spec)

        def sample(params: Any, obs: jax.Array, key: jax.Array) -> jax.Array:
            return executed_action(sample_action(policy_out(params, obs), spec, key), spec)

        return jax.jit(greedy), jax.jit(sample)

    def policy(self, obs: jax.Array) -> jax.Array:
        """Greedy actions for (batched) observations: argmax of logits / Q-values, or the mean."""
        return self._programs[0](self.params, jnp.asarray(obs))

    def act(self, obs: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The action the environment executes: the greedy action (key None) or a sample of the policy
        (the same distribution and sampler as training, so a key gives the evaluated policy's sample),
        continuous actions clipped to the stored action bounds (`nets.policy.executed_action`)."""
        if key is not None:
            return self._programs[1](self.params, jnp.asarray(obs), key)
        greedy = self.policy(obs)  # raises clearly for an artifact exported without an action spec
        assert self.action_spec is not None
        return executed_action(greedy, self.action_spec)


def _read_v2(path: str, data: bytes) -> tuple[dict[str, Any], memoryview]:
    start = len(_MAGIC_V2) + _HEADER_LEN.size
    (length,) = _HEADER_LEN.unpack(data[len(_MAGIC_V2) : start])
    try:
        header = json.loads(zlib.decompress(data[start : start + length]).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: corrupt artifact header ({err})") from err
    if header.get("format") != 2:
        raise ValueError(
            f"{path}: artifact format {header.get('format')!r}; re-export it with this version of rlcx_jax"
        )
    return header, memoryview(data)[start + length :]


def _read_v3(path: str, data: bytes) -> tuple[dict[str, Any], memoryview]:
    cur = _Cursor(memoryview(data), path)
    cur.take(len(MAGIC) + 1)
    try:
        expand = zlib.decompressobj(15, _ZDICT)
        raw = cur.take(cur.varint())
        header = json.loads((expand.decompress(raw) + expand.flush()).decode("utf-8"))
        table = _Cursor(cur.take(cur.varint()), f"{path}: leaf records")
        records = [_unpack_record(table, name, list(shape)) for name, shape in header["leaves"]]
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: corrupt artifact header ({err})") from err
    header["leaves"] = records
    header["sections"] = {
        "fixed": cur.pos - len(raw) - len(table.data),
        "metadata": len(raw),
        "leaf_records": len(table.data),
        "payload": len(data) - cur.pos,
    }
    return header, memoryview(data)[cur.pos :]


def _read(path: str) -> tuple[dict[str, Any], memoryview, int]:
    """(header with one record per leaf, the decoded payload, file size); format 3 or 2."""
    with open(path, "rb") as f:
        data = f.read()
    v3 = not data.startswith(_MAGIC_V2)
    if not v3:
        header, payload = _read_v2(path, data)
    elif data.startswith(MAGIC) and len(data) > len(MAGIC):
        if data[len(MAGIC)] != FORMAT_VERSION:
            raise ValueError(
                f"{path}: artifact format {data[len(MAGIC)]}, this version reads {FORMAT_VERSION} and 2; "
                "re-export it with this version of rlcx_jax"
            )
        header, payload = _read_v3(path, data)
    else:
        raise ValueError(f"{path} is not an rlcx artifact (bad magic {data[: len(_MAGIC_V2)]!r})")
    codec = header.get("payload_codec", "none")
    if codec == "lzma":
        try:
            payload = memoryview(lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))
        except lzma.LZMAError as err:
            raise ValueError(f"{path}: corrupt artifact payload ({err})") from err
    elif codec != "none":
        raise ValueError(f"{path}: unknown payload codec {codec!r}")
    if v3:
        _locate_blobs(header["leaves"], len(payload))
    return header, payload, len(data)


def breakdown(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Where an artifact's bytes go: total; for format 3 the fixed fields (magic, version, lengths),
    the compressed metadata, the leaf records and the payload as stored; per leaf its (decoded)
    payload bytes and its encoding."""
    header, _, size = _read(os.fspath(path))
    leaves = {
        rec["path"]: {
            "bytes": int(sum(length for _, length in rec["blobs"].values())),
            "encoding": {k: v for k, v in rec.items() if k not in ("path", "shape", "blobs")},
        }
        for rec in header["leaves"]
    }
    return {"total": size, **header.get("sections", {}), "leaves": leaves}


def load(path: str | os.PathLike[str]) -> Artifact:
    """Read an artifact written by `export`: parameters equal the exported fake-quantized ones."""
    header, payload, size = _read(os.fspath(path))
    flat = {rec["path"]: _decode_leaf(rec, payload) for rec in header["leaves"]}
    quantized = {k: v for k, v in flat.items() if isinstance(v, QTensor)}
    if quantized:
        flat.update(_dequantize_leaves(quantized))
    net_config = header["net_config"]
    action = header["action_spec"]
    return Artifact(
        params=_nest(flat),  # type: ignore[arg-type]  # every QTensor was dequantized above
        net_config=None if net_config is None else from_jsonable(nets.NetConfig, net_config),
        obs_shape=None if header["obs_shape"] is None else tuple(header["obs_shape"]),
        action_spec=None if action is None else from_jsonable(nets.ActionSpec, action),
        head=header["head"],
        qspec=None if header["qspec"] is None else QuantSpec.from_dict(header["qspec"]),
        include=tuple(header["include"]),
        exclude=tuple(header["exclude"]),
        meta=header["meta"],
        nbytes=size,
    )
