"""`python -m MODULE ARGS...` with every training batch FAKE_TPU_STEP_SECONDS late: the stand-in image's python
when a test must act in the middle of a run (a preemption)."""

import os
import runpy
import sys
import time

sys.path.insert(0, os.getcwd())  # as `python -m` does
from adapter_jax import input_pipeline

_next_batch = input_pipeline.TrainIterator.__next__
_DELAY_S = float(os.environ["FAKE_TPU_STEP_SECONDS"])
input_pipeline.TrainIterator.__next__ = lambda self: (time.sleep(_DELAY_S), _next_batch(self))[1]
assert sys.argv[1] == "-m"
module = sys.argv[2]
del sys.argv[1:3]
runpy.run_module(module, run_name="__main__", alter_sys=True)
