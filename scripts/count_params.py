"""Parameter accounting for adapters on BERT-base and BERT-large, from the model and from the paper's formula.

For each model and bottleneck size m: the total parameters, the adapter parameters per layer (counted on
the model's params tree via jax.eval_shape, so nothing is allocated) next to the paper's 2 x (2md + d + m),
the trainable parameters in the "adapters" setting (adapters + LayerNorms + head) from trainable.py's mask next
to the formula, and the trainable fraction of the base model.

Run from the repository root:

  python -m scripts.count_params [--num_labels 2]
"""

import argparse
from collections.abc import Sequence

from adapter_jax import paper
from adapter_jax.modeling import BertConfig
from adapter_jax.weights import parameter_report

MODELS = {"bert-base": BertConfig.base, "bert-large": BertConfig.large}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_labels", type=int, default=2, help="classes of the task head (1 = regression)")
    args = parser.parse_args(argv)

    header = (
        f"{'model':<11}{'m':>5}{'base params':>14}{'total params':>14}{'adapters/layer':>16}"
        f"{'(formula)':>11}{'trainable':>12}{'(formula)':>11}{'fraction':>10}"
    )
    print(header)
    print("-" * len(header))
    reports = []
    for name, make_config in MODELS.items():
        for size in paper.ADAPTER_SIZES:
            r = parameter_report(make_config(), size, args.num_labels)
            reports.append({"model": name, **r})
            print(
                f"{name:<11}{size:>5}{r['base_params']:>14,}{r['total_params']:>14,}"
                f"{r['adapter_params_per_layer']:>16,}{r['adapter_params_per_layer_formula']:>11,}"
                f"{r['trainable_params']:>12,}{r['trainable_params_formula']:>11,}{r['trainable_fraction']:>10.2%}"
            )
    return reports


if __name__ == "__main__":
    main()
