"""Entry point: flags -> config -> train_and_evaluate or predict.

    python -m adapter_jax.main --config=configs/glue.py:rte --workdir=/tmp/rte [--mode=predict]

Several --workdir with --mode=predict predict all their tasks in one pass (predict.predict_together):

    python -m adapter_jax.main --config=configs/glue.py:rte --workdir=/tmp/rte --workdir=/tmp/sst2 --mode=predict
"""

import json
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from adapter_jax import distributed, predict, run_utils, train
from adapter_jax.errors import (
    AdapterJaxError,
    ConfigError,
    NonFiniteLoss,
    PeerLost,
    Preempted,
    WriteFailed,
)

FLAGS = flags.FLAGS
run_utils.define_path_flag(
    "workdir", None,
    "Folder for checkpoints, logs, the adapter export and predictions; with --mode=predict, repeat it to predict "
    "several runs' tasks in one pass.",
    multi=True,
)
flags.DEFINE_enum("mode", "train", ["train", "predict"], "Train (resuming from the workdir), or predict test.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/glue.py:rte.", lock_config=True)
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def _usage_error(message: str) -> None:
    print(f"error: {message}\nPass --helpshort or --helpfull to see help on flags.", file=run_utils.console())
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a mistake on the command line reported as `error: ...` (exit 2).

    config_flags raises plain exceptions, not flags.Error, for an override of a key the config
    does not have (AttributeError wrapping a KeyError, or TypeError below a tuple) and, at first
    use of the config, for a config file it cannot load (OSError); absl would print their stack
    instead of the key or file at fault.
    """
    try:
        args = FLAGS(argv)
    except flags.Error as e:
        _usage_error(str(e))
    except AttributeError as e:
        # The KeyError inside names the key and suggests the nearest known one.
        cause = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
        _usage_error(f"--config: unknown key {cause.args[0] if cause.args else cause}")
    except TypeError as e:  # e.g. --config.adapter_sites.x=1, a key below a tuple
        overrides = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
        _usage_error(f"--config: one of {', '.join(overrides)} does not fit the config ({e})")
    try:
        FLAGS.config.keys()  # config_flags reports a config file it cannot load at first use only
    except OSError as e:
        _usage_error(f"--config: {e}")
    run_utils.make_config_paths_absolute(FLAGS.config)
    return args


def main(argv: list[str]) -> None:
    del argv
    workdirs = FLAGS.workdir
    if FLAGS.mode == "train" and len(workdirs) > 1:
        _usage_error(f"--workdir: training takes one workdir, got {len(workdirs)}")
    run_utils.route_logs(run_utils.log_file_for(workdirs[0]))
    try:
        distributed.initialize_from_flags()
    except ConfigError as e:
        _usage_error(str(e))
    logging.info("JAX devices: %d local, %d global", jax.local_device_count(), jax.device_count())
    if len(workdirs) > 1:
        run, workdir = predict.predict_together, workdirs
    else:
        run, workdir = (train.train_and_evaluate if FLAGS.mode == "train" else predict.predict), workdirs[0]
    try:
        result = run(FLAGS.config, workdir)
    except Preempted as e:
        print(e, file=run_utils.console())
        sys.exit(128 + e.signum)
    except (AdapterJaxError, NonFiniteLoss, PeerLost, WriteFailed) as e:
        print(f"error: {e}", file=run_utils.console())
        sys.exit(2 if isinstance(e, AdapterJaxError) else 1)
    print(json.dumps(result, indent=2, default=str))


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
