"""Threefry-2x32 lowered as straight-line code: the random bits of JAX's "threefry2x32", faster on CPU.

JAX lowers its threefry hash on CPU as a 5-iteration `while` loop (to keep compile time down for
programs with many random calls). In an RL rollout every environment step draws random numbers
(action sampling, gymnax's automatic reset), so each step pays several tiny loops of a dozen
kernels each. `THREEFRY` below is the same generator written in `lax` ops: 20 rounds unrolled,
which XLA fuses into one kernel per call site. Measured on a 2-core CPU, PPO on CartPole runs
about 1.1x faster and compiles faster (docs/architecture.md, Conventions, "Random numbers").

Bit-for-bit the same as `jax.random` with `impl="threefry2x32"` (with JAX's default
`jax_threefry_partitionable=True`) for `split`, `fold_in` and `bits` of every width, hence for every
sampler built on them (tested against JAX's implementation and the Random123 known-answer vector).
A training run with `prng_impl="threefry2x32"` therefore gives the same numbers either way.

Threefry-2x32-20: Salmon, Moraes, Dror & Shaw (2011), "Parallel random numbers: as easy as 1, 2, 3".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import random as jex_random

from rlcx_jax.configs.base import PRNG_IMPLS

__all__ = ["IMPLS", "THREEFRY", "jax_impl", "loop_free", "normals", "permutations", "threefry2x32_hash"]

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)  # key-schedule constant of Threefry


def _rotate_left(x: jax.Array, distance: int) -> jax.Array:
    return lax.bitwise_or(lax.shift_left(x, np.uint32(distance)), lax.shift_right_logical(x, np.uint32(32 - distance)))


def _broadcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`x` broadcast to `shape` NumPy-style (trailing axes aligned); scalars stay scalars, which
    `lax`'s elementwise ops take as they are."""
    x = jnp.asarray(x, jnp.uint32)
    if x.ndim == 0 or x.shape == shape:
        return x
    return lax.broadcast_in_dim(x, shape, tuple(range(len(shape) - x.ndim, len(shape))))


def threefry2x32_hash(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds: key (k1, k2), counter words (x1, x2) -> two uint32 words.

    Five blocks of four rounds (x1 += x2; x2 = rotl(x2, r) ^ x1) with rotations alternating
    between (13, 15, 26, 6) and (17, 29, 16, 24); after block i (0-based) the key schedule adds
    ks[(i+1) % 3] to x1 and ks[(i+2) % 3] + i + 1 to x2, where ks = (k1, k2, k1 ^ k2 ^ 0x1BD11BDA).
    Keys broadcast against the counters. Written in `lax` ops, not `jax.numpy` operators: each of
    the ~110 operations is then one primitive bind instead of a `jax.numpy` call, and PPO's training
    program (14 hashes) traces and lowers about 0.09 s faster on a 2-core CPU.
    """
    shape = tuple(jnp.broadcast_shapes(jnp.shape(k1), jnp.shape(k2), jnp.shape(x1), jnp.shape(x2)))
    k1, k2 = _broadcast(k1, shape), _broadcast(k2, shape)
    x1, x2 = _broadcast(x1, shape), _broadcast(x2, shape)
    ks = (k1, k2, lax.bitwise_xor(lax.bitwise_xor(k1, k2), _PARITY))
    x1, x2 = lax.add(x1, ks[0]), lax.add(x2, ks[1])
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x1 = lax.add(x1, x2)
            x2 = lax.bitwise_xor(_rotate_left(x2, r), x1)
        x1 = lax.add(x1, ks[(block + 1) % 3])
        x2 = lax.add(lax.add(x2, ks[(block + 2) % 3]), np.uint32(block + 1))
    return x1, x2


def _counters(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The 64-bit flat index of every element of `shape`, as (high, low) uint32 words."""
    size = math.prod(shape)
    if size >= 2**32:
        raise NotImplementedError(f"more than 2**32 random values in one call ({shape})")
    low = jnp.arange(size, dtype=jnp.uint32).reshape(shape)
    return jnp.zeros(shape, jnp.uint32), low


def _seed(seed: jax.Array) -> jax.Array:
    """Key words from an integer seed: (high 32 bits, low 32 bits), as JAX's threefry seeds."""
    return jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))


def _split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    high, low = threefry2x32_hash(key[0], key[1], *_counters(tuple(shape)))
    return jnp.stack([high, low], axis=-1)


def _fold_in(key: jax.Array, data: int) -> jax.Array:
    word = jnp.asarray(data, jnp.uint32)
    high, low = threefry2x32_hash(key[0], key[1], jnp.zeros((1,), jnp.uint32), word[None])
    return jnp.concatenate([high, low])


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    if bit_width not in (8, 16, 32, 64):
        raise TypeError(f"random bits need a width of 8, 16, 32 or 64, got {bit_width}")
    high, low = threefry2x32_hash(key[0], key[1], *_counters(tuple(shape)))
    if bit_width == 64:
        return (high.astype(jnp.uint64) << np.uint64(32)) | low.astype(jnp.uint64)
    bits = high ^ low
    return bits if bit_width == 32 else bits.astype(f"uint{bit_width}")


THREEFRY = jex_random.define_prng_impl(
    key_shape=(2,),
    seed=_seed,
    split=_split,
    random_bits=_random_bits,
    fold_in=_fold_in,
    name="rlcx_threefry2x32",
    tag="rfry",
)
"""The PRNG implementation: pass it as `impl=` wherever JAX takes one."""


IMPLS = PRNG_IMPLS
"""The `prng_impl` names a training config accepts."""


def jax_impl(name: str) -> object:
    """What to pass JAX as `impl=` for a config's `prng_impl`: our loop-free threefry for
    "threefry2x32" (same bits as JAX's), JAX's own implementation for the others."""
    if name not in IMPLS:
        raise ValueError(f"Unknown prng_impl {name!r}; expected one of {IMPLS}")
    return THREEFRY if name == "threefry2x32" else name


def permutations(key: jax.Array, n: int, count: int) -> jax.Array:
    """`count` independent uniformly random permutations of range(n), shape (count, n), int32.

    Like `jax.random.permutation`, each round sorts the elements by random keys, but a key packs
    its random bits and the element's index into one uint32 (random high bits, index in the low
    ceil(log2 n) bits), so XLA sorts a single array instead of key-value pairs (about 4x cheaper on
    XLA:CPU at n = 512). Ties between random parts keep the previous order, so rounds repeat until
    the random bits per element reach 3 log2(n), the threshold `jax.random.permutation` uses for its
    32-bit keys. When the index leaves fewer than 8 random bits, `jax.random.permutation` is used.
    """
    index_bits = max(int(n - 1).bit_length(), 1)
    random_bits = 32 - index_bits
    if random_bits < 8:
        return jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, count))
    rounds = max(math.ceil(3 * math.log2(max(n, 2)) / random_bits), 1)
    low = np.uint32((1 << index_bits) - 1)
    perm = jnp.broadcast_to(jnp.arange(n, dtype=jnp.uint32), (count, n))
    for round_key in jax.random.split(key, rounds):
        packed = (jax.random.bits(round_key, (count, n), jnp.uint32) & ~low) | jnp.arange(n, dtype=jnp.uint32)
        order = jnp.sort(packed, axis=-1) & low  # positions of the previous order, shuffled
        perm = jnp.take_along_axis(perm, order.astype(jnp.int32), axis=-1)
    return perm.astype(jnp.int32)


def loop_free(key: jax.Array) -> jax.Array:
    """A threefry key (raw uint32[..., 2] data or a typed "threefry2x32" key) as a `THREEFRY` key:
    the same random numbers, drawn without loops on CPU. Keys of other implementations pass unchanged."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            return key
        key = jax.random.key_data(key)
    if key.dtype != jnp.uint32 or key.shape[-1:] != (2,):
        return key  # not threefry key data: left to JAX's default handling
    return jax.random.wrap_key_data(key, impl=THREEFRY)


def _threefry_words(key: jax.Array) -> jax.Array | None:
    """The two uint32 key words of a threefry key (ours or JAX's: the same bits), else None."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) not in ("threefry2x32", "rfry"):
            return None
        return jax.random.key_data(key)
    default = jax.config.jax_default_prng_impl  # type: ignore[attr-defined]
    if default == "threefry2x32" and key.dtype == jnp.uint32 and key.shape == (2,):
        return key  # raw key data, which JAX reads with its default implementation
    return None


def normals(keys: Sequence[jax.Array], shapes: Sequence[Sequence[int]]) -> list[jax.Array]:
    """`[jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]`, bit for bit, as one draw.

    Each `jax.random.normal` is a hash plus an inverse-error-function transform that XLA compiles
    as its own kernel; a network initialiser draws one per layer, and those kernels are a visible
    share of a training program's compile time. Here the 32-bit words of every draw are made at
    once (for threefry keys one hash over all values, each with its own key words; other keys draw
    their words with `jax.random.bits`) and transformed at once, as JAX does: u = max(lo, (f - 1)(1
    - lo) + lo) with f the float in [1, 2) whose mantissa is the top 23 bits and lo = nextafter(-1,
    0), then sqrt(2) erfinv(u). Tested against `jax.random.normal`."""
    sizes = [math.prod(tuple(shape)) for shape in shapes]
    words = [w for w in map(_threefry_words, keys) if w is not None]
    if len(words) == len(keys):
        k1, k2 = (jnp.concatenate([jnp.broadcast_to(w[i], (n,)) for w, n in zip(words, sizes)]) for i in (0, 1))
        counters = jnp.asarray(np.concatenate([np.arange(n, dtype=np.uint32) for n in sizes]))
        high, low = threefry2x32_hash(k1, k2, jnp.zeros_like(counters), counters)
        bits = high ^ low
    else:
        bits = jnp.concatenate([jax.random.bits(k, (n,), jnp.uint32) for k, n in zip(keys, sizes)])
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    unit = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - np.float32(1.0)
    uniform = jax.lax.max(lo, unit * (np.float32(1.0) - lo) + lo)
    # materialised once: left fusable, XLA copies the whole draw into each consumer of each slice
    flat = jax.lax.optimization_barrier(np.float32(np.sqrt(2)) * jax.lax.erf_inv(uniform))
    offsets = np.cumsum([0, *sizes])
    return [flat[a:b].reshape(tuple(shape)) for a, b, shape in zip(offsets[:-1], offsets[1:], shapes)]
