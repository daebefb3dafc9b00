"""Attention torsos: observations as tokens, pre-norm multi-head self-attention, pooled to features.

Registered torsos (choose with `NetConfig(torso=...)`):

* ``attention``: tokens -> `attention_depth` pre-norm blocks (Vaswani et al. 2017; pre-norm as in
  Xiong et al. 2020), each
      x <- x + MHSA(LN(x), mask),    x <- x + MLP(LN(x)),
  with MHSA(x)_q = W_o concat_h( sum_k softmax_k(q_h . k_h / sqrt(d) + log m_k) v_h ), d = width / heads,
  and m_k = 0 for a masked token; then LN, pooling to one vector and the `hidden` dense layers
  (`Dense_0`, ...) of the MLP torso.
* ``memory``: the same blocks, but every attention layer also attends to `memory_slots` learned
  key/value slots (persistent memory, Sukhbaatar et al. 2019, "Augmenting self-attention with
  persistent memory"): the keys and values are concat(W_k x, M_k) and concat(W_v x, M_v), never masked.
* ``deepsets``: phi applied to each token, pooled, then rho = the `hidden` dense layers (Zaheer et al.
  2017, "Deep Sets"): permutation invariant, but tokens never interact before pooling.

Tokens, by the observation's rank (`obs_ndim`):
  2, (N, F) entities: one token per entity, W_e x_n + b. With `entity_mask`, feature 0 flags presence
     (1 present, 0 padding) and padding tokens are masked out of attention and pooling, so a policy
     trained on N entities runs on any number of slots.
  1, (D,) flat features: one token per feature, x_i w_i + b_i (feature tokenizer, Gorishniy et al.
     2021, "Revisiting deep learning models for tabular data").
  3, (H, W, C) grids (MinAtar): one token per cell, W_e x_hw + p_hw with a learned position p_hw.

Pooling (`attention_pool`): "attention" is one learned query attending over the tokens with the same
heads (PMA, Lee et al. 2019, "Set Transformer"); "mean" averages the present tokens.

Attention weights are an auxiliary output: every attention layer `sow`s its weights
[..., heads, queries, keys] into the "intermediates" collection (free when it is not mutable);
`attention_maps` returns them by layer path. Parameters are plain Dense layers with 2-D kernels
(`query`, `key`, `value`: width -> width, head h owning columns [h d, (h + 1) d); `out`: rows of
head h the same block), so masks, quantization, export and size accounting treat them like any other
layer, and `head_masks` prunes whole heads (structured) by zeroing those blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlcx_jax.configs.nets import NetConfig
from rlcx_jax.nets import ACTIVATIONS, _mlp, dense, register_torso

__all__ = [
    "MultiHeadAttention",
    "AttentionBlock",
    "Tokenizer",
    "AttentionTorso",
    "MemoryTorso",
    "DeepSetsTorso",
    "ATTENTION_LAYERS",
    "attention_maps",
    "attention_layers",
    "head_scores",
    "head_masks",
]

ATTENTION_LAYERS = ("query", "key", "value", "out")
"""The Dense layers of one attention layer (a module holding all four is an attention layer)."""
_MASKED = -1e9  # an additive logit that makes a key's weight exactly 0 next to any unmasked key


class MultiHeadAttention(nn.Module):
    """Multi-head attention of `queries` [..., Q, W] over `inputs` [..., K, W] (keys where `mask` [..., K] is True).

    With `memory_slots` > 0, `memory_slots` learned key and value vectors join the keys and values
    (never masked). Sows the weights [..., heads, Q, K (+ slots)] as "attention".
    """

    width: int
    heads: int
    memory_slots: int = 0
    dense_grad: str = "transposed"

    @nn.compact
    def __call__(self, queries: jax.Array, inputs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        d = self.width // self.heads
        q = dense(self.width, 1.0, name="query", grad=self.dense_grad)(queries)
        k = dense(self.width, 1.0, name="key", grad=self.dense_grad)(inputs)
        v = dense(self.width, 1.0, name="value", grad=self.dense_grad)(inputs)
        if self.memory_slots:
            init = nn.initializers.normal(1.0)
            batch = k.shape[:-2]
            mem_k = self.param("memory_key", init, (self.memory_slots, self.width))
            mem_v = self.param("memory_value", init, (self.memory_slots, self.width))
            k = jnp.concatenate([k, jnp.broadcast_to(mem_k, batch + mem_k.shape)], axis=-2)
            v = jnp.concatenate([v, jnp.broadcast_to(mem_v, batch + mem_v.shape)], axis=-2)
            if mask is not None:
                mask = jnp.broadcast_to(mask, batch + mask.shape[-1:])
                mask = jnp.concatenate([mask, jnp.ones(batch + (self.memory_slots,), bool)], axis=-1)
        split = lambda x: jnp.reshape(x, x.shape[:-1] + (self.heads, d))  # noqa: E731
        logits = jnp.einsum("...qhd,...khd->...hqk", split(q), split(k)) / np.sqrt(d)
        if mask is not None:
            logits = jnp.where(mask[..., None, None, :], logits, _MASKED)
        weights = jax.nn.softmax(logits, axis=-1)
        self.sow("intermediates", "attention", weights)
        mixed = jnp.einsum("...hqk,...khd->...qhd", weights, split(v))
        mixed = jnp.reshape(mixed, mixed.shape[:-2] + (self.width,))
        return dense(self.width, 1.0, name="out", grad=self.dense_grad)(mixed)


class AttentionBlock(nn.Module):
    """x + MHSA(LN(x)), then + MLP(LN(x)) (pre-norm; the token MLP is width -> 2 width -> width)."""

    config: NetConfig
    memory_slots: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        y = nn.LayerNorm(name="norm_attention")(x)
        x = x + MultiHeadAttention(
            cfg.attention_width, cfg.attention_heads, self.memory_slots, cfg.dense_grad, name="attention"
        )(y, y, mask)
        y = nn.LayerNorm(name="norm_mlp")(x)
        act = ACTIVATIONS[cfg.activation]
        y = dense(cfg.attention_width, 1.0, name="mlp_out", grad=cfg.dense_grad)(
            act(dense(2 * cfg.attention_width, np.sqrt(2.0), name="mlp_in", grad=cfg.dense_grad)(y))
        )
        return x + y


class Tokenizer(nn.Module):
    """Observation (*batch, *obs_shape) -> tokens (*batch, N, width) and a presence mask (*batch, N) or None."""

    config: NetConfig
    obs_ndim: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        width = self.config.attention_width
        obs = obs.astype(jnp.float32)
        if self.obs_ndim == 1:
            features = obs.shape[-1]
            scale = self.param("feature_embed", nn.initializers.normal(1.0), (features, width))
            shift = self.param("feature_bias", nn.initializers.normal(1.0), (features, width))
            return obs[..., :, None] * scale + shift, None
        if self.obs_ndim == 2:
            if obs.shape[-2] < 1:
                raise ValueError("An entity observation needs at least one entity slot, got 0")
            tokens = dense(width, 1.0, name="embed", grad=self.config.dense_grad)(obs)
            return tokens, (obs[..., 0] > 0.5) if self.config.entity_mask else None
        if self.obs_ndim == 3:
            h, w, c = obs.shape[-3:]
            cells = jnp.reshape(obs, obs.shape[:-3] + (h * w, c))
            position = self.param("position", nn.initializers.normal(0.02), (h * w, width))
            return dense(width, 1.0, name="embed", grad=self.config.dense_grad)(cells) + position, None
        raise ValueError(f"Attention torsos take (D,), (N, F) or (H, W, C) observations, got ndim {self.obs_ndim}")


def _pool(config: NetConfig, tokens: jax.Array, mask: jax.Array | None, module: nn.Module) -> jax.Array:
    """(*batch, N, W) -> (*batch, W): a learned query's attention, or the mean over present tokens."""
    if config.attention_pool == "mean":
        if mask is None:
            return jnp.mean(tokens, axis=-2)
        m = mask[..., None].astype(tokens.dtype)
        return jnp.sum(tokens * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)
    query = module.param("pool_query", nn.initializers.normal(1.0), (1, config.attention_width))
    query = jnp.broadcast_to(query, tokens.shape[:-2] + query.shape)
    pooled = MultiHeadAttention(
        config.attention_width, config.attention_heads, dense_grad=config.dense_grad, name="pool"
    )(query, tokens, mask)
    return pooled[..., 0, :]


def _attention_features(module: nn.Module, obs: jax.Array, memory_slots: int) -> jax.Array:
    cfg: NetConfig = module.config
    tokens, mask = Tokenizer(cfg, module.obs_ndim, name="tokens")(obs)
    for i in range(cfg.attention_depth):
        tokens = AttentionBlock(cfg, memory_slots, name=f"block_{i}")(tokens, mask)
    tokens = nn.LayerNorm(name="norm_out")(tokens)
    return _mlp(_pool(cfg, tokens, mask, module), cfg)


def _pool_path(config: NetConfig) -> tuple[str, ...]:
    return ("pool",) if config.attention_pool == "attention" else ()


@register_torso("attention")
class AttentionTorso(nn.Module):
    """Tokens, `attention_depth` pre-norm self-attention blocks, LN, pooling, `hidden` dense layers."""

    config: NetConfig
    obs_ndim: int

    @classmethod
    def attention_paths(cls, config: NetConfig) -> tuple[str, ...]:
        """The attention layers inside this torso (for `nets.Layout.attention`)."""
        return tuple(f"block_{i}/attention" for i in range(config.attention_depth)) + _pool_path(config)

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return _attention_features(self, obs, memory_slots=0)


@register_torso("memory")
class MemoryTorso(nn.Module):
    """As `AttentionTorso`, every attention layer also attending to `memory_slots` learned slots."""

    config: NetConfig
    obs_ndim: int

    @classmethod
    def attention_paths(cls, config: NetConfig) -> tuple[str, ...]:
        return AttentionTorso.attention_paths(config)

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return _attention_features(self, obs, memory_slots=self.config.memory_slots)


@register_torso("deepsets")
class DeepSetsTorso(nn.Module):
    """rho(pool_n phi(x_n)): phi = two dense layers of `attention_width` per token, pooled over present
    tokens (mean, or a learned query's attention), then rho = the `hidden` dense layers."""

    config: NetConfig
    obs_ndim: int

    @classmethod
    def attention_paths(cls, config: NetConfig) -> tuple[str, ...]:
        return _pool_path(config)

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        cfg = self.config
        tokens, mask = Tokenizer(cfg, self.obs_ndim, name="tokens")(obs)
        act = ACTIVATIONS[cfg.activation]
        phi = act(dense(cfg.attention_width, np.sqrt(2.0), name="phi_0", grad=cfg.dense_grad)(act(tokens)))
        phi = act(dense(cfg.attention_width, np.sqrt(2.0), name="phi_1", grad=cfg.dense_grad)(phi))
        return _mlp(_pool(cfg, phi, mask, self), cfg)


# ----------------------------------------------------------------------------------------------
# Attention weights as an auxiliary output
# ----------------------------------------------------------------------------------------------
def attention_maps(
    network: nn.Module, params: Any, obs: jax.Array, method: str = "policy", **kwargs: Any
) -> dict[str, jax.Array]:
    """{layer path: attention weights [..., heads, queries, keys]} of every attention layer that ran in
    `network.<method>(obs)`, e.g. "actor_torso/block_0/attention" and "actor_torso/pool"."""
    _, state = network.apply({"params": params}, obs, method=method, mutable=["intermediates"], **kwargs)
    maps: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.get("intermediates", {}))[0]:
        keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        if keys[-2] == "attention":  # sow stores a tuple: (..., "attention", 0)
            maps["/".join(keys[:-2])] = leaf
    return maps


# ----------------------------------------------------------------------------------------------
# Head pruning (structured, through masks)
# ----------------------------------------------------------------------------------------------
def attention_layers(params: Mapping[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of every attention layer (a module holding query, key, value and out) in `params`."""
    if all(name in params for name in ATTENTION_LAYERS):
        return [path]
    found: list[tuple[str, ...]] = []
    for name in sorted(params):
        if isinstance(params[name], Mapping):
            found += attention_layers(params[name], path + (name,))
    return found


def _node(params: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        params = params[name]
    return params


def _layers(params: Mapping[str, Any], layers: Sequence[str] | None) -> list[tuple[str, ...]]:
    if layers is None:
        return attention_layers(params)
    found = []
    for path in layers:
        keys = tuple(path.split("/"))
        try:
            node = _node(params, keys)
        except (KeyError, TypeError):
            node = None
        if not isinstance(node, Mapping) or not all(name in node for name in ATTENTION_LAYERS):
            raise ValueError(f"{path} is not an attention layer of these params (a module with {ATTENTION_LAYERS})")
        found.append(keys)
    return found


def head_scores(params: Mapping[str, Any], heads: int, layers: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """{attention layer path: [heads] importance}: the L2 norm of a head's query, key and value columns
    and its output rows (the weights that only that head uses; Michel et al. 2019 prune by importance).

    layers: the attention layers, as a network declares them (`nets.layout(net_config, head).attention`);
    None finds every module holding query, key, value and out."""
    scores = {}
    for path in _layers(params, layers):
        layer = _node(params, path)
        total = jnp.zeros(heads)
        for name in ("query", "key", "value"):
            k = layer[name]["kernel"]
            total = total + jnp.sum(jnp.square(jnp.reshape(k, k.shape[:-1] + (heads, -1))), axis=(-3, -1))
        out = layer["out"]["kernel"]
        total = total + jnp.sum(jnp.square(jnp.reshape(out, (heads, -1, out.shape[-1]))), axis=(-2, -1))
        scores["/".join(path)] = jnp.sqrt(total)
    return scores


def head_masks(
    params: Mapping[str, Any], heads: int, prune: int, layers: Sequence[str] | None = None
) -> dict[str, Any]:
    """A bool mask tree like `params` (for `compress.masks.apply_masks`) that removes the `prune` heads of
    lowest `head_scores` in every attention layer (`layers`, as in `head_scores`): their query/key/value
    kernel columns and biases, and their rows of `out`'s kernel, are zero. A pruned head then contributes
    exactly 0 to the layer's output (its values are 0; its softmax weights are not used)."""
    if not 0 <= prune < heads:
        raise ValueError(f"Can prune 0 to {heads - 1} of {heads} heads per layer, got {prune}")
    masks = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), dict(params))
    for key, score in head_scores(params, heads, layers).items():
        keep = jnp.ones(heads, bool).at[jnp.argsort(score, stable=True)[:prune]].set(False)
        node = _node(masks, tuple(key.split("/")))
        layer = _node(params, tuple(key.split("/")))
        d = layer["query"]["kernel"].shape[-1] // heads
        columns = jnp.repeat(keep, d)
        for name in ("query", "key", "value"):
            node[name]["kernel"] = jnp.broadcast_to(columns, layer[name]["kernel"].shape)
            node[name]["bias"] = columns
        node["out"]["kernel"] = jnp.broadcast_to(columns[:, None], layer["out"]["kernel"].shape)
    return masks
