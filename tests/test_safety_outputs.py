"""Outputs never destroy anything: every way of pointing OUT or a step's ``save:`` at an input is
refused before anything is written (and the inputs stay bit for bit the same); ``--overwrite`` only
replaces folders mergekit-lite wrote; runs into one OUT exclude each other; temporaries of dead
runs are cleaned up; full, read-only and size-limited file systems are messages, not tracebacks."""

from __future__ import annotations

import glob
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

import mergekit_lite
from mergekit_lite import cli
from mergekit_lite.errors import UnsafeOutput
from mergekit_lite.io.folders import JOURNAL, MARKER, OutputLock, read_marker

from conftest import REPO, load_dir, write_plan

EXAMPLES = os.path.join(REPO, "merge_configs", "models")
PLAN = """\
merge_method: linear
models:
  - {model: models/ft_math, parameters: {weight: 0.5}}
  - {model: models/ft_code, parameters: {weight: 0.5}}
"""


def tree(folder) -> dict[str, str]:
    """Every file under `folder` (names, modes, bytes): what must not change."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = f"{os.stat(p).st_mode:o}:{hashlib.sha256(fh.read()).hexdigest()}"
    return out


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder holding a plan and the example models it merges, as the current folder."""
    shutil.copytree(EXAMPLES, tmp_path / "models")
    write_plan(tmp_path, PLAN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path


def run(*args) -> int:
    return cli.main(["run", *args, "-q"])


@pytest.mark.parametrize("out,why", [
    ("models/ft_math", "is the input"),          # OUT == input
    ("models", "contains the input"),            # OUT holds inputs
    (".", "contains the input"),                 # the working folder, which holds them
    ("models/ft_math/merged", "lies inside the input"),
    ("plan.yml", "is the plan"),
    ("hf-home/hub/x", "lies inside the Hugging Face cache"),
    ("hf-home", "is the Hugging Face cache"),
])
@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--force-overwrite"], ["--resume", "--overwrite"]])
def test_out_pointing_at_inputs_is_refused_and_nothing_changes(work, capsys, out, why, flags):
    os.makedirs("hf-home/hub", exist_ok=True)
    before = tree(work)
    assert run("plan.yml", out, *flags) == 2
    err = capsys.readouterr().err
    assert why in err and "refusing" in err and "Traceback" not in err, err
    assert tree(work) == before


def test_plan_folder_holding_inputs_and_links_to_inputs(work, capsys, tmp_path):
    sub = work / "project"
    shutil.copytree(work / "models", sub / "models")
    write_plan(sub, PLAN)
    before = tree(work)
    assert run(str(sub / "plan.yml"), str(sub), "--force-overwrite") == 2  # OUT == the plan's folder
    os.symlink(work / "models" / "ft_code", work / "link")
    assert run("plan.yml", "link", "--force-overwrite") == 2  # OUT a link to an input
    os.unlink(work / "link")
    assert tree(work) == before
    assert capsys.readouterr().err.count("refusing") == 2


@pytest.mark.parametrize("save,why", [("models/base", "is the input"), ("models", "contains the input"),
                                      ("models/base/soup", "lies inside the input"), ("out", "overlap"),
                                      ("out/soup", "overlap")])
def test_save_pointing_at_inputs_or_the_output_is_refused(work, capsys, save, why):
    write_plan(work, f"""\
        name: soup
        merge_method: linear
        models:
          - {{model: models/ft_math, parameters: {{weight: 0.5}}}}
          - {{model: models/ft_code, parameters: {{weight: 0.5}}}}
        save: {save}
        ---
        merge_method: task_arithmetic
        base_model: models/base
        models:
          - {{model: soup, parameters: {{weight: 1.0}}}}
        """, "steps.yml")
    before = tree(work)
    assert run("steps.yml", "out", "--force-overwrite") == 2
    assert why in capsys.readouterr().err
    assert tree(work) == before


def test_overwrite_replaces_only_folders_mergekit_lite_wrote(work, capsys):
    assert run("plan.yml", "out") == 0
    marker = read_marker("out")  # the folder's user.mergekit-lite attribute (or mergekit-lite.json)
    assert marker["written_by"] == "mergekit-lite" and "model.safetensors" in marker["files"]
    assert sorted(marker["files"]) == sorted(set(os.listdir("out")) - {MARKER}) and marker["shards"] == 0
    first = tree("out")
    assert run("plan.yml", "out") == 2  # exists: refused without --overwrite
    assert run("plan.yml", "out", "--overwrite") == 0 and tree("out") == first
    # a file we did not write blocks --overwrite, and is kept
    with open("out/notes.txt", "w") as fh:
        fh.write("mine")
    assert run("plan.yml", "out", "--overwrite") == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err and os.path.exists("out/notes.txt")
    # a folder not ours at all, and a file
    os.makedirs("theirs")
    with open("theirs/data.bin", "w") as fh:
        fh.write("precious")
    with open("a_file", "w") as fh:
        fh.write("precious")
    for target in ("theirs", "a_file"):
        assert run("plan.yml", target, "--overwrite") == 2
        assert "--force-overwrite" in capsys.readouterr().err
    assert open("theirs/data.bin").read() == "precious" and open("a_file").read() == "precious"
    # --force-overwrite replaces them, and leaves nothing behind
    assert run("plan.yml", "a_file", "--force-overwrite") == 0 and os.path.isdir("a_file")
    os.makedirs("empty")
    assert run("plan.yml", "empty", "--overwrite") == 0  # an empty folder holds nothing to lose
    assert not [f for f in os.listdir(work) if f.startswith(".")]


def test_python_api_has_the_same_rules(work):
    os.makedirs("theirs")
    open("theirs/x", "w").write("keep")
    with pytest.raises(UnsafeOutput, match="not written by mergekit-lite"):
        mergekit_lite.run("plan.yml", "theirs", overwrite=True)
    with pytest.raises(UnsafeOutput, match="is the input"):
        mergekit_lite.run("plan.yml", "models/ft_math", force_overwrite=True)
    base = mergekit_lite.Model("models/base")
    expr = base + 0.5 * (mergekit_lite.Model("models/ft_math") - base)
    with pytest.raises(UnsafeOutput, match="contains the input"):
        expr.save("models", force_overwrite=True)
    expr.save("theirs", force_overwrite=True)
    assert "x" not in os.listdir("theirs") and read_marker("theirs")["run_key"]


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(work, capsys):
    lock = OutputLock(str(work / "out"))
    lock.acquire()  # as a running merge holds it
    try:
        assert run("plan.yml", "out") == 2
        assert f"another mergekit-lite run (pid {os.getpid()}) is writing" in capsys.readouterr().err
    finally:
        lock.release()
    assert not os.path.exists(work / ".out.lock") and run("plan.yml", "out") == 0


def test_concurrent_processes_into_one_out(work):
    """Two real processes: while one writes OUT (held still with SIGSTOP once it has written a
    tensor), the other is refused at once; OUT is the first's, complete."""
    slow = write_plan(work, "merge_method: karcher\nmodels: [{model: models/ft_math}, {model: models/ft_code}]\n"
                            "parameters: {max_iter: 50, tol: 1.0e-30}\n", "slow.yml")
    first = subprocess.Popen([sys.executable, "-m", "mergekit_lite", "run", slow, "out", "-q"], stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 300
    while not glob.glob(f".out.tmp-*/{JOURNAL}") and first.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run([sys.executable, "-m", "mergekit_lite", "run", slow, "out", "-q", "--overwrite"],
                                capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2 and f"another mergekit-lite run (pid {first.pid}) is writing" in second.stderr
    assert len(load_dir("out")) == 39 and not [f for f in os.listdir(work) if f.startswith(".")]


def test_temporaries_of_dead_runs_are_removed_by_the_next_run(work):
    os.makedirs(".out.tmp-999999999")
    open(os.path.join(".out.tmp-999999999", JOURNAL), "w").write("{}\n")
    open(os.path.join(".out.tmp-999999999", "model.safetensors"), "wb").write(b"x" * 1000)
    os.makedirs(".out.tmp-999999998.old")  # the replaced OUT of a replacement cut short by SIGKILL
    open(".out.tmp-999999998.old/whatever", "w").write("replaced with --force-overwrite")
    os.makedirs(".out.tmp-999999997")  # killed before its journal existed: empty
    os.makedirs(".out.tmp-12")  # not ours (no journal, not empty): left alone
    open(".out.tmp-12/user-file", "w").write("keep")
    open(".out.lock", "w").write("999999999")  # a dead run's lock file
    assert run("plan.yml", "out") == 0
    assert sorted(f for f in os.listdir(work) if f.startswith(".")) == [".out.tmp-12"]


def test_out_with_a_missing_parent_and_an_unwritable_one(work, capsys):
    assert run("plan.yml", "a/b/c/out") == 0 and "model.safetensors" in os.listdir("a/b/c/out")
    open("blocker", "w").write("a file where a folder should be")
    assert run("plan.yml", "blocker/out") == 2
    assert "cannot write" in capsys.readouterr().err


# -- real faults: a small or read-only file system, a file-size limit ------------------------------

def namespaced(script: str, cwd) -> subprocess.CompletedProcess:
    """Run `script` in a private mount namespace (tmpfs mounts vanish with it); skip if impossible."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -rm (user and mount namespaces) to mount a small tmpfs")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_full_and_read_only_file_systems_are_exit_2_naming_folder_and_bytes(work):
    py = f"{sys.executable} -m mergekit_lite run plan.yml"
    r = namespaced(f"mkdir -p small && mount -t tmpfs -o size=400k tmpfs small && {py} small/out -q; echo rc=$?;"
                   f" ls -A small; mount -o remount,ro small && {py} small/out2 -q; echo rc=$?; ls -A small", work)
    assert r.stdout.split() == ["rc=2", "rc=2"], r.stdout + r.stderr
    full, ro = r.stderr.strip().splitlines()
    assert "not enough free space for" in full and "small/out" in full and "is available" in full
    assert "bytes) there" in full  # bytes needed and available
    assert "small/out2" in ro and "Read-only file system" in ro and "Traceback" not in r.stderr


def test_two_runs_filling_a_small_disk(work):
    """Each run's precheck passes alone; together they do not fit. The shards' space is reserved
    before merging, so whichever run comes second fails at once, says why and leaves nothing."""
    py = f"{sys.executable} -m mergekit_lite run plan.yml"
    r = namespaced(f"mkdir -p small && mount -t tmpfs -o size=1100k tmpfs small && ({py} small/a -q & {py} small/b -q;"
                   " echo rc=$?; wait $!; echo rc=$?); ls -A small", work)
    lines = r.stdout.split()
    statuses, left = sorted(lines[:2]), lines[2:]
    assert statuses in (["rc=0", "rc=2"], ["rc=2", "rc=2"]), r.stdout + r.stderr
    assert r.stderr.count("space") == statuses.count("rc=2") and "Traceback" not in r.stderr, r.stderr
    assert len(left) == statuses.count("rc=0") and set(left) <= {"a", "b"}  # complete outputs, no temporaries


def test_a_file_size_limit_mid_write_is_exit_2_without_temporaries(work):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    for budget in ("--max-memory=400KB", "--max-memory=64MB"):  # the writer fails while the reader waits on it
        r = subprocess.run([sys.executable, "-m", "mergekit_lite", "run", "plan.yml", "out", "-q", budget],
                           preexec_fn=limit, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "cannot write" in r.stderr and "File too large" in r.stderr, r.stderr
        assert "the merge writes" in r.stderr and not [f for f in os.listdir(work) if "out" in f]
