"""Entry point: flags -> config -> train_and_evaluate or predict.

    python -m adapter_jax.main --config=configs/glue.py:rte --workdir=/tmp/rte [--action=predict]

Several --workdir with --action=predict predict all their tasks in one pass (predict.predict_together):

    python -m adapter_jax.main --config=configs/glue.py:rte --workdir=/tmp/rte --workdir=/tmp/sst2 --action=predict
"""

import json

import jax
from absl import flags, logging
from ml_collections import config_flags

from adapter_jax import cli, distributed, predict, train
from adapter_jax.workdir import Workdir

FLAGS = flags.FLAGS
cli.define_path_flag(
    "workdir", None,
    "Folder for checkpoints, logs, the adapter export and predictions; with --action=predict, repeat it to predict "
    "several runs' tasks in one pass.",
    multi=True,
)
flags.DEFINE_enum("action", "train", ["train", "predict"],
                  "train (resuming from the workdir), or predict the test sets with the workdir's export.")
# The flag's first name, kept for the commands already written with it; it read as if it were config.mode,
# which says what training fine-tunes (adapters, full, ...).
flags.DEFINE_alias("mode", "action")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/glue.py:rte.", lock_config=True)
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    workdirs = FLAGS.workdir
    if FLAGS.action == "train" and len(workdirs) > 1:
        cli.usage_error(f"--workdir: training takes one workdir, got {len(workdirs)}")
    cli.start(Workdir(workdirs[0]).log_file())
    logging.info("JAX devices: %d local, %d global", jax.local_device_count(), jax.device_count())
    if len(workdirs) > 1:
        run, workdir = predict.predict_together, workdirs
    else:
        run, workdir = (train.train_and_evaluate if FLAGS.action == "train" else predict.predict), workdirs[0]
    with cli.exit_codes():
        result = run(FLAGS.config, workdir)
    print(json.dumps(result, indent=2, default=str))


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
