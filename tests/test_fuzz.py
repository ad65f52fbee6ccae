"""Seeded fuzzing of plans and safetensors headers through the command line, bounded in time.

Every mutated input must end in exit 0 (with a complete output when merging) or exit 2 with a
readable message: never a traceback, never an "internal error", never a hang (each case runs under
a 20 s alarm), never a temporary left behind, never an input changed. Headers are also held to the
safetensors library: whatever our reader accepts, safe_open loads, with the same values.

The mutators are plain seeded functions (no extra dependency): the same seed gives the same cases
on every machine; set MERGEKIT_LITE_FUZZ_CASES to run more of them.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mergekit_lite import cli
from mergekit_lite.errors import MergeError
from mergekit_lite.io.reader import TensorReader, read_header

from conftest import REPO

CONFIGS = os.path.join(REPO, "merge_configs")
CASES = int(os.environ.get("MERGEKIT_LITE_FUZZ_CASES", "160"))

SCALARS = ["-1", "0", "1", "0.5", "-0.5", "1e400", "9" * 40, ".nan", ".inf", "-.inf", "[]", "{}", "null", "~", "true",
           "'x'", "*a", "&a x", "!!binary aGk=", "!!python/none", "[1, [2, [3]]]", "{a: 1}", "models/ft_math",
           "models/base", "/etc/passwd", "../../x", "org/name@../x", "org/name", "float16", "bfloat16", "int8",
           "linear", "ties", "slerp", "passthrough", "[0, 0.5, 1]", "[{filter: self_attn, value: 0.5}, {value: 1}]",
           "2024-01-01", "0x10", "1_000", '"\\0"', "[0, 2]", "[1, 0]", "{model: models/base, copies: 3}", "''",
           "{path: models/base, revision: main}", "models/ft_code+lora", "a" * 300]
LINES = ["merge_method: ties", "base_model: models/base", "dtype: float16", "parameters: {density: 0.5}",
         "slices:", "  - sources: [{model: models/base, layer_range: [0, 2]}]", "tokenizer_source: base",
         "---", "name: x", "save: saved", "seed: 3", "models: *a", "<<: {a: 1}", "- model: models/ft_chat",
         "depth_upscale: {model: models/base, copies: 2, drop: 1}", "\t", "%YAML 1.1", "? [a]", "steps: []"]
CHARS = ["\x00", "\x01", "\x7f", "\t", ":", "-", "[", "{", "}", "'", '"', "&", "*", "!", "|", ">", "#", "\u2028",
         "\ufeff", "\ud800", "é"]


def mutate_plan(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        if not lines:
            lines = [rng.choice(LINES)]
        i = rng.randrange(len(lines))
        op = rng.randrange(8)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3 and ":" in lines[i]:
            key, _, _ = lines[i].partition(":")
            lines[i] = f"{key}: {rng.choice(SCALARS)}"
        elif op == 4:
            lines.insert(i, " " * rng.choice([0, 2, 4, 6]) + rng.choice(LINES))
        elif op == 5:
            pos = rng.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:pos] + rng.choice(CHARS) + lines[i][pos:]
        elif op == 6:
            lines[i] = lines[i][2:] if lines[i].startswith("  ") and rng.random() < 0.5 else "  " + lines[i]
        else:
            lines = lines[:i]
    return "\n".join(lines) + "\n"


JSON_VALUES = [-1, 0, 1, 2**64, 1.5, -0.0, "8", "F32", "BF16", "I8", "", None, True, [], {}, [0], [0, 4], [4, 0],
               [0, 4, 8], [-4, 0], ["0", "4"], [[1]], {"a": 1}, [1, 2, 3], [2**63, 2**63 + 4]]


def mutate_header(header: dict, rng: random.Random) -> object:
    h = json.loads(json.dumps(header))
    names = [n for n in h if n != "__metadata__"]
    for _ in range(rng.randint(1, 2)):
        name = rng.choice(names)
        op = rng.randrange(7)
        if not isinstance(h.get(name), dict):
            return h
        if op == 0:
            h[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(JSON_VALUES)
        elif op == 1:
            h[name].pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        elif op == 2 and isinstance(h.get(other := rng.choice(names)), dict):
            h[name]["data_offsets"], h[other]["data_offsets"] = h[other].get("data_offsets"), h[name].get("data_offsets")
        elif op == 3 and _ints(h[name].get("data_offsets")):
            h[name]["data_offsets"] = [o + rng.choice([-4, -2, 2, 4]) for o in h[name]["data_offsets"]]
        elif op == 4:
            h[name]["dtype"] = rng.choice(["F16", "BF16", "F64", "I64", "U8", "F8_E4M3", "BOOL", "X"])
        elif op == 5 and isinstance(h[name].get("shape"), list):
            h[name]["shape"] = list(reversed(h[name]["shape"])) + ([1] if rng.random() < 0.3 else [])
        else:
            return rng.choice([[1, 2], "header", 3, None, {"__metadata__": rng.choice(JSON_VALUES)}])
    return h


def _ints(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(v, int) for v in x)


def write_mutated(path: str, original: bytes, rng: random.Random) -> None:
    (n,) = struct.unpack("<Q", original[:8])
    header, data = json.loads(original[8:8 + n]), original[8 + n:]
    kind = rng.randrange(10)
    if kind < 7:
        raw = json.dumps(mutate_header(header, rng)).encode()
        blob = struct.pack("<Q", len(raw)) + raw + data
    elif kind == 7:  # byte flips in the header
        blob = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(8, 8 + n)] = rng.randrange(256)
        blob = bytes(blob)
    elif kind == 8:  # a wrong length prefix
        blob = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**63, len(original)])) + original[8:]
    else:  # truncated or extended
        blob = original[:rng.randrange(len(original))] if rng.random() < 0.5 else original + bytes(rng.randint(1, 9))
    with open(path, "wb") as fh:
        fh.write(blob)


class _Hang(BaseException):
    pass


def call(argv: list[str]) -> tuple[int, str]:
    """cli.main in this process, under a 20 s alarm; returns (status, stderr)."""
    def alarm(signum, frame):
        raise _Hang(" ".join(argv))

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 20)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = cli.main(argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return status, err.getvalue()


def check(status: int, err: str, case: str) -> None:
    assert status in (0, 2), (case, status, err)
    assert "Traceback" not in err and "internal error" not in err, (case, err)
    if status == 2:
        assert err.startswith("mergekit-lite: error: "), (case, err)


def tree_digest(folder: str) -> str:
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        h.update(path.encode())
        if os.path.isfile(path):
            h.update(open(path, "rb").read())
    return h.hexdigest()


@pytest.fixture
def work(tmp_path, monkeypatch):
    shutil.copytree(os.path.join(CONFIGS, "models"), tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fuzzed_plans(work):
    rng = random.Random(1301)
    seeds = [open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(CONFIGS, "*.yml")))]
    before = tree_digest("models")
    outcomes = {0: 0, 2: 0}
    for i in range(CASES):
        text = mutate_plan(rng.choice(seeds), rng)
        with open("plan.yml", "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(text)
        argv = ["run", "plan.yml", f"out{i}", "-q"] if i % 5 == 0 else ["plan", "plan.yml"]
        status, err = call(argv)
        check(status, err, text)
        outcomes[status] += 1
        if status == 0 and argv[0] == "run":
            assert "model.safetensors" in " ".join(os.listdir(f"out{i}")), text
    assert tree_digest("models") == before
    assert not [f for f in os.listdir(work) if f.startswith(".")]
    assert outcomes[0] > CASES // 20 and outcomes[2] > CASES // 2, outcomes  # the mutator reaches both outcomes


def test_fuzzed_safetensors_headers(work):
    rng = random.Random(1302)
    victim = sorted(glob.glob("models/ft_code/*.safetensors"))[1]
    original = open(victim, "rb").read()
    with open("plan.yml", "w") as fh:
        fh.write("merge_method: linear\nmodels:\n  - model: models/ft_math\n  - model: models/ft_code\n")
    reader = TensorReader()
    accepted = 0
    for i in range(CASES):
        write_mutated(victim, original, rng)
        argv = ["run", "plan.yml", f"out{i}", "-q"] if i % 6 == 0 else ["plan", "plan.yml"]
        status, err = call(argv)
        check(status, err, f"case {i}")
        try:
            ours = read_header(victim)[0]
        except MergeError:
            continue
        accepted += 1
        with safe_open(victim, "pt") as theirs:  # what we accept, safetensors loads identically
            assert set(theirs.keys()) == set(ours), i
            for name, meta in ours.items():
                assert torch.equal(reader.read(meta.file, meta.offset, meta.shape, meta.dtype), theirs.get_tensor(name))
    reader.close()
    assert 0 < accepted < CASES  # some mutations keep the file valid (e.g. another valid dtype for a span)
    assert not [f for f in os.listdir(work) if f.startswith(".")]


def test_a_few_fuzzed_cases_in_a_fresh_process(work):
    """The same guarantees with the real entry point (signal handlers, warnings, exit status)."""
    rng = random.Random(1303)
    seeds = [open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(CONFIGS, "*.yml")))]
    victim = sorted(glob.glob("models/ft_chat/*.safetensors"))[0]
    original = open(victim, "rb").read()
    for i in range(3):
        with open("plan.yml", "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(mutate_plan(rng.choice(seeds), rng) if i < 2 else
                     "merge_method: linear\nmodels:\n  - model: models/ft_math\n  - model: models/ft_chat\n")
        if i >= 2:
            write_mutated(victim, original, rng)
        r = subprocess.run([sys.executable, "-m", "mergekit_lite", "run", "plan.yml", f"out{i}", "-q"],
                           capture_output=True, text=True, timeout=300)
        check(r.returncode, r.stderr, open("plan.yml", errors="replace").read())
    assert not [f for f in os.listdir(work) if f.startswith(".")]
