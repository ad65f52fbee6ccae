"""Malformed model files are refused with the file and what is wrong, exactly as strictly as the
safetensors library refuses them (each case is checked against safe_open too); indexes and links
never lead the reader out of a model folder; config.json must be an object."""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_lite.errors import MalformedFile, ModelNotFound
from mergekit_lite.io.reader import open_model, read_header


def st_file(path, header, data: bytes, length: int | None = None) -> str:
    """A safetensors file with this header (any JSON value) and data bytes."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def good_header():
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]}}


def with_entry(name, **change):
    h = good_header()
    h[name] = dict(h[name], **change)
    return h


# (case, header, data, what the message must say)
BAD = [
    ("array header", [1, 2], b"", "JSON list, not an object"),
    ("number entry", dict(good_header(), a=7), bytes(16), "tensor 'a': expected an object"),
    ("string offsets", with_entry("a", data_offsets=["0", "8"]), bytes(16), "tensor 'a': data_offsets"),
    ("negative offset", with_entry("a", data_offsets=[-8, 0]), bytes(16), "tensor 'a': data_offsets"),
    ("three offsets", with_entry("a", data_offsets=[0, 4, 8]), bytes(16), "tensor 'a': data_offsets"),
    ("float offsets", with_entry("a", data_offsets=[0.0, 8.0]), bytes(16), "tensor 'a': data_offsets"),
    ("string shape", with_entry("a", shape="2"), bytes(16), "tensor 'a': shape"),
    ("negative shape", with_entry("b", shape=[-2, -2]), bytes(16), "tensor 'b': shape"),
    ("bool shape", with_entry("a", shape=[True, True]), bytes(16), "tensor 'a': shape"),
    ("unknown dtype", with_entry("a", dtype="F33"), bytes(16), "tensor 'a' has dtype 'F33'"),
    ("numeric dtype", with_entry("a", dtype=4), bytes(16), "tensor 'a' has dtype 4"),
    ("span too short", with_entry("a", data_offsets=[0, 4]), bytes(16), "tensor 'a' spans bytes [0, 4)"),
    ("overlapping", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "overlaps"),
    ("same bytes twice", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "overlaps"),
    ("gap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), "gap of 8 bytes"),
    ("trailing bytes", good_header(), bytes(20), "cover 16 bytes of data but the file holds 20"),
    ("missing bytes", good_header(), bytes(12), "cover 16 bytes of data but the file holds 12"),
    ("metadata not strings", dict(good_header(), __metadata__={"x": 1}), bytes(16), "__metadata__"),
    ("reversed offsets", with_entry("a", data_offsets=[8, 0]), bytes(16), "tensor 'a' spans"),
]


@pytest.mark.parametrize("case,header,data,message", BAD, ids=[c[0] for c in BAD])
def test_malformed_headers_are_refused_like_safetensors(tmp_path, case, header, data, message):
    path = st_file(tmp_path / "m.safetensors", header, data)
    with pytest.raises(MalformedFile) as err:
        read_header(path)
    text = str(err.value)
    assert text.startswith(f"{path}: not a readable safetensors file") and message in text, text
    with pytest.raises(Exception):  # the safetensors library refuses the same file
        with safe_open(path, "pt") as h:
            for k in h.keys():
                h.get_tensor(k)


@pytest.mark.parametrize("raw,length,message", [
    (b"{}", 10**12, "not plausible"),
    (b'{"a": 1', None, "not JSON"),
    (b"\xff\xfe{}", None, "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', None, "names 'a' twice"),
    (b"\x80\x03}q\x00.", None, "not JSON"),  # a pickle where the header should be
])
def test_unreadable_headers_are_refused(tmp_path, raw, length, message):
    path = st_file(tmp_path / "m.safetensors", raw, b"\0\0\0\0", length)
    with pytest.raises(MalformedFile, match=message):
        read_header(path)


def test_valid_edge_cases_are_read_like_safetensors(tmp_path):
    """Empty and scalar tensors, zero-size spans, metadata and header padding are all fine."""
    path = str(tmp_path / "m.safetensors")
    tensors = {"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "also_empty": torch.zeros(0),
               "x": torch.arange(6, dtype=torch.float16).reshape(2, 3)}
    save_file(tensors, path, metadata={"format": "pt", "note": "ok"})
    metas, metadata = read_header(path)
    assert metadata == {"format": "pt", "note": "ok"}
    with safe_open(path, "pt") as h:
        assert {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()} == {k: m.shape for k, m in metas.items()}


def test_fifo_and_folder_named_like_weights_do_not_hang(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(MalformedFile, open_model, str(tmp_path))))
    t.start()
    t.join(10)
    assert done and "not a regular file" in str(done[0].value)
    os.unlink(tmp_path / "model.safetensors")
    os.mkdir(tmp_path / "model.safetensors")
    with pytest.raises(MalformedFile, match="not a regular file"):
        open_model(str(tmp_path))


# -- indexes ---------------------------------------------------------------------------------------

def sharded(folder, weight_map) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file({"a": torch.ones(2)}, os.path.join(folder, "s1.safetensors"))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return str(folder)


@pytest.mark.parametrize("weight_map,message", [
    (["s1.safetensors"], "weight_map must be a non-empty object"),
    ({}, "weight_map must be a non-empty object"),
    ({"a": 3}, "tensor 'a' maps to 3, not a shard file name"),
    ({"a": "../elsewhere/s1.safetensors"}, "not a file name inside the model folder"),
    ({"a": "/etc/passwd"}, "not a file name inside the model folder"),
    ({"a": "sub/../../s1.safetensors"}, "not a file name inside the model folder"),
])
def test_bad_indexes_are_refused(tmp_path, weight_map, message):
    folder = sharded(tmp_path / "m", weight_map)
    with pytest.raises(MalformedFile, match=message):
        open_model(folder)


def test_index_that_is_not_an_object(tmp_path):
    folder = tmp_path / "m"
    sharded(folder, {"a": "s1.safetensors"})
    (folder / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(MalformedFile, match="a JSON list, expected an object"):
        open_model(str(folder))


def test_links_out_of_the_folder_are_refused_links_inside_or_to_the_hf_cache_are_read(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"a": torch.full((2,), 7.0)}, str(outside / "w.safetensors"))
    folder = tmp_path / "m"
    sharded(folder, {"a": "link.safetensors"})
    os.symlink(outside / "w.safetensors", folder / "link.safetensors")
    with pytest.raises(MalformedFile, match="outside the model folder"):
        open_model(str(folder))
    # a link that stays inside the folder is fine
    os.unlink(folder / "link.safetensors")
    os.symlink("s1.safetensors", folder / "link.safetensors")
    assert open_model(str(folder)).tensors["a"].file.endswith("link.safetensors")
    # a link into the Hugging Face cache (how hub snapshots are laid out) is fine
    monkeypatch.setenv("HF_HOME", str(outside))
    os.unlink(folder / "link.safetensors")
    os.symlink(outside / "w.safetensors", folder / "link.safetensors")
    assert "a" in open_model(str(folder)).tensors
    # the same goes for a folder without an index, and for config.json
    monkeypatch.delenv("HF_HOME")
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(MalformedFile, match="outside the model folder"):
        open_model(str(folder))


@pytest.mark.parametrize("text,message", [("[1, 2]", "a JSON list, expected an object"), ("nope", "not a valid config"),
                                          ('"llama"', "a JSON str")])
def test_config_must_be_an_object(tmp_path, text, message):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(MalformedFile, match=message):
        open_model(str(tmp_path))


def test_malformed_file_is_a_model_not_found(tmp_path):
    """Code that catches ModelNotFound (the API, the input report) also catches malformed files."""
    assert issubclass(MalformedFile, ModelNotFound)


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json"])
def test_companion_files_linked_out_of_the_folder_are_not_copied(models, tmp_path, name):
    """A tokenizer or generation config that is a link to a file elsewhere (a secret, say) is never
    copied into the output: the run stops with the file named."""
    import shutil as sh

    import mergekit_lite

    donor = tmp_path / "donor"
    sh.copytree(models["paths"]["a"], donor)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (donor / name).unlink(missing_ok=True)
    os.symlink(secret, donor / name)
    plan = tmp_path / "plan.yml"
    plan.write_text(f"merge_method: linear\nparameters: {{weight: 1.0}}\nmodels:\n  - model: {donor}\n"
                    f"  - model: {models['paths']['b']}\n")
    with pytest.raises(MalformedFile, match=f"{name}: leads to .*secret.txt, outside the model folder"):
        mergekit_lite.run(str(plan), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
