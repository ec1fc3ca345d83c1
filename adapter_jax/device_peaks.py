"""Dense matmul peaks of the accelerators this project meets, per chip, in TFLOP/s: what MFU is measured against.

Figures are the vendors' dense (no sparsity) datasheet peaks. "float32" is what a float32 matmul runs at under
JAX's default precision: TF32 tensor cores on NVIDIA Ampere and later, plain FP32 on older GPUs; TPUs publish no
float32 figure (their float32 matmuls run as bfloat16 passes), so their bfloat16 peak stands for both. A device
that is not listed, or a figure to override, is given with scripts/benchmark.py's --peak_tflops.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Peak:
    bfloat16: float
    float32: float

    def for_dtype(self, dtype: str) -> float:
        return self.bfloat16 if dtype == "bfloat16" else self.float32


# (substring of jax's device_kind, peak), most specific first: "A100" before "A10", "TPU v5 lite" before "TPU v5".
PEAKS: tuple[tuple[str, Peak], ...] = (
    ("H100 PCIe", Peak(756, 378)),
    ("H100 NVL", Peak(835, 418)),
    ("H100", Peak(989, 494)),  # SXM
    ("H200", Peak(989, 494)),
    ("GH200", Peak(989, 494)),
    ("A100", Peak(312, 156)),
    ("A10G", Peak(125, 62.5)),  # AWS's A10 variant; AWS publishes no separate figure, so A10's datasheet
    ("A10", Peak(125, 62.5)),
    ("L40S", Peak(362, 183)),
    ("L4", Peak(121, 60)),
    ("V100", Peak(15.7, 15.7)),  # no bfloat16 tensor cores: bfloat16 runs on the FP32 units
    ("T4", Peak(8.1, 8.1)),  # likewise
    ("TPU v6 lite", Peak(918, 918)),  # v6e (Trillium)
    ("TPU v5 lite", Peak(197, 197)),  # v5e
    ("TPU v5p", Peak(459, 459)),
    ("TPU v5", Peak(459, 459)),  # v5p reports itself as "TPU v5"
    ("TPU v4", Peak(275, 275)),
    ("TPU v3", Peak(123, 123)),
    ("TPU v2", Peak(45, 45)),
)


def lookup(device_kind: str) -> Peak | None:
    """The peak of a device by jax's `device_kind` (e.g. "NVIDIA H200", "TPU v5 lite"); None if not listed."""
    return next((peak for name, peak in PEAKS if name in device_kind), None)
