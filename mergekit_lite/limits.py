"""What a merge cannot beat on this machine, measured by ``mergekit-lite bench`` in the same run as
the merges it is compared with: starting the interpreter and importing torch, reading the inputs
from a warm page cache, and writing an output-sized file through to disk (``fdatasync``). Their
sum is the time of a merge that cost nothing else; a merge that overlaps reading, computing and
writing can come close to it, and ``bench`` reports how close.

Also here: running one timed command in a fresh process (wall time, peak RSS, and the peak device
memory a mergekit-lite run reports on its last stderr line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

CHUNK = 64 << 20

_WRAP = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    t = time.perf_counter()
    r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    print(json.dumps({"rc": r.returncode, "seconds": dt,
                      "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                      "stderr": r.stderr.decode(errors="replace")[-3000:]}))
""")

# Runs mergekit-lite's CLI, then reports the peak device memory on its last stderr line.
OURS = ("import json, sys\nfrom mergekit_lite.cli import main\nrc = main(sys.argv[1:])\n"
        "import torch\npeak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0\n"
        "print(json.dumps({'device_peak': peak}), file=sys.stderr)\nsys.exit(rc)\n")


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """One run of `cmd` in a fresh process: seconds, peak RSS (bytes), device peak (if reported)."""
    out = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True,
                         env={**os.environ, **env} if env else None)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result['stderr']}")
    last = result["stderr"].strip().splitlines()[-1:] or [""]
    result["device_peak"] = json.loads(last[0]).get("device_peak", 0) if last[0].startswith("{") else 0
    return result


def startup_seconds(python: str, repeat: int = 2) -> float:
    """Starting `python` and importing torch (what any torch-based merge pays before working)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([python, "-c", "import torch"], check=True)
        best = min(best, time.perf_counter() - t)
    return best


def warm_read_seconds(files: list[str]) -> float:
    """Reading every byte of `files` once the page cache holds them (the second of two passes)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    elapsed = 0.0
    for _ in range(2):
        t = time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
        elapsed = time.perf_counter() - t
    return elapsed


def write_sync_seconds(folder: str, nbytes: int) -> float:
    """Writing `nbytes` to a new file in `folder` and ``fdatasync``-ing it (what a merge writing its
    output durably must wait for)."""
    path = os.path.join(folder, ".bench-write-limit")
    block = os.urandom(1 << 20) * (CHUNK >> 20)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, memoryview(block)[:min(left, CHUNK)])
        os.fdatasync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t
    os.unlink(path)
    return elapsed


def model_files(folders: list[str]) -> list[str]:
    """The weight files of model folders."""
    return sorted(os.path.join(f, n) for f in folders for n in os.listdir(f) if n.endswith(".safetensors"))


def machine_limits(python: str, inputs: list[str], folder: str, nbytes: int) -> dict[str, float]:
    """Each limit and their sum, in seconds: start-up, warm read of `inputs`, write + fdatasync."""
    files = model_files(inputs)
    limits = {"startup": startup_seconds(python), "read": warm_read_seconds(files),
              "write": write_sync_seconds(folder, nbytes)}
    limits["total"] = sum(limits.values())
    limits["read_bytes"] = sum(os.path.getsize(f) for f in files)
    limits["write_bytes"] = nbytes
    return limits
