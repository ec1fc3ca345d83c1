"""adapter-jax: Houlsby et al. (2019) bottleneck adapters for BERT in JAX/Flax."""
