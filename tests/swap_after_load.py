"""An attacker with write access to the folder of a -pretrained_weights file, for
tests/test_bad_inputs.py::test_pretrained_weights_are_read_once:

    python tests/swap_after_load.py WEIGHTS EVIL SCRIPT [ARGS ...]

runs the console script file SCRIPT with ARGS in this process; right after the first ``torch.load``
of WEIGHTS returns, the bytes of EVIL replace those of WEIGHTS (and "swapped" is printed). A loader
that reads the file once is not affected; one that opens the path again reads EVIL.
"""
import os
import runpy
import shutil
import sys

import torch

weights, evil, script = os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3]
original = torch.load
state = {"swapped": False}


def load(f, *args, **kwargs):
    result = original(f, *args, **kwargs)
    if not state["swapped"] and isinstance(f, (str, os.PathLike)) and os.path.abspath(f) == weights:
        shutil.copyfile(evil, weights)
        state["swapped"] = True
        print("swapped", flush=True)
    return result


torch.load = load
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
