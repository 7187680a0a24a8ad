"""One model over several processes (MLX's distributed layer, started by `mlx.launch`).

open_parallel() is what edge_ds.load(path, parallel="expert") calls: on rank 0 it returns a
backend whose every call runs on all ranks; on the other ranks it serves rank 0's calls until
rank 0 ends, then exits the process. So any program written for one process (the CLI, a script,
the server) runs unchanged under `mlx.launch`, with rank 0 doing all its I/O. See run.py for the
lockstep protocol and faults, expert.py for expert parallelism, plan.py for who holds what.
"""

from __future__ import annotations

import atexit
from pathlib import Path

from ..errors import OptionError
from .plan import MODES, ExpertPlan, ParallelError, describe, expert_plan

__all__ = ["MODES", "ExpertPlan", "ParallelError", "expert_plan", "open_parallel", "describe"]


def open_parallel(directory: Path, mode: str, experts=None):
    """The model in `directory` split over the ranks of mx.distributed.init() by `mode`.

    Returns None in a single process (size 1: load normally), rank 0's Driver backend otherwise;
    never returns on other ranks (they follow rank 0, then exit). A model that does not divide is
    refused before any weight is read."""
    if mode not in MODES:
        raise OptionError("parallel", f"{{option}} {mode!r} is not available (available: {', '.join(MODES)}; "
                                      "tensor and pipeline are not built yet)")
    import mlx.core as mx

    from ..backends.mlx import MLXBackend
    from ..config import ModelConfig
    from ..layout import WEIGHTS_GLOB, has_weights, is_routed_expert
    from ..loading import load_model
    from ..checkpoint import Checkpoint
    from ..wired import wire
    from . import expert, run

    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    if size == 1:
        return None
    if experts is not None:
        raise OptionError("expert_budget", "{option} does not combine with --parallel yet (each rank holds its "
                                           "whole expert share resident)")
    cfg = ModelConfig.load(directory)
    plan = expert_plan(cfg, rank, size)  # refuse before reading weights
    if not has_weights(directory):
        raise ParallelError(f"{directory}: --parallel needs MLX weights ({WEIGHTS_GLOB}); convert the checkpoint")
    counter = [0]
    model = load_model(directory, expert_ids=plan.owned, counter=counter)
    expert.install(model, plan, group)
    wire(model)
    inner = MLXBackend(model)
    with Checkpoint(directory, WEIGHTS_GLOB) as ckpt:
        trunk = sum(ckpt.info(n).nbytes for n in ckpt.names() if not is_routed_expert(n))
    inner.bytes_read = {"experts": counter[0], "trunk": trunk}
    link = run.Link(group)
    if rank == 0:
        driver = run.Driver(inner, link, mode)
        atexit.register(driver.close)
        return driver
    run.follow(inner, link)
    raise SystemExit(0)
