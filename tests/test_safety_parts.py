"""The safety parts on their own: signal deferral, the journal's reading rules, the writer's value
check chunk by chunk, the lock file, and the command line's exit statuses."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from mergekit_lite import cli_safety
from mergekit_lite.errors import Interrupted, MergeError, PlanError
from mergekit_lite.interrupts import critical, handling_signals
from mergekit_lite.io import journal as journal_mod
from mergekit_lite.io.folders import JOURNAL, OutputLock
from mergekit_lite.io.journal import Journal, read_journal
from mergekit_lite.io.writer import PlannedTensor, ShardedWriter, ShardLayout


def test_critical_holds_a_signal_until_the_step_is_done_without_our_handlers():
    done = []
    with pytest.raises(KeyboardInterrupt):  # Python's own SIGINT behaviour, delivered late
        with critical():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("rename")  # not cut short
    assert done == ["rename"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_handled_signals_raise_once_and_are_held_in_critical_steps():
    with handling_signals():
        with pytest.raises(Interrupted) as err:
            with critical():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping is ignored
        assert err.value.signum == signal.SIGTERM and err.value.status == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_journal_ignores_a_torn_last_line_and_a_reboot_or_key_change(tmp_path, monkeypatch):
    j = Journal(str(tmp_path), "k1")
    j.record("a")
    j.record("b\nwith newline")
    j.close()
    with open(tmp_path / JOURNAL, "ab") as fh:
        fh.write(b'"half-writ')  # killed in the middle of a line
    assert read_journal(str(tmp_path), "k1") == ({"a": None, "b\nwith newline": None}, "")
    assert read_journal(str(tmp_path), "k2")[0] is None
    j = Journal(str(tmp_path), "k1", fresh=False)
    j.record("factor", (4, 3))  # a bounded tensor written smaller than planned
    assert read_journal(str(tmp_path), "k1")[0]["factor"] == (4, 3)
    j.finishing()  # shards being compacted: not resumable any more
    j.close()
    done, why = read_journal(str(tmp_path), "k1")
    assert done is None and "finished" in why
    monkeypatch.setattr(journal_mod, "boot_id", lambda: "another-boot")
    done, why = read_journal(str(tmp_path), "k1")
    assert done is None and "restarted" in why


def test_writer_checks_every_rounded_chunk(tmp_path, monkeypatch):
    import mergekit_lite.io.writer as w

    monkeypatch.setattr(w, "_CHUNK", 7)
    x = torch.linspace(-1, 1, 30)
    x[29] = 1e6  # in the last, ragged chunk
    layout = ShardLayout([PlannedTensor("x", (30,), torch.float16)], 10**9)
    writer = ShardedWriter(str(tmp_path), layout)
    with pytest.raises(MergeError, match="tensor x: values up to 1e\\+06 overflow float16"):
        writer.write("x", x)
    writer.close()
    writer = ShardedWriter(str(tmp_path), layout, clamp=True)
    writer.write("x", x)
    writer.finish()
    expected = x.clone()
    expected[29] = 65504
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["x"], expected.to(torch.float16))


def test_lock_is_exclusive_and_leaves_no_file(tmp_path):
    a, b = OutputLock(str(tmp_path / "out")), OutputLock(str(tmp_path / "out"))
    a.acquire()
    with pytest.raises(MergeError, match=f"pid {os.getpid()}"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc,status,text", [
    (PlanError([]), 2, "error: the merge plan has"),
    (Interrupted(signal.SIGINT), 130, "stopped by SIGINT"),
    (KeyboardInterrupt(), 130, "stopped by SIGINT"),
    (MemoryError(), 2, "error: out of memory"),
    (RecursionError(), 2, "nested too deeply"),
    (ZeroDivisionError("boom"), 2, "internal error: ZeroDivisionError: boom (test_safety_parts.py:"),
])
def test_every_ending_is_a_status_and_one_message(capsys, exc, status, text):
    def command():
        raise exc

    assert cli_safety.run(command, entry=False) == status
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("MERGEKIT_LITE_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        cli_safety.run(lambda: 1 // 0, entry=False)


def test_marker_names_every_file_and_stays_out_of_the_listing(tmp_path):
    from mergekit_lite.io.folders import MARKER, MARKER_XATTR, marked_files, read_marker, write_marker

    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", JOURNAL):
        (tmp_path / name).write_bytes(b"x")
    write_marker(str(tmp_path), {"version": "0", "run_key": "k"})
    data = read_marker(str(tmp_path))
    assert data == {"written_by": "mergekit-lite", "version": "0", "run_key": "k", "files": ["config.json"],
                    "shards": 2}
    assert marked_files(data) == {"config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    if hasattr(os, "getxattr") and MARKER not in os.listdir(tmp_path):  # the attribute, not a file
        assert json.loads(os.getxattr(str(tmp_path), MARKER_XATTR)) == data
        os.setxattr(str(tmp_path), MARKER_XATTR, b'{"written_by": "someone else", "files": []}')
    else:
        (tmp_path / MARKER).write_text('{"written_by": "someone else", "files": []}')
    assert read_marker(str(tmp_path)) is None
