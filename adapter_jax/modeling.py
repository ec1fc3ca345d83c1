"""BERT in Flax linen, with Houlsby bottleneck adapters, in Hugging Face's parameter layout.

Module names mirror HF's `BertModel` so a checkpoint maps onto the params tree by renaming
alone (see weights.py), e.g. HF `encoder.layer.3.attention.self.query.weight` is
`encoder/layer_3/attention/self/query/kernel` here (transposed).

Parameters are created float32; `dtype` is the computation dtype (bfloat16 on TPU and GPU). Softmax,
LayerNorm and the classifier run in float32 whatever `dtype` is. A weight may also be passed in `dtype`
already (steps.replicate_frozen stores the frozen ones so): the modules cast to `dtype` at use, a no-op then.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapter_jax import errors
from adapter_jax.adapters import Adapter, AdapterConfig, gelu


class Dropout(nn.Module):
    """nn.Dropout deciding each unit from 16 random bits: each 32-bit random word serves two units.

    Making the masks was a fifth of a BERT training step on CPU (attention-probability masks
    alone are batch x heads x length^2 per layer), and JAX's generators cost the same per value
    for 16 as for 32 bits, so the step draws half as many 32-bit words and splits each in two.
    A unit is dropped when its bits fall below round(rate * 65536), so the keep probability is
    `rate`'s complement rounded to a multiple of 1/65536; kept units are scaled by the inverse of
    that probability, not of 1 - rate, so that the layer stays unbiased.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        dropped = min(round(self.rate * 65536), 65536)
        if dropped == 65536:  # a rate within 2^-17 of 1: the threshold does not fit 16 bits
            return jnp.zeros_like(x)
        words = jax.random.bits(self.make_rng("dropout"), ((x.size + 1) // 2,), jnp.uint32)
        bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[: x.size].reshape(x.shape)
        keep = bits >= jnp.uint16(dropped)
        return _keep_scaled(x, keep, 65536 / (65536 - dropped))


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _keep_scaled(x: jax.Array, keep: jax.Array, scale: float) -> jax.Array:
    # Rematerialised: the backward pass recomputes the dropped activations from x and the mask
    # rather than keeping them; where x is kept anyway (attention probabilities, for softmax's
    # gradient) that saves a batch x heads x length^2 array per layer.
    return jnp.where(keep, x * scale, 0.0).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT's architecture hyperparameters, named as in HF's config.json (weights.read_bert_config reads one)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise errors.ConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def base(cls) -> "BertConfig":
        """bert-base-uncased."""
        return cls()

    @classmethod
    def large(cls) -> "BertConfig":
        """bert-large-uncased."""
        return cls(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _weight_init(config: BertConfig) -> jax.nn.initializers.Initializer:
    """BERT's initialisation of every kernel and embedding table (biases start at zero)."""
    return jax.nn.initializers.normal(config.initializer_range)


def _dense(features: int, config: BertConfig, dtype: jnp.dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=_weight_init(config),
        bias_init=jax.nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class _DenseParams(nn.Module):
    """The kernel and bias an nn.Dense named like this module would hold, for a caller that applies several at once."""

    features: int
    config: BertConfig

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", _weight_init(self.config), (in_features, self.features), jnp.float32)
        bias = self.param("bias", jax.nn.initializers.zeros, (self.features,), jnp.float32)
        return kernel, bias


def _layer_norm(x: jax.Array, config: BertConfig, dtype: jnp.dtype) -> jax.Array:
    """LayerNorm named "LayerNorm" (HF's name) computed in float32, returned in `dtype`."""
    # Rematerialised: the backward pass recomputes the normalised values from x instead of keeping
    # two more arrays of x's size per LayerNorm.
    y = nn.remat(nn.LayerNorm)(
        epsilon=config.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32, name="LayerNorm"
    )(x.astype(jnp.float32))
    return y.astype(dtype)


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array,
        *,
        deterministic: bool,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        """position_ids [B, L]: each token's position in its own example; None: 0..L-1 in every row."""
        config = self.config

        def embed(num: int, name: str) -> nn.Embed:
            return nn.Embed(
                num,
                config.hidden_size,
                embedding_init=_weight_init(config),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )

        length = input_ids.shape[-1]
        if length > config.max_position_embeddings:
            # nn.Embed would silently clip the out-of-range positions.
            raise errors.ConfigError(
                f"sequence length {length} exceeds max_position_embeddings {config.max_position_embeddings}"
            )
        positions = jnp.arange(length)[None, :] if position_ids is None else position_ids
        x = (
            embed(config.vocab_size, "word_embeddings")(input_ids)
            + embed(config.max_position_embeddings, "position_embeddings")(positions)
            + embed(config.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        x = _layer_norm(x, config, self.dtype)
        return Dropout(config.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, attention_bias: jax.Array, *, deterministic: bool) -> jax.Array:
        config = self.config
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads

        # One matmul against the three kernels side by side: on CPU a 3d-wide product runs at nearly
        # twice the FLOP rate of three d-wide ones, forward and backward.
        kernels, biases = zip(
            *(_DenseParams(config.hidden_size, config, name=name)(x.shape[-1]) for name in ("query", "key", "value"))
        )
        kernel = jnp.concatenate(kernels, axis=1).astype(self.dtype)
        qkv = jnp.dot(x.astype(self.dtype), kernel) + jnp.concatenate(biases).astype(self.dtype)
        # [B, L, 3 d] -> three [B, L, heads, head_dim]
        query, key, value = jnp.unstack(qkv.reshape(*qkv.shape[:-1], 3, heads, head_dim), axis=-3)
        scores = jnp.einsum("bqhc,bkhc->bhqk", query, key, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(head_dim)) + attention_bias
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = Dropout(config.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhc->bqhc", probs, value)
        return context.reshape(*context.shape[:-2], config.hidden_size)


class BertOutput(nn.Module):
    """dense -> dropout -> [adapter] -> LayerNorm(. + residual).

    Closes both sublayers of a Transformer layer (HF's BertSelfOutput and BertOutput); the
    adapter sits where the paper puts it, on the sublayer's output before the residual.
    """

    config: BertConfig
    adapter: AdapterConfig | None = None  # None: this site has no adapter
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool) -> jax.Array:
        config = self.config
        x = _dense(config.hidden_size, config, self.dtype, "dense")(x)
        x = Dropout(config.hidden_dropout_prob)(x, deterministic=deterministic)
        if self.adapter is not None:
            x = Adapter(self.adapter.size, self.adapter.init_std, dtype=self.dtype, name="adapter")(x)
        return _layer_norm(x.astype(jnp.float32) + residual.astype(jnp.float32), config, self.dtype)


class BertAttention(nn.Module):
    config: BertConfig
    adapter: AdapterConfig | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, attention_bias: jax.Array, *, deterministic: bool) -> jax.Array:
        context = BertSelfAttention(self.config, self.dtype, name="self")(
            x, attention_bias, deterministic=deterministic
        )
        return BertOutput(self.config, self.adapter, self.dtype, name="output")(
            context, x, deterministic=deterministic
        )


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.config.intermediate_size, self.config, self.dtype, "dense")(x)
        return gelu(x)


class BertLayer(nn.Module):
    config: BertConfig
    adapter: AdapterConfig
    layer_index: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, attention_bias: jax.Array, *, deterministic: bool) -> jax.Array:
        def site_adapter(site: str) -> AdapterConfig | None:
            return self.adapter if self.adapter.active(self.layer_index, site) else None

        x = BertAttention(self.config, site_adapter("attention"), self.dtype, name="attention")(
            x, attention_bias, deterministic=deterministic
        )
        intermediate = BertIntermediate(self.config, self.dtype, name="intermediate")(x)
        return BertOutput(self.config, site_adapter("output"), self.dtype, name="output")(
            intermediate, x, deterministic=deterministic
        )


class BertEncoder(nn.Module):
    config: BertConfig
    adapter: AdapterConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, attention_bias: jax.Array, *, deterministic: bool) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, self.adapter, i, self.dtype, name=f"layer_{i}")(
                x, attention_bias, deterministic=deterministic
            )
        return x


class BertPooler(nn.Module):
    """tanh(dense(hidden state of each example's first token, [CLS]))."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, cls_states: jax.Array) -> jax.Array:
        return jnp.tanh(_dense(self.config.hidden_size, self.config, self.dtype, "dense")(cls_states))


def _attention_bias(segment_ids: jax.Array, packed: bool) -> jax.Array:
    """The additive attention bias: 0 where a query may attend to a key, float32's min elsewhere.

    A large negative score, not -inf, gives masked keys zero weight while a query with nothing to
    attend to (padding) stays finite (uniform) rather than NaN.
    """
    if not packed:
        # One example per row: every query sees the row's tokens. Shape [B, heads=1, queries=1, L].
        allowed = segment_ids[:, None, None, :] > 0
    else:
        # Block-diagonal: a query sees the tokens of its own segment only. Shape [B, 1, L, L].
        same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = (same_segment & (segment_ids[:, None, :] > 0))[:, None]
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)


class BertModel(nn.Module):
    """BERT embeddings + encoder + pooler. Returns (sequence_output [B, L, d], pooled_output [examples, d]).

    segment_ids [B, L] is 0 at padding and otherwise says which example (segment) of its row a token
    belongs to; a token attends to its own segment only. Unpacked rows hold one example each (segment
    ids 1/0: HF's attention mask) and are pooled from their first token: pooled_output is [B, d].

    Packed rows (several examples per row) also need `position_ids` [B, L], each token's position in
    its own example, and `cls_index` [examples], the flat index (row * L + column) of each example's
    first token ([CLS]), from which each example is pooled.
    """

    config: BertConfig
    adapter: AdapterConfig = AdapterConfig(size=0)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array,
        segment_ids: jax.Array,
        *,
        deterministic: bool = True,
        position_ids: jax.Array | None = None,
        cls_index: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        packed = cls_index is not None
        if packed != (position_ids is not None):
            raise ValueError("packed rows need both position_ids and cls_index")
        x = BertEmbeddings(self.config, self.dtype, name="embeddings")(
            input_ids, token_type_ids, deterministic=deterministic, position_ids=position_ids
        )
        x = BertEncoder(self.config, self.adapter, self.dtype, name="encoder")(
            x, _attention_bias(segment_ids, packed), deterministic=deterministic
        )
        cls_states = jnp.take(x.reshape(-1, x.shape[-1]), cls_index, axis=0) if packed else x[:, 0]
        return x, BertPooler(self.config, self.dtype, name="pooler")(cls_states)


class BertForSequenceClassification(nn.Module):
    """BERT + dropout + a linear head on the pooled output. num_labels == 1 is regression (STS-B).

    Returns float32 logits [examples, num_labels] whatever the computation dtype: one per row, or for
    packed rows one per entry of `cls_index` (see BertModel).
    """

    config: BertConfig
    adapter: AdapterConfig = AdapterConfig(size=0)
    num_labels: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array,
        segment_ids: jax.Array,
        *,
        deterministic: bool = True,
        position_ids: jax.Array | None = None,
        cls_index: jax.Array | None = None,
    ) -> jax.Array:
        _, pooled = BertModel(self.config, self.adapter, self.dtype, name="bert")(
            input_ids,
            token_type_ids,
            segment_ids,
            deterministic=deterministic,
            position_ids=position_ids,
            cls_index=cls_index,
        )
        pooled = Dropout(self.config.hidden_dropout_prob)(pooled, deterministic=deterministic)
        return _dense(self.num_labels, self.config, jnp.float32, "classifier")(pooled.astype(jnp.float32))
