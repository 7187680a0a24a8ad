"""Which rank holds what, decided before any weight is read (MLX-free, so it can refuse early)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import EdgeDSError

MODES = ("expert", "pipeline")  # tensor: not built yet (README, Several machines)


class ParallelError(EdgeDSError):
    """A parallel run cannot go on (a rank died, the model does not divide); names the rank."""


@dataclass(frozen=True)
class ExpertPlan:
    """Routed experts split by expert id, round-robin: rank r holds experts e with e % size == r.

    Round-robin rather than contiguous blocks: DeepSeek's group-limited routing (V3: 8 groups, a
    token's experts from 4 of them) picks experts in contiguous id ranges, so blocks would tend to
    put all of a token's experts on one rank and make the others wait; round-robin spreads every
    group over every rank. Reading costs the same: each expert's slice is one pread either way."""

    rank: int
    size: int
    num_experts: int

    @property
    def owned(self) -> list[int]:
        """Global ids of this rank's experts, ascending (their local ids are their positions)."""
        return list(range(self.rank, self.num_experts, self.size))


def expert_plan(cfg: ModelConfig, rank: int, size: int) -> ExpertPlan:
    """This rank's share; refuses a model whose experts do not divide over `size` ranks."""
    E = cfg.n_routed_experts or 0
    if not cfg.moe_layers or E == 0:
        raise ParallelError(f"--parallel expert: the model has no routed experts to split over {size} ranks")
    if E < size:
        raise ParallelError(f"--parallel expert: n_routed_experts = {E} is fewer than the {size} ranks "
                            "(every rank needs at least one expert)")
    if E % size:
        raise ParallelError(f"--parallel expert: n_routed_experts = {E} does not divide over {size} ranks "
                            f"({E} % {size} = {E % size}); use a rank count that divides it")
    return ExpertPlan(rank, size, E)


def hosts() -> list[str]:
    """Each rank's address as mlx.launch's ring hostfile (MLX_HOSTFILE) gives it, else []."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return []
    try:
        with open(path) as f:
            ring = json.load(f)
        return [", ".join(node) if isinstance(node, list) else str(node) for node in ring]
    except (OSError, ValueError):
        return []


def describe(rank: int) -> str:
    """'rank 1 (127.0.0.1:5001)' when the host is known, else 'rank 1'."""
    h = hosts()
    return f"rank {rank} ({h[rank]})" if rank < len(h) else f"rank {rank}"
