"""`python -m edge_ds COMMAND ...`: the edge-ds CLI as a Python entry, which is what `mlx.launch`
starts on every rank (its `--python` runs a Python interpreter, not the `edge-ds` script):

    mlx.launch -n 2 --backend ring --python "$(which python)" -- -m edge_ds generate \\
        --model DIR --parallel expert --prompt "..."

Under this entry a lost rank ends the process with one line naming the rank (run.FATAL): chat
and serve would otherwise report the error per turn or per request and go on, with no model.
"""

import runpy

from .parallel import run

run.FATAL = True
# runpy rather than an import: the CLI is the top layer (tests/test_layering.py), and this shim
# only starts it.
runpy.run_module("edge_ds.cli", run_name="__main__", alter_sys=True)
