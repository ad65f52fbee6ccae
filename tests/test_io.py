"""Reading and writing safetensors, checked against the safetensors library itself."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_lite.errors import ModelNotFound
from mergekit_lite.io.reader import TensorReader, open_model, read_header
from mergekit_lite.io.sizes import parse_size
from mergekit_lite.io.writer import OutputFolder, PlannedTensor, ShardedWriter, ShardLayout

from conftest import REPO


def mixed_tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(2, 2, 2, generator=g).to(torch.float16),
        "d.i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
        "g.scalar": torch.tensor(3.5),
    }


def test_reader_matches_safe_open(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file(mixed_tensors(), path, metadata={"format": "pt"})
    metas, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    reader = TensorReader()
    with safe_open(path, "pt") as ref:
        assert set(ref.keys()) == set(metas)
        for name, meta in metas.items():
            got = reader.read(meta.file, meta.offset, meta.shape, meta.dtype)
            expected = ref.get_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected), name
    reader.close()


def test_reader_on_example_model_matches_safe_open():
    folder = os.path.join(REPO, "merge_configs", "models", "ft_code")
    model = open_model(folder)
    assert len(model.files) == 3 and model.config["model_type"] == "llama"
    reader = TensorReader()
    for name, meta in model.tensors.items():
        with safe_open(meta.file, "pt") as ref:
            assert torch.equal(reader.read(meta.file, meta.offset, meta.shape, meta.dtype), ref.get_tensor(name))


def test_truncated_and_corrupt_files_are_clear_errors(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"x": torch.ones(1000)}, path)
    meta = read_header(path)[0]["x"]
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ModelNotFound, match="truncated"):
        TensorReader().read(meta.file, meta.offset, meta.shape, meta.dtype)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ModelNotFound, match="not a readable safetensors file"):
        read_header(str(bad))


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelNotFound, match="pickle weights.*does not load"):
        open_model(str(tmp_path))


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1000", 1000), (1234, 1234), ("1.5gb", 15 * 10**8), ("100KB", 10**5)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_layout_splits_like_hugging_face():
    ts = [PlannedTensor(f"t{i}", (100,), torch.float32) for i in range(5)]  # 400 bytes each
    layout = ShardLayout(ts, max_shard_size=1000)
    assert [[t.name for t in s.tensors] for s in layout.shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert [s.file for s in layout.shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    big = ShardLayout([PlannedTensor("huge", (1000,), torch.float32)], max_shard_size=10)
    assert [s.file for s in big.shards] == ["model.safetensors"]


def test_writer_output_loads_with_safetensors_in_any_write_order(tmp_path):
    tensors = mixed_tensors()
    planned = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    layout = ShardLayout(planned, max_shard_size=40)
    writer = ShardedWriter(str(tmp_path), layout)
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    index = writer.finish()
    assert set(index["weight_map"]) == set(tensors)
    on_disk = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert on_disk == index
    for shard in {s for s in index["weight_map"].values()}:
        loaded = load_file(str(tmp_path / shard))
        for name, value in loaded.items():
            assert index["weight_map"][name] == shard
            assert torch.equal(value, tensors[name]) and value.dtype == tensors[name].dtype
        with safe_open(str(tmp_path / shard), "pt") as h:
            assert h.metadata() == {"format": "pt"}


def test_writer_rounds_float32_results_chunk_by_chunk(tmp_path, monkeypatch):
    import mergekit_lite.io.writer as w

    monkeypatch.setattr(w, "_CHUNK", 7)  # force many chunks, with a ragged last one
    x = torch.randn(10, 11, generator=torch.Generator().manual_seed(3))
    writer = ShardedWriter(str(tmp_path), ShardLayout([PlannedTensor("x", (10, 11), torch.bfloat16)], 10**9))
    writer.write("x", x)
    writer.finish()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["x"], x.to(torch.bfloat16))


def test_writer_checks_completeness_and_shapes(tmp_path):
    layout = ShardLayout([PlannedTensor("a", (2,), torch.float32), PlannedTensor("b", (2,), torch.float32)], 10**9)
    writer = ShardedWriter(str(tmp_path), layout)
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("a", torch.zeros(3))
    writer.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        writer.finish()
    writer.close()


def test_output_folder_is_atomic(tmp_path):
    out = tmp_path / "sub" / "out"
    with pytest.raises(RuntimeError):
        with OutputFolder(str(out)) as folder:
            open(os.path.join(folder.tmp, "partial"), "w").write("x")
            raise RuntimeError("boom")
    assert not out.exists() and os.listdir(tmp_path / "sub") == []
    with OutputFolder(str(out)) as folder:
        open(os.path.join(folder.tmp, "done"), "w").write("x")
        folder.commit()
    assert os.listdir(out) == ["done"]
