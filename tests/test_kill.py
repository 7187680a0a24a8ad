"""Killed runs leave no half-written file behind.

`edge-ds convert` and `edge-ds export-onnx` are started as subprocesses on a tiny checkpoint and
killed with SIGKILL (which no process can catch) at several points, watched every millisecond: a
seeded delay into start-up, once the hidden `.DST.partial-PID` directory holds its k-th file (k
seeded: mid-write), once DST appears, and as soon as the temporary directory appears. Each time DST
must be absent or equal, byte for byte, to an uninterrupted conversion, and SRC unchanged; the
leftover temporary directories must not pass for a model, and the next conversion to the same DST
must succeed and remove them.
PromptCache.save killed while saving leaves the old file or the complete new one; a routing trace's
writer killed while writing leaves a trace that reads up to its last complete record.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from converters.staging import remove_stale_partials
from edge_ds.config import ModelConfig
from edge_ds.errors import EdgeDSError

pytestmark = pytest.mark.skipif(os.name == "nt", reason="needs SIGKILL")

ROOT = Path(__file__).resolve().parents[1]
SEED = 15


def tree(d: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under d (hidden ones too)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def partials(dst: Path) -> list[Path]:
    return sorted(dst.parent.glob(f".{dst.name}.partial-*"))


def files_in(d: Path) -> int:
    try:
        return sum(1 for _ in d.iterdir())
    except OSError:  # not made yet, or renamed away
        return 0


# When to kill: (name, condition on (seconds since start, the run's temp dir, DST)).
Trigger = tuple[str, Callable[[float, Path, Path], bool]]


def triggers(n_files: int, rng: random.Random) -> list[Trigger]:
    k, delay = rng.randint(1, n_files - 1), rng.uniform(0.05, 0.5)
    return [  # the last leaves a temp dir, for the conversion that follows to clean up
        (f"{delay:.2f} s into start-up", lambda t, tmp, dst: t > delay),
        (f"file {k} of {n_files} written", lambda t, tmp, dst: files_in(tmp) >= k),
        ("DST renamed into place", lambda t, tmp, dst: dst.exists()),
        ("temp dir made", lambda t, tmp, dst: tmp.exists()),
    ]


def run_and_kill(args: list[str], dst: Path, when: Callable[[float, Path, Path], bool]) -> tuple[bool, Path]:
    """Runs `edge-ds ARGS`, SIGKILLs it when `when` holds (polled every millisecond); returns
    whether it was killed (False: it finished first) and its temp dir's name."""
    proc = subprocess.Popen([sys.executable, "-m", "edge_ds.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    tmp = dst.parent / f".{dst.name}.partial-{proc.pid}"
    start = time.monotonic()
    try:
        while proc.poll() is None and not when(time.monotonic() - start, tmp, dst):
            assert time.monotonic() - start < 120, f"edge-ds {args[0]} did not finish"
            time.sleep(0.001)
        killed = proc.poll() is None
    finally:
        proc.kill()  # SIGKILL; nothing once it has exited
        proc.wait()
    return killed, tmp


def kill_at_each_point(args: list[str], src: Path, dst: Path, reference: dict[str, str]) -> list[str]:
    """Kills `edge-ds ARGS SRC DST` at every trigger; checks DST, SRC and the leftovers each time."""
    before = tree(src)
    seen = []
    points = triggers(len(reference), random.Random(f"{SEED}/{args[0]}"))
    points += points[-1:] * 2  # the last again, should a starved poller have let the run finish
    for name, when in points:
        if name == points[-1][0] and partials(dst):
            break
        killed, tmp = run_and_kill([args[0], str(src), str(dst), *args[1:]], dst, when)
        assert tree(src) == before, f"{args[0]} killed ({name}) changed SRC"
        if dst.exists():
            assert tree(dst) == reference, f"{args[0]} killed ({name}) left an incomplete {dst}"
            seen.append(f"{name}: {'killed' if killed else 'finished'}, DST complete")
            for p in dst.iterdir():
                p.unlink()
            dst.rmdir()
        else:
            assert killed, f"{args[0]} finished without writing {dst}"
            seen.append(f"{name}: killed, DST absent, temp dir {'left' if tmp.exists() else 'not made'}")
            # What a killed run leaves is hidden and not a model directory.
            with pytest.raises(EdgeDSError, match="not found"):
                ModelConfig.load(dst)
        # A run that got as far as making its temp dir removed those of the runs killed before it.
        if "start-up" not in name:
            assert partials(dst) in ([], [tmp]), f"{args[0]}: stale temp dirs were not removed"
    return seen


@pytest.fixture(scope="module")
def src(zoo) -> Path:
    return zoo.hf("v3").path


def test_killed_converter_and_exporter_leave_dst_complete_or_absent(src, tmp_path):
    from converters.mlx import convert
    from converters.onnx import export_onnx

    from edge_ds.backends import apple_silicon

    ref_mlx, ref_onnx = tmp_path / "ref-mlx", tmp_path / "ref-onnx"
    with_onnx = not apple_silicon()  # the CLI's defaults: off Apple Silicon the ONNX export goes beside
    convert(src, ref_mlx, quant="4bit", dtype="bfloat16", onnx=with_onnx)
    export_onnx(src, ref_onnx)
    jobs = {"convert": (["convert"], tmp_path / "out" / "mlx", tree(ref_mlx)),
            "export-onnx": (["export-onnx"], tmp_path / "out" / "onnx", tree(ref_onnx))}
    # The two tools' runs are independent: both at once halve the wall time of their start-ups.
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(kill_at_each_point, args, src, dst, ref)
                   for name, (args, dst, ref) in jobs.items()}
        outcomes = {name: f.result() for name, f in futures.items()}
    print(outcomes)

    for name, (args, dst, ref) in jobs.items():
        assert partials(dst), f"no kill of {name} left a temp dir: the test no longer kills mid-write"
        # The next run to the same DST is not confused by them, and removes them.
        if name == "convert":
            convert(src, dst, quant="4bit", dtype="bfloat16", onnx=with_onnx)
        else:
            export_onnx(src, dst)
        assert tree(dst) == ref
        assert partials(dst) == []


def test_stale_partials_of_live_runs_are_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dst = tmp_path / "model"
    for pid in (dead.pid, os.getppid(), os.getpid()):
        (tmp_path / f".model.partial-{pid}").mkdir()
    (tmp_path / ".model.partial-x").mkdir()  # not ours: not a pid
    (tmp_path / ".other.partial-1").mkdir()  # another DST's
    removed = remove_stale_partials(dst)
    assert [p.name for p in removed] == [f".model.partial-{dead.pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".model.partial-{os.getppid()}", f".model.partial-{os.getpid()}", ".model.partial-x", ".other.partial-1"])


SAVER = textwrap.dedent("""
    import sys
    import mlx.core as mx
    from edge_ds.cache import PromptCache

    for k in range(1_000_000):  # version k: every value k, 64 + k % 7 tokens all k; about 8 MB
        cache = PromptCache(4)
        for layer in cache.layers:
            layer.update_and_fetch(mx.full((1, 1, 64 + k % 7, 8192), float(k)))
        cache.tokens = [k] * (64 + k % 7)
        cache.save(sys.argv[1])
        print(k, flush=True)
""")


@pytest.mark.parametrize("seed", range(2))
def test_killed_prompt_cache_save_leaves_old_or_new_file(tmp_path, seed):
    from edge_ds.cache import PromptCache

    path = tmp_path / "cache.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "0"  # one complete save to overwrite
        time.sleep(random.Random(seed).uniform(0, 0.3))
    finally:
        proc.kill()
        out, _ = proc.communicate()
    last = int(out.split()[-1]) if out.split() else 0  # the last save it reported
    cache = PromptCache.load(path, 4)
    k = cache.tokens[0]
    assert k in (last, last + 1)  # killed between its rename and its print: the next one
    assert cache.tokens == [k] * (64 + k % 7)
    assert all(np.all(np.array(c.state) == k) for c in cache.layers)
    # A save's temporary file, if the kill left one, does not stop the next save.
    cache.save(path)
    assert PromptCache.load(path, 4).tokens == cache.tokens


WRITER = textwrap.dedent("""
    import sys
    import time
    import numpy as np
    from edge_ds.experts.trace import TraceRecorder

    rec = TraceRecorder(sys.argv[1], dict(model="m", layers=[0, 1], num_experts=64, top_k=2, expert_bytes=1))
    print("ready", flush=True)
    t = 0
    for r in range(10**9):
        n = 1500 if r % 100 == 0 else 1  # now and then a prefill: one line longer than the write buffer
        for layer in (0, 1):
            rec.record(layer, t, (np.arange(2 * n).reshape(n, 2) + t + layer) % 64, prefill=n > 1)
        t += n
        time.sleep(0.0002)  # a decode step's pace, more or less: keeps the trace small enough to check
""")


def written_steps(count: int) -> list[tuple]:
    """The first `count` (token, layer, experts, prefill) steps WRITER records, in load_trace's order."""
    out: list[tuple] = []
    t = r = 0
    while len(out) < count:
        n = 1500 if r % 100 == 0 else 1
        for layer in (0, 1):
            out += [(t + i, layer, tuple(sorted({(2 * i + t + layer) % 64, (2 * i + 1 + t + layer) % 64})), n > 1)
                    for i in range(n)]
        t, r = t + n, r + 1
    return out[:count]


@pytest.mark.parametrize("seed", range(2))
def test_killed_trace_writer_leaves_a_readable_trace(tmp_path, seed):
    from edge_ds.experts.trace import load_trace

    path = tmp_path / "routing.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(random.Random(seed).uniform(0.05, 0.3))
    finally:
        proc.kill()
        proc.communicate()
    steps = [(s.t, s.layer, s.experts, s.prefill) for s in load_trace(path).steps]
    assert steps, "nothing was recorded before the kill"
    assert steps == written_steps(len(steps))  # the writer's first records, each whole
