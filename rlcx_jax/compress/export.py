"""The shipped artifact: one binary file holding a (quantized, sparse) policy, and its loader.

File layout (little-endian)::

    8 bytes   magic b"RLCXQNT1"
    4 bytes   uint32 length H of the header
    H bytes   zlib-compressed UTF-8 JSON header (its per-leaf records are repetitive; compressed
              they are ~4x smaller, which matters for small policies): format version, metadata
              (net_config, obs_shape, action_spec, head, qspec, include/exclude, user meta) and one
              record per parameter leaf: path, shape, storage, index encoding and the
              [offset, length] of its blobs in the payload
    payload   the blobs, back to back; with `payload_codec="lzma"` (header field "payload_codec")
              the payload is one raw LZMA2 stream instead: a lossless entropy-coding stage over
              codes, indices and floats, the role Huffman coding plays in Han et al. 2016's
              Deep Compression (prune, quantize, entropy-code)

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
from rlcx_jax.nets.policy import distribution, executed_action, greedy_action

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "Artifact",
    "export",
    "load",
    "dense_float32_bytes",
    "pack_bits",
    "unpack_bits",
]

MAGIC = b"RLCXQNT1"
FORMAT_VERSION = 2  # 2: networks named by registered torso (NetConfig.torso) and head
FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16}
MAX_GAP_BITS = 16
_HEADER_LEN = pystruct.Struct("<I")
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
        "format": FORMAT_VERSION,
        "net_config": None if net_config is None else to_jsonable(net_config),
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
    header["leaves"] = records
    payload = b"".join(writer.parts)
    if payload_codec == "lzma":
        header["payload_codec"] = "lzma"
        payload = lzma.compress(payload, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    header_bytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode("utf-8"), 9)
    data = b"".join([MAGIC, _HEADER_LEN.pack(len(header_bytes)), header_bytes, payload])
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
            return executed_action(distribution(policy_out(params, obs), spec).sample(seed=key), spec)

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


def _read(path: str) -> tuple[dict[str, Any], memoryview, int]:
    with open(path, "rb") as f:
        data = f.read()
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path} is not an rlcx artifact (bad magic {data[: len(MAGIC)]!r})")
    start = len(MAGIC) + _HEADER_LEN.size
    (length,) = _HEADER_LEN.unpack(data[len(MAGIC) : start])
    try:
        header = json.loads(zlib.decompress(data[start : start + length]).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: corrupt artifact header ({err})") from err
    if header.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: artifact format {header.get('format')!r}, this version reads {FORMAT_VERSION}; "
            "re-export it with this version of rlcx_jax"
        )
    payload = memoryview(data)[start + length :]
    codec = header.get("payload_codec", "none")
    if codec == "lzma":
        try:
            payload = memoryview(lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))
        except lzma.LZMAError as err:
            raise ValueError(f"{path}: corrupt artifact payload ({err})") from err
    elif codec != "none":
        raise ValueError(f"{path}: unknown payload codec {codec!r}")
    return header, payload, len(data)


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
