"""The bottleneck adapter (Houlsby et al., 2019, Fig. 2) and where it goes.

An adapter projects the d-dimensional hidden state down to m dimensions, applies a
nonlinearity, projects back up and adds the input: x + up(gelu(down(x))). With weights
drawn near zero it starts as (almost) the identity, so the pretrained network is
undisturbed at the start of fine-tuning.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapter_jax import errors

# The two places per Transformer layer where the paper inserts an adapter: after the
# attention output projection and after the feed-forward output projection, each
# before the residual add and LayerNorm.
SITES = ("attention", "output")

# Exact (erf) GELU, the nonlinearity BERT uses, keeping only its input for the backward pass:
# jax.nn.gelu's derivative would keep three intermediates the size of its input, and in BERT's
# feed-forward block that input is the largest activation of a layer; recomputing them is a few
# elementwise operations.
gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=False))


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Which adapters a BERT model has.

    size:     bottleneck width m; 0 means no adapters at all.
    init_std: stddev of the truncated-normal init of both projections. 1e-3 follows the
              authors' released code; the paper's text says 1e-2.
    sites:    which of SITES get an adapter in each layer.
    layers:   indices of the layers that get adapters; None means every layer (the paper's
              layer ablation removes adapters from chosen layers).
    """

    size: int = 64
    init_std: float = 1e-3
    sites: tuple[str, ...] = SITES
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.size < 0:
            raise errors.ConfigError(f"adapter size must be >= 0, got {self.size}")
        if self.init_std < 0:
            raise errors.ConfigError(f"adapter init_std must be >= 0, got {self.init_std}")
        # Tuples, not lists, keep the config hashable (it is a linen Module field).
        object.__setattr__(self, "sites", tuple(self.sites))
        unknown = [site for site in self.sites if site not in SITES]
        if unknown:
            raise errors.ConfigError(f"unknown adapter sites {unknown}; expected a subset of {SITES}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            negative = [layer for layer in self.layers if layer < 0]
            if negative:
                raise errors.ConfigError(f"adapter layers must be >= 0, got {negative}")

    def active(self, layer_index: int, site: str) -> bool:
        """Whether layer `layer_index` has an adapter at `site`."""
        if site not in SITES:
            raise errors.ConfigError(f"unknown adapter site {site!r}; expected one of {SITES}")
        in_layer = self.layers is None or layer_index in self.layers
        return self.size > 0 and site in self.sites and in_layer


class Adapter(nn.Module):
    """x + up(gelu(down(x))); parameters always float32, computation in `dtype`."""

    size: int
    init_std: float = 1e-3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(
                features,
                kernel_init=jax.nn.initializers.truncated_normal(self.init_std),
                bias_init=jax.nn.initializers.zeros,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )

        hidden = dense(self.size, "down")(x)
        hidden = gelu(hidden)
        return x + dense(x.shape[-1], "up")(hidden)
