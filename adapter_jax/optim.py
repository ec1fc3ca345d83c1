"""The optimizer: BERT's AdamW with global-norm clipping, 10% linear warmup then linear decay.

It is applied to the trainable parameters alone (trainable.py splits them off), so frozen weights
have no optimizer state and the clipping norm is the norm of the trainable gradients.
"""

import jax
import optax

from adapter_jax import trainable


def learning_rate_schedule(
    learning_rate: float, total_steps: int, warmup_fraction: float = 0.1
) -> optax.Schedule:
    """Linear warmup over `warmup_fraction` of the steps, then linear decay to zero (BERT's schedule)."""
    warmup_steps = int(total_steps * warmup_fraction)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
            optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1)),
        ],
        boundaries=[warmup_steps],
    )


def _decayed(params: optax.Params) -> optax.Params:
    """True where weight decay applies: everything but LayerNorm parameters and biases, as in BERT."""
    return jax.tree.map(lambda exempt: not exempt, trainable.matches(params, trainable.NOT_DECAYED_PATTERNS))


def create_optimizer(
    *,
    learning_rate: float,
    total_steps: int,
    warmup_fraction: float = 0.1,
    weight_decay: float = 0.01,
    adam_epsilon: float = 1e-6,
    max_grad_norm: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW (BERT's betas, decoupled weight decay) after clipping the gradients' global norm."""
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(
            learning_rate_schedule(learning_rate, total_steps, warmup_fraction),
            b1=0.9,
            b2=0.999,
            eps=adam_epsilon,
            weight_decay=weight_decay,
            mask=_decayed,
        ),
    )
