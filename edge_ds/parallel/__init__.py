"""One model over several processes (MLX's distributed layer, started by `mlx.launch`).

open_parallel() is what edge_ds.load(path, parallel="expert") calls: on rank 0 it returns a
backend whose every call runs on all ranks; on the other ranks it serves rank 0's calls until
rank 0 ends, then exits the process. So any program written for one process (the CLI, a script,
the server) runs unchanged under `mlx.launch`, with rank 0 doing all its I/O. See run.py for the
lockstep protocol and faults, expert.py for expert parallelism, tensor.py for tensor parallelism
(slices.py: reading a rank's slices), pipeline.py for pipeline parallelism, plan.py for who holds what.
"""

from __future__ import annotations

import atexit
import hashlib
from pathlib import Path

import numpy as np

from ..errors import OptionError
from .plan import MODES, ExpertPlan, ParallelError, TensorPlan, describe, expert_plan, tensor_plan

__all__ = ["MODES", "ExpertPlan", "ParallelError", "TensorPlan", "expert_plan", "tensor_plan", "open_parallel",
           "describe"]


def os_read_bytes() -> int:
    """Bytes this process has read through read/pread system calls so far (Linux /proc/self/io
    rchar: page-cache hits included, so it measures what was asked of the files), or -1."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def peak_rss() -> int:
    """The process's peak resident bytes so far (ru_maxrss: KiB on Linux, bytes on macOS), or -1."""
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except (ImportError, OSError):
        return -1


def open_parallel(directory: Path, mode: str, experts=None):
    """The model in `directory` split over the ranks of mx.distributed.init() by `mode`.

    Returns None in a single process (size 1: load normally), rank 0's Driver backend otherwise;
    never returns on other ranks (they follow rank 0, then exit). A model that does not divide is
    refused before any weight is read."""
    if mode not in MODES:
        raise OptionError("parallel", f"{{option}} {mode!r} is not available (available: {', '.join(MODES)})")
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
    if experts is not None and (experts.trace is not None or experts.prefetch):
        raise OptionError("trace" if experts.trace is not None else "prefetch",
                          "{option} does not combine with parallel yet (a rank sees only its own experts)")
    cfg = ModelConfig.load(directory)
    plan = tplan = None  # refuse a model that does not divide before reading weights
    if mode == "pipeline":
        from .pipeline import stages

        stage = stages(cfg, size)[rank]
    elif mode == "tensor":
        tplan = tensor_plan(cfg, rank, size)
    else:
        plan = expert_plan(cfg, rank, size)
    if not has_weights(directory):
        raise ParallelError(f"{directory}: --parallel needs MLX weights ({WEIGHTS_GLOB}); convert the checkpoint")
    from ..experts import store as _store  # noqa: F401 - imported before the byte count starts

    counter = [0]
    if plan is None and experts is not None:
        raise OptionError("expert_budget", f"{{option}} does not combine with parallel={mode!r} yet")
    before = os_read_bytes()
    if tplan is not None:
        from .slices import SliceReader

        reader = SliceReader(tplan)
        model = load_model(directory, shard=reader)
        model.config = cfg  # built from the rank's local sizes; the model as a whole is cfg's
        measured = os_read_bytes() - before if before >= 0 else -1
        cache = None
    elif plan is None:
        model = load_model(directory, layers=stage)
        measured = os_read_bytes() - before if before >= 0 else -1
        cache = None
    elif experts is None:
        model = load_model(directory, expert_ids=plan.owned, counter=counter)
        measured = os_read_bytes() - before if before >= 0 else -1
        cache = None
    else:  # lazy experts: the trunk now, this rank's experts on demand under its own budget
        from .lazy import attach_shard

        model = load_model(directory, routed_experts=False)
        measured = os_read_bytes() - before if before >= 0 else -1
        cache = attach_shard(model, directory, plan.owned, experts.budget, experts.policy, experts.page_cache)
    if plan is not None:
        expert.install(model, plan, group)
    elif tplan is not None:
        from . import tensor

        tensor.install(model, group)
    wire(model, cache.slots * cache.store.expert_bytes if cache is not None else 0)
    if mode == "pipeline":
        from .pipeline import PipelineStage

        model = PipelineStage(model, *stage, group)
    inner = MLXBackend(model, cache)
    split = split_total = 0  # tensor: bytes of the split tensors this rank read, and theirs in all
    with Checkpoint(directory, WEIGHTS_GLOB) as ckpt:
        if tplan is not None:  # "trunk": what every rank reads whole; "experts": its share of the routed experts
            trunk, counter[0] = reader.counts["trunk"], reader.counts["experts"]
            split, split_total = reader.counts["split"], reader.totals["split"]
        elif plan is None:  # pipeline: "trunk" is what this stage reads, "experts" its routed share of it
            from ..loading import stage_keep

            keep = stage_keep(cfg, *stage)
            trunk = sum(ckpt.info(n).nbytes for n in ckpt.names() if keep(n) and not is_routed_expert(n))
            counter[0] = sum(ckpt.info(n).nbytes for n in ckpt.names() if keep(n) and is_routed_expert(n))
        else:
            trunk = sum(ckpt.info(n).nbytes for n in ckpt.names() if not is_routed_expert(n))
        routed = sum(ckpt.info(n).nbytes for n in ckpt.names() if is_routed_expert(n))
    # Every rank's numbers on every rank (rank 0 reports them), and a check that all ranks
    # loaded the same model: a rank started on another directory or version would compute garbage.
    fingerprint = int.from_bytes(hashlib.sha256((directory / "config.json").read_bytes()).digest()[:6], "little")
    mine = mx.array([[counter[0], trunk, routed, measured, fingerprint, peak_rss(), split]], mx.int64)
    link = run.Link(group)
    table = mx.distributed.all_gather(mine, group=group)
    link.eval(table, what="comparing the loaded models")
    rows = np.array(table).tolist()
    for r, row in enumerate(rows):
        if row[4] != fingerprint:
            link.fail(f"rank {rank}: {describe(r)} loaded a different config.json than this rank's {directory}")
    inner.bytes_read = {"experts": counter[0], "trunk": trunk, "routed_total": routed, "os_read": measured,
                        "expert_cache": cache.slots * cache.store.expert_bytes if cache is not None else 0,
                        "split": split, "split_total": split_total,
                        "per_rank": [dict(rank=r, experts=row[0], trunk=row[1], os_read=row[3], peak_rss=row[5],
                                          split=row[6]) for r, row in enumerate(rows)]}
    if rank == 0:
        driver = run.Driver(inner, link, mode)
        atexit.register(driver.close)
        return driver
    run.follow(inner, link)
    raise SystemExit(0)
