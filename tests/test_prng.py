"""The loop-free threefry (`rlcx_jax.prng.THREEFRY`) against JAX's own threefry2x32 and Random123."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import prng
from rlcx_jax.rl import common, ppo

SAMPLERS = {
    "split": lambda k: jax.random.key_data(jax.random.split(k, 7)),
    "split_2d": lambda k: jax.random.key_data(jax.random.split(k, (3, 4))),
    "fold_in": lambda k: jax.random.key_data(jax.random.fold_in(k, 123_456_789)),
    "bits32": lambda k: jax.random.bits(k, (5, 3), jnp.uint32),
    "bits16": lambda k: jax.random.bits(k, (7,), jnp.uint16),
    "bits8": lambda k: jax.random.bits(k, (9,), jnp.uint8),
    "scalar_uniform": lambda k: jax.random.uniform(k),
    "uniform": lambda k: jax.random.uniform(k, (9,)),
    "normal": lambda k: jax.random.normal(k, (2, 3)),
    "categorical": lambda k: jax.random.categorical(k, jnp.log(jnp.arange(1.0, 7.0)), shape=(16,)),
    "permutation": lambda k: jax.random.permutation(k, 50),
}


def _pair(seed: int) -> tuple[jax.Array, jax.Array]:
    """The same key data as a JAX threefry key and as a THREEFRY key."""
    theirs = jax.random.key(seed, impl="threefry2x32")
    return theirs, jax.random.wrap_key_data(jax.random.key_data(theirs), impl=prng.THREEFRY)


def test_known_answer_vector_of_random123() -> None:
    """Threefry-2x32-20, key (0x13198a2e, 0x03707344), counter (0x243f6a88, 0x85a308d3): the
    Random123 distribution's known-answer test gives (0xc4923a9c, 0x483df7a0)."""
    u = jnp.uint32
    out = prng.threefry2x32_hash(u(0x13198A2E), u(0x03707344), u(0x243F6A88), u(0x85A308D3))
    assert [int(x) for x in out] == [0xC4923A9C, 0x483DF7A0]


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1])
def test_same_bits_as_jax_threefry(name: str, seed: int) -> None:
    sampler = SAMPLERS[name]
    theirs, ours = _pair(seed)
    expected = np.asarray(sampler(theirs))
    for got in (sampler(ours), jax.jit(sampler)(ours)):
        got = np.asarray(got)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_same_bits_under_vmap_over_keys() -> None:
    data = jax.random.key_data(jax.random.split(jax.random.key(3, impl="threefry2x32"), 5))
    draw = lambda impl: jax.vmap(lambda d: jax.random.uniform(jax.random.wrap_key_data(d, impl=impl), (4,)))(data)
    np.testing.assert_array_equal(np.asarray(draw(prng.THREEFRY)), np.asarray(draw("threefry2x32")))


def test_sixty_four_bit_words() -> None:
    with jax.enable_x64(True):
        theirs, ours = _pair(11)
        expected = np.asarray(jax.random.bits(theirs, (6,), jnp.uint64))
        np.testing.assert_array_equal(
            np.asarray(jax.jit(lambda k: jax.random.bits(k, (6,), jnp.uint64))(ours)), expected
        )


def test_no_loop_on_cpu() -> None:
    """What the implementation is for: XLA:CPU gets straight-line code, where JAX's lowering of
    the same draw contains a while loop (so this test can fail)."""
    theirs, ours = _pair(0)
    hlo = lambda key: jax.jit(lambda k: jax.random.uniform(k, (4,))).lower(key).compile().as_text()
    if jax.default_backend() == "cpu":
        assert " while(" in hlo(theirs)
    assert " while(" not in hlo(ours)


def test_training_keys_use_it_and_unknown_names_are_refused() -> None:
    key = common.seed_key(jax.random.PRNGKey(0), "threefry2x32")
    assert jax.random.key_impl(key) == jax.random.key_impl(
        jax.random.wrap_key_data(jnp.zeros(2, jnp.uint32), impl=prng.THREEFRY)
    )
    with pytest.raises(ValueError, match="Unknown prng_impl 'philox'"):
        ppo.PPOConfig(prng_impl="philox").validate()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 512, 1000, 70_000])
def test_permutations_are_permutations(n: int) -> None:
    perms = np.asarray(jax.jit(lambda k: prng.permutations(k, n, 3))(jax.random.key(1, impl=prng.THREEFRY)))
    assert perms.shape == (3, n) and perms.dtype == np.int32
    for row in perms:
        np.testing.assert_array_equal(np.sort(row), np.arange(n))
    if n >= 7:
        assert len({tuple(row) for row in perms}) == 3  # independent draws differ


def test_permutations_are_uniform() -> None:
    """All 3! = 6 orders of three elements equally often, and every element equally often at every
    position of eight (chi-square at p = 0.001 against the uniform distribution: the test fails
    for a biased shuffle such as the identity or a rotation)."""
    from scipy import stats

    draws = 60_000
    three = np.asarray(prng.permutations(jax.random.key(0, impl=prng.THREEFRY), 3, draws))
    codes = three[:, 0] * 9 + three[:, 1] * 3 + three[:, 2]
    counts = np.array([np.sum(codes == c) for c in np.unique(codes)])
    assert len(counts) == 6
    assert stats.chisquare(counts).pvalue > 1e-3
    eight = np.asarray(prng.permutations(jax.random.key(1, impl=prng.THREEFRY), 8, draws))
    table = np.stack([np.bincount(eight[:, pos], minlength=8) for pos in range(8)])
    assert stats.chisquare(table.ravel()).pvalue > 1e-3


def test_loop_free_keeps_the_numbers_of_a_threefry_key() -> None:
    raw = jax.random.PRNGKey(5)
    typed = jax.random.key(5, impl="threefry2x32")
    for key in (raw, typed):
        np.testing.assert_array_equal(
            np.asarray(jax.random.uniform(prng.loop_free(key), (4,))), np.asarray(jax.random.uniform(key, (4,)))
        )
    rbg = jax.random.key(5, impl="rbg")
    assert prng.loop_free(rbg) is rbg


NORMAL_SHAPES = [(64, 4), (64, 64), (3,), (2, 5, 7), (1,)]
NORMAL_KEYS = {
    "raw": lambda i: jax.random.PRNGKey(i),
    "threefry": lambda i: jax.random.key(i, impl="threefry2x32"),
    "ours": lambda i: jax.random.wrap_key_data(jax.random.key_data(jax.random.PRNGKey(i)), impl=prng.THREEFRY),
    "rbg": lambda i: jax.random.key(i, impl="rbg"),
}


@pytest.mark.parametrize("kind", sorted(NORMAL_KEYS))
def test_normals_are_jax_normal_draws_bit_for_bit(kind: str) -> None:
    """`normals` (one draw for many keys and shapes) gives each `jax.random.normal(k, s)` exactly,
    eagerly, under jit and under vmap over a batch of key sets; for threefry keys through one hash."""
    keys = [NORMAL_KEYS[kind](i) for i in range(len(NORMAL_SHAPES))]
    expected = [np.asarray(jax.random.normal(k, s, jnp.float32)) for k, s in zip(keys, NORMAL_SHAPES)]
    eager = prng.normals(keys, NORMAL_SHAPES)
    jitted = jax.jit(lambda ks: prng.normals(ks, NORMAL_SHAPES))(keys)
    for ours, more, ref, shape in zip(eager, jitted, expected, NORMAL_SHAPES):
        assert ours.shape == shape and ours.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(ours), ref)
        np.testing.assert_array_equal(np.asarray(more), ref)
    batch = [jnp.stack([NORMAL_KEYS[kind](10 * i + j) for j in range(3)]) for i in range(len(NORMAL_SHAPES))]
    vmapped = jax.vmap(lambda *ks: prng.normals(ks, NORMAL_SHAPES))(*batch)
    for ours, ks, shape in zip(vmapped, batch, NORMAL_SHAPES):  # rbg's bits under vmap are JAX's vmapped ones
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape))(ks)))
    assert (prng._threefry_words(keys[0]) is None) == (kind == "rbg")
