"""The benchmark's own arithmetic: matmul FLOPs read from compiled HLO, and the CPU line."""

import jax
import jax.numpy as jnp

from adapter_jax import benchmarking


def test_matmul_flops_counts_plain_batched_and_fused_products_as_xla_does():
    def program(x, w, q, k):
        dense = jnp.tanh(x @ w)  # 2 x 64 x 48 x 32, fused with an elementwise op
        scores = jnp.einsum("bhqc,bhkc->bhqk", q, k)  # batched: 2 x (3 x 4) x 16 x 16 x 8
        return dense.sum() + scores.sum()

    args = (jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((3, 4, 16, 8)), jnp.ones((3, 4, 16, 8)))
    compiled = jax.jit(program).lower(*args).compile()
    expected = 2 * 64 * 48 * 32 + 2 * 3 * 4 * 16 * 16 * 8
    assert benchmarking.matmul_flops(compiled.as_text()) == expected
    # XLA's own count adds the elementwise work (tanh, sums) on top of the same products
    assert expected <= compiled.cost_analysis()["flops"] < 1.1 * expected


def test_cpu_description_names_the_model_cores_and_vector_extension():
    line = benchmarking.cpu_description()
    model, cores, vectors = line.rsplit(", ", 2)
    assert model and cores.endswith(" logical cores") and int(cores.split()[0]) >= 1
    assert vectors in ("AVX-512", "AVX2", "no AVX2")


def test_device_peaks_match_jax_device_kinds_most_specific_first():
    from adapter_jax import device_peaks

    assert device_peaks.lookup("NVIDIA H200").bfloat16 == 989
    assert device_peaks.lookup("NVIDIA A100-SXM4-80GB").for_dtype("float32") == 156  # TF32, not A10's
    assert device_peaks.lookup("NVIDIA A10G").bfloat16 == 125
    assert device_peaks.lookup("TPU v5 lite").bfloat16 == 197  # v5e, not v5p
    assert device_peaks.lookup("NVIDIA L40S").bfloat16 == 362 and device_peaks.lookup("NVIDIA L4").bfloat16 == 121
    assert device_peaks.lookup("cpu") is None
