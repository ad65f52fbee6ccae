"""Signals and crashes, with real processes: SIGINT/SIGTERM at seeded random moments (start-up,
merging, writing) exit 130/143 with one line and no temporaries; a run SIGKILLed at random points
and continued with ``--resume`` (command line or Python) is bit-identical to an uninterrupted run;
a changed plan or input makes the journal stale, with a message."""

from __future__ import annotations

import glob
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import mergekit_lite
from mergekit_lite.errors import MergeWarning
from mergekit_lite.io.folders import JOURNAL

from conftest import REPO, write_plan

EXAMPLES = os.path.join(REPO, "merge_configs", "models")
# karcher with a tolerance it never reaches does max_iter steps per tensor: a run long enough to be
# interrupted anywhere, on tiny models. Several shards, a bfloat16 output (rounded by the writer).
SLOW = """\
merge_method: karcher
models:
  - model: models/ft_math
  - model: models/ft_code
  - model: models/ft_chat
parameters: {max_iter: ITER, tol: 1.0e-30}
dtype: bfloat16
"""
SHARDS = ["--max-shard-size", "300KB"]


@pytest.fixture
def work(tmp_path, monkeypatch):
    shutil.copytree(EXAMPLES, tmp_path / "models")
    write_plan(tmp_path, SLOW.replace("ITER", "120"), "slow.yml")
    write_plan(tmp_path, SLOW.replace("ITER", "121"), "other.yml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def reference(work):
    """The uninterrupted result (run in this process; a folder named like the others, as the model
    card names it)."""
    mergekit_lite.run("slow.yml", "ref/out", max_shard_size="300KB")
    return digest("ref/out")


def digest(folder) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as fh:
            out[name] = hashlib.sha256(fh.read()).hexdigest()
    return out


def same_threads() -> dict:
    """The environment for a child process that computes with this process's thread count (the
    resume key includes it: another count may round reductions differently)."""
    import torch

    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergekit_lite", "run", *args, "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=same_threads())


def journal_lines(out: str) -> int:
    found = glob.glob(f".{out}.tmp-*/{JOURNAL}")
    if not found:
        return -1
    with open(found[0], "rb") as fh:
        return fh.read().count(b"\n") - 1  # the first line is the key


def wait_for_journal(proc: subprocess.Popen, out: str, n: int) -> None:
    deadline = time.time() + 300
    while proc.poll() is None and journal_lines(out) < n and time.time() < deadline:
        time.sleep(0.002)


def leftovers(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.startswith("."))


def test_sigint_and_sigterm_at_random_moments(work):
    rng = random.Random(13)
    for i in range(4):
        sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
        proc = start("slow.yml", "out", *SHARDS)
        if i == 3:
            wait_for_journal(proc, "out", 3)  # while the writer thread is busy
        else:
            time.sleep(rng.uniform(0.3, 4.0))  # start-up (importing torch, compiling) or merging
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        assert "Traceback" not in err, err
        if proc.returncode == 0:  # finished first: the output is complete
            assert len(digest("out")) > 3
            shutil.rmtree("out")
        else:
            assert proc.returncode == 128 + sig, (proc.returncode, err)
            assert f"stopped by {sig.name}" in err and not os.path.exists("out")
        assert leftovers(work) == [], err


def test_killed_runs_resumed_are_bit_identical(work, reference):
    rng = random.Random(7)
    for point in ("journal", "journal", "time"):
        proc = start("slow.yml", "out", *SHARDS)
        if point == "journal":
            wait_for_journal(proc, "out", rng.randint(1, 30))
        else:
            time.sleep(rng.uniform(2.0, 5.0))
        proc.kill()
        proc.wait()
        written = journal_lines("out")
        if point == "journal":
            lock, tmp = leftovers(work)  # what a SIGKILL leaves: the lock file and the temporary folder
            assert written >= 1 and lock == ".out.lock" and tmp == f".out.tmp-{proc.pid}"
            with pytest.warns(MergeWarning, match=f"resuming: {written} of 39 tensors were already written"):
                stats = mergekit_lite.run("slow.yml", "out", resume=True, max_shard_size="300KB")
            assert stats.tensors == 39 - written
        else:
            r = subprocess.run([sys.executable, "-m", "mergekit_lite", "run", "slow.yml", "out", "-q", "--resume",
                                *SHARDS], capture_output=True, text=True, timeout=300, env=same_threads())
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert digest("out") == reference
        assert leftovers(work) == []
        shutil.rmtree("out")


def test_a_changed_plan_or_input_is_not_resumed(work):
    proc = start("slow.yml", "out", *SHARDS)
    wait_for_journal(proc, "out", 5)
    proc.kill()
    proc.wait()
    partial = glob.glob(".out.tmp-*")[0]
    shutil.copytree(partial, "partial-copy")
    for change in ("plan", "input"):
        plan = "other.yml" if change == "plan" else "slow.yml"
        if change == "input":
            shutil.copytree("partial-copy", partial)  # the same interrupted run, again
            weights = glob.glob("models/ft_chat/*.safetensors")[0]
            st = os.stat(weights)
            os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.warns(MergeWarning, match="not resuming .*: the plan, the options, an input or mergekit-lite "
                                              "itself changed since it was written; starting over"):
            stats = mergekit_lite.run(plan, "out", resume=True, max_shard_size="300KB")
        assert stats.tensors == 39 and leftovers(work) == []
        mergekit_lite.run(plan, "fresh/out", max_shard_size="300KB")
        assert digest("out") == digest("fresh/out")
        shutil.rmtree("out")
        shutil.rmtree("fresh")


def test_resume_with_nothing_to_resume_and_when_already_complete(work):
    with pytest.warns(MergeWarning, match="nothing to resume"):
        mergekit_lite.run("slow.yml", "out", resume=True)
    before = digest("out")
    with pytest.warns(MergeWarning, match="already holds the result of this run; nothing to do"):
        stats = mergekit_lite.run("slow.yml", "out", resume=True)
    assert stats.tensors == 0 and digest("out") == before
    # a different run into the same folder still needs --overwrite
    with pytest.raises(mergekit_lite.OutputExists):
        mergekit_lite.run("other.yml", "out", resume=True)


KILL_AT_RECORD = """\
import os, signal, sys
from mergekit_lite.io import journal
record, count = journal.Journal.record, [0]
def killing(self, *args, **kwargs):
    record(self, *args, **kwargs)
    count[0] += 1
    if count[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
journal.Journal.record = killing
from mergekit_lite.cli import main
sys.exit(main(["run", "ties.yml", "out", "-q", "--block-size", "12000", *{shards!r}]))
"""

BLOCKED_TIES = """\
merge_method: ties
base_model: models/base
models:
  - model: models/ft_math
    parameters: {weight: 0.6, density: 0.4}
  - model: models/ft_code
    parameters: {weight: 0.5, density: 0.7}
parameters: {trim_scope: model}
dtype: bfloat16
"""


@pytest.mark.parametrize("killed_after", [1, 17])
def test_row_blocked_runs_resume_bit_identical(work, killed_after):
    """Tensors streamed in row blocks are journaled when their last block is on disk, and the
    statistic's sweeps (here whole-model TIES: every tensor's sweeps feed every merge) run again
    for what is left: a run killed after `killed_after` tensors resumes to the uninterrupted bits."""
    write_plan(work, BLOCKED_TIES, "ties.yml")
    mergekit_lite.run("ties.yml", "ref/out", max_shard_size="300KB", block_size=12000)
    proc = subprocess.run([sys.executable, "-c", KILL_AT_RECORD.format(n=killed_after, shards=SHARDS)],
                          capture_output=True, text=True, timeout=300, env=same_threads())
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert journal_lines("out") == killed_after
    with pytest.warns(MergeWarning, match=f"resuming: {killed_after} of 39 tensors were already written"):
        stats = mergekit_lite.run("ties.yml", "out", resume=True, max_shard_size="300KB", block_size=12000)
    assert stats.tensors == 39 - killed_after
    assert digest("out") == digest("ref/out") and leftovers(work) == []
