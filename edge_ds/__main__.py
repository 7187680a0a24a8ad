"""`python -m edge_ds COMMAND ...`: the edge-ds CLI as a Python entry, which is what `mlx.launch`
starts on every rank (its `--python` runs a Python interpreter, not the `edge-ds` script):

    mlx.launch -n 2 --backend ring --python "$(which python)" -- -m edge_ds generate \\
        --model DIR --parallel expert --prompt "..."

Under this entry a lost rank ends the process with one line naming the rank (run.FATAL): chat
and serve would otherwise report the error per turn or per request and go on, with no model.
"""

from .cli import main
from .parallel import run

run.FATAL = True
main(prog_name="edge-ds")
