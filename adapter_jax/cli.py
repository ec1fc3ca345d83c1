"""What every entry point (main, serve, scripts.sweep, scripts.ablate) does around its work: flags that take
paths, a mistake on the command line as `error: ...` (exit 2), distributed start-up, log routing, and an error
of the run as one `error:` line and an exit code:

    AdapterJaxError (bad input)                       2
    NonFiniteLoss, PeerLost, WriteFailed              1
    Preempted (SIGTERM, SIGINT)                       128 + the signal, after its message
    anything else (a bug, a library's own error)      1, as `error: <type>: <message> (traceback in <file>)`
"""

import argparse
import contextlib
import functools
import os
import pathlib
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import ml_collections
from absl import app, flags

from adapter_jax import distributed, logs
from adapter_jax.errors import (
    AdapterJaxError,
    ConfigError,
    NonFiniteLoss,
    PeerLost,
    Preempted,
    WriteFailed,
)
from adapter_jax.workdir import is_remote

FLAGS = flags.FLAGS
# Config keys that name local or bucket folders (not `model`, which may name a hub model).
CONFIG_PATH_KEYS = ("glue_dir", "tfds_data_dir")


def absolute_path(value: str) -> str:
    """A path flag's (or argparse argument's) value made absolute against the current folder (a bucket path as it is).

    orbax refuses relative paths, and a path stored in a results file must mean the same from any
    folder; an empty value (an unset shell variable) would silently mean the current folder.
    """
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value if is_remote(value) else os.path.abspath(os.path.expanduser(value))


class _PathParser(flags.ArgumentParser):
    syntactic_help = "a path; relative paths are taken from the current folder"

    def parse(self, argument: str) -> str:
        try:
            return absolute_path(argument)
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from e  # what absl reports as a bad flag value

    def flag_type(self) -> str:
        return "path"


def define_path_flag(name: str, default: str | None, help_text: str, *, multi: bool = False, **kwargs: Any) -> None:
    """An absl string flag (repeatable with `multi`) whose values are made absolute when parsed, and may not be empty."""
    if multi:
        flags.DEFINE_multi(_PathParser(), flags.ArgumentSerializer(), name, default, help_text, **kwargs)
    else:
        flags.DEFINE(_PathParser(), name, default, help_text, serializer=flags.ArgumentSerializer(), **kwargs)


def make_config_paths_absolute(config: ml_collections.ConfigDict) -> None:
    """Makes the config's data folders absolute, as path flags are (an empty tfds_data_dir means TFDS's own)."""
    for key in CONFIG_PATH_KEYS:
        if config.get(key):
            config[key] = absolute_path(config[key])


def usage_error(message: str) -> NoReturn:
    print(f"error: {message}\nPass --helpshort or --helpfull to see help on flags.", file=logs.console())
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a mistake on the command line reported as `error: ...` (exit 2); a --config's
    data folders are made absolute.

    config_flags raises plain exceptions, not flags.Error, for an override of a key the config
    does not have (AttributeError wrapping a KeyError, or TypeError below a tuple) and, at first
    use of the config, for a config file it cannot load (OSError); absl would print their stack
    instead of the key or file at fault.
    """
    try:
        args = FLAGS(argv)
    except flags.Error as e:
        usage_error(str(e))
    except AttributeError as e:
        # The KeyError inside names the key and suggests the nearest known one.
        cause = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
        usage_error(f"--config: unknown key {cause.args[0] if cause.args else cause}")
    except TypeError as e:  # e.g. --config.adapter_sites.x=1, a key below a tuple
        overrides = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
        usage_error(f"--config: one of {', '.join(overrides)} does not fit the config ({e})")
    if "config" in FLAGS:
        try:
            FLAGS.config.keys()  # config_flags reports a config file it cannot load at first use only
        except OSError as e:
            usage_error(f"--config: {e}")
        make_config_paths_absolute(FLAGS.config)
    return args


def start(log_file: pathlib.Path) -> None:
    """Routes the logs to `log_file` and joins the run's other processes (distributed.define_flags' flags;
    a mistake in them is a usage error). A workdir that is a file, or cannot be written, is a usage error
    too: the log file is the first thing written there."""
    try:
        logs.route_logs(log_file)
    except OSError as e:
        usage_error(f"--workdir: cannot write the log file {log_file}: {e.strerror or e}")
    try:
        distributed.initialize_from_flags()
    except ConfigError as e:
        usage_error(str(e))


@contextlib.contextmanager
def exit_codes(*bad_input: type[Exception]) -> Iterator[None]:
    """Ends the process with the module doc's exit code on an error of the run, after one line on the console;
    `bad_input` are more exception types that mean bad input (exit 2), e.g. OSError for a file named by a flag."""
    try:
        yield
    except Preempted as e:
        print(e, file=logs.console())
        sys.exit(128 + e.signum)
    except (AdapterJaxError, *bad_input, NonFiniteLoss, PeerLost, WriteFailed) as e:
        print(f"error: {e}", file=logs.console())
        sys.exit(2 if isinstance(e, (AdapterJaxError, *bad_input)) else 1)


@contextlib.contextmanager
def uncaught_errors() -> Iterator[None]:
    """Any exception that no handler took (a bug, a library's own error) as one `error:` line on the console
    naming the file that holds its traceback, and exit status 1. Once route_logs has run, sys.stderr is the
    run's log file, so a traceback printed there would leave the console silent; before that (or in a script
    without a log file), the traceback goes to a temporary file of its own."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the point. SystemExit, KeyboardInterrupt are not Exceptions
        log_file = logs.routed_file()
        if log_file is None:
            with tempfile.NamedTemporaryFile("w", prefix="adapter-jax-error-", suffix=".log", delete=False) as f:
                traceback.print_exc(file=f)
            log_file = pathlib.Path(f.name)
        else:
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
        message = next(iter(str(e).splitlines()), "")
        print(f"error: {type(e).__name__}: {message} (traceback in {log_file})", file=logs.console())
        sys.exit(1)


def run(main: Callable[[list[str]], None]) -> None:
    """app.run with `parse_flags` and `uncaught_errors`: the way every absl entry point starts."""

    @functools.wraps(main)
    def reported(argv: list[str]) -> None:
        with uncaught_errors():
            main(argv)

    app.run(reported, flags_parser=parse_flags)
