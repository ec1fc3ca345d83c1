"""JAX's persistent compilation cache, on by default (config.compilation_cache_dir): a sweep's runs that differ
only in seed or learning rate, and a resumed run, load the programs an earlier run of the machine compiled
instead of compiling them again.

JAX keys each entry by the program, the JAX and XLA versions, the devices and the compile options, so one folder
serves every run of one machine. Not a folder shared by machines of different processors: a CPU program is
compiled for the processor it ran on, which the key does not name.
"""

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from adapter_jax.workdir import is_remote

DEFAULT_DIR = "~/.cache/adapter-jax/jax-compilation-cache"
_ENVIRONMENT = "JAX_COMPILATION_CACHE_DIR"  # JAX's own; a folder named there wins over the config's default


def use(folder: str) -> None:
    """Compiled programs go to and come from `folder` ("": no cache), unless JAX_COMPILATION_CACHE_DIR names a
    folder and `folder` is the default; JAX reads that itself. Before the first compilation, or JAX keeps the
    folder it had."""
    if not folder:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if os.environ.get(_ENVIRONMENT) and folder == DEFAULT_DIR:
        return
    path = folder if is_remote(folder) else os.path.expanduser(folder)
    if jax.config.jax_compilation_cache_dir == path:
        return
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()  # JAX decides whether a cache is used once, at its first compilation
