"""The Hub workflow against a fake Hub on 127.0.0.1 (tests/hub_fake.py), with the real huggingface_hub client.

- ``run PLAN OUT --upload org/name``: every output file arrives byte-identical, the card's metadata
  parses and its ``base_model`` lists exactly the Hub ids the plan read;
- a wrong token: exit status 2, OUT intact, the retry command printed, and the token nowhere in
  stdout, stderr or any file written (output folder, cache);
- plans naming models by Hub id (a pinned revision included) merge to the same bits as the same
  plan over the local folders; only the files a merge needs are downloaded; offline mode uses the
  cache and makes no request; gated and private repos say to log in;
- branches, the Python API (``upload``, ``run(upload=)``, ``Model.save(upload=)``), missing tokens
  and missing write access.

The client runs with ``HF_HUB_DISABLE_XET=1`` and ``HF_HUB_DISABLE_TELEMETRY=1`` (and one test
without the first, to check the fallback to LFS when the Hub has no Xet storage).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

import mergekit_lite
from mergekit_lite.cli import main
from mergekit_lite.io.resolve import HUB_PATTERNS

from conftest import REPO
from hub_fake import FakeHub

GOOD, BOB, WRONG = "hf_alice_WRITE_token_0001", "hf_bob_token_0002", "hf_wrong_token_9999"
EXAMPLES = os.path.join(REPO, "merge_configs", "models")
PLAN = """\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {math}
    parameters: {{weight: [1.0, 0.5]}}
  - model: {code}
    parameters: {{weight: 0.7}}
dtype: bfloat16
"""


def folder_files(folder: str) -> dict[str, bytes]:
    out = {}
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


@pytest.fixture(scope="module")
def hub():
    """A fake Hub holding the example models as team/* repos (plus files a merge does not need)."""
    with FakeHub({GOOD: "alice", BOB: "bob"}, orgs={"team": {"alice"}}, lifetime=900) as server:
        for name in ("base", "ft_math", "ft_code", "ft_chatml"):
            files = folder_files(os.path.join(EXAMPLES, name))
            files.update({"pytorch_model.bin": b"not needed", "notes/data.csv": b"a,b\n"})
            server.state.add_repo(f"team/{name}", files)
        lora = folder_files(os.path.join(REPO, "merge_configs", "adapters", "lora_attn"))
        lora.update({"optimizer.pt": b"not needed", "README.md": b"# a LoRA"})
        server.state.add_repo("team/lora-attn", lora)
        server.state.add_repo("team/private", folder_files(os.path.join(EXAMPLES, "ft_code")), private=True)
        server.state.add_repo("team/gated", folder_files(os.path.join(EXAMPLES, "ft_code")), gated=True)
        yield server


@pytest.fixture
def env(hub, tmp_path, monkeypatch):
    """A fresh cache and the fake Hub for this test, for subprocesses (env) and in-process (constants)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    values = {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_ENDPOINT": hub.url,
              "HF_TOKEN": GOOD, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy"):  # the fake Hub is local: never through a proxy
        monkeypatch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"])))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return values


def hub_plan(tmp_path, math="team/ft_math") -> str:
    path = tmp_path / "hub_plan.yml"
    path.write_text(PLAN.format(base="team/base", math=math, code="team/ft_code"))
    return str(path)


def local_plan(tmp_path) -> str:
    path = tmp_path / "local_plan.yml"
    path.write_text(PLAN.format(base=f"{EXAMPLES}/base", math=f"{EXAMPLES}/ft_math", code=f"{EXAMPLES}/ft_code"))
    return str(path)


def card_meta(folder: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(os.path.join(folder, "README.md")).data.to_dict()


def test_run_upload_delivers_every_file_and_a_card_naming_the_hub_ids(hub, env, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["run", hub_plan(tmp_path, "team/ft_math@main"), out, "-q", "--upload", "alice/merged",
                 "--endpoint", hub.url]) == 0
    local = folder_files(out)
    remote = hub.state.files("alice/merged")
    assert set(remote) == set(local) | {".gitattributes"}
    assert all(remote[name] == data for name, data in local.items())
    assert any(name.endswith(".safetensors") for name in local)  # went through LFS
    meta = card_meta(out)
    assert meta["base_model"] == ["team/base", "team/ft_math", "team/ft_code"]
    assert meta["base_model_relation"] == "merge" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["merge", "mergekit", "mergekit-lite"]
    readme = local["README.md"].decode()
    assert f"[team/ft_math]({hub.url}/team/ft_math) at revision `main`" in readme
    assert hub.state.repos["team/ft_math"].branches["main"] in readme  # the commit downloaded is pinned
    captured = capsys.readouterr()
    assert GOOD not in captured.out + captured.err


def test_hub_ids_merge_to_the_same_bits_as_the_local_folders(hub, env, tmp_path):
    by_id, by_path = str(tmp_path / "by_id"), str(tmp_path / "by_path")
    sha = hub.state.repos["team/ft_math"].branches["main"]
    mergekit_lite.run(hub_plan(tmp_path, f"team/ft_math@{sha}"), by_id)
    mergekit_lite.run(local_plan(tmp_path), by_path)
    a, b = folder_files(by_id), folder_files(by_path)
    tensors = [n for n in b if n.endswith((".safetensors", ".index.json"))] + ["config.json", "tokenizer.json"]
    assert tensors and all(a[n] == b[n] for n in tensors)
    assert "base_model" not in card_meta(by_path)  # local folders are never listed as Hub models
    assert card_meta(by_id)["base_model"] == ["team/base", "team/ft_math", "team/ft_code"]
    # only what a merge needs was downloaded
    snapshots = glob.glob(os.path.join(env["HF_HUB_CACHE"], "models--team--ft_math", "snapshots", "*", "*"))
    names = {os.path.basename(p) for p in snapshots}
    assert "config.json" in names and "pytorch_model.bin" not in names and "notes" not in names
    gets = [e["path"] for e in hub.state.log if e["method"] == "GET" and "/resolve/" in e["path"]]
    assert not any(p.endswith(("pytorch_model.bin", "data.csv")) for p in gets)


def test_a_hub_adapter_folds_like_the_local_one_and_only_its_files_are_fetched(hub, env, tmp_path):
    """``base+org/adapter@rev`` downloads the adapter's two files from the Hub, and folds to the bits
    of the same adapter on disk."""
    plan = "merge_method: passthrough\nmodels:\n  - model: {}\ndtype: float32\n"
    by_id, by_path = tmp_path / "by_id.yml", tmp_path / "by_path.yml"
    by_id.write_text(plan.format("team/base+team/lora-attn@main"))
    by_path.write_text(plan.format(f"{EXAMPLES}/base+{REPO}/merge_configs/adapters/lora_attn"))
    mergekit_lite.run(str(by_id), str(tmp_path / "a"))
    mergekit_lite.run(str(by_path), str(tmp_path / "b"))
    a, b = folder_files(str(tmp_path / "a")), folder_files(str(tmp_path / "b"))
    weights = [n for n in b if n.endswith((".safetensors", ".index.json"))]
    assert weights and all(a[n] == b[n] for n in weights)
    assert card_meta(str(tmp_path / "a"))["base_model"] == ["team/base", "team/lora-attn"]
    gets = {e["path"].rsplit("/", 1)[-1] for e in hub.state.log
            if e["method"] == "GET" and "/team/lora-attn/resolve/" in e["path"]}
    assert gets == {"adapter_config.json", "adapter_model.safetensors"}


def test_offline_mode_uses_the_cache_and_makes_no_request(hub, env, tmp_path, monkeypatch):
    first = str(tmp_path / "first")
    mergekit_lite.run(hub_plan(tmp_path), first)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.state.log)
    again = str(tmp_path / "again")
    mergekit_lite.run(hub_plan(tmp_path), again)
    assert len(hub.state.log) == before
    assert folder_files(first)["model.safetensors"] == folder_files(again)["model.safetensors"]
    with pytest.raises(mergekit_lite.ModelNotFound, match="offline"):
        mergekit_lite.run(hub_plan(tmp_path, "team/ft_chatml"), str(tmp_path / "x"))


@pytest.mark.parametrize("repo, token, words", [
    ("team/gated", BOB, ["gated", "accept its terms", "log in"]),
    ("team/private", None, ["private", "log in"]),
    ("team/nonexistent", GOOD, ["no such Hub repo", "log in"]),
])
def test_gated_and_private_repos_say_to_log_in(hub, env, tmp_path, monkeypatch, repo, token, words):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(mergekit_lite.ModelNotFound) as info:
        mergekit_lite.run(hub_plan(tmp_path, repo), str(tmp_path / "out"))
    assert all(w in str(info.value) for w in words), str(info.value)


def test_wrong_token_exit_2_out_intact_token_nowhere(hub, env, tmp_path):
    """The bar, as a user runs it: a real process, a token the Hub refuses."""
    out = tmp_path / "out"
    proc_env = {**os.environ, **env, "HF_TOKEN": WRONG}
    proc = subprocess.run([sys.executable, "-m", "mergekit_lite.cli", "run", local_plan(tmp_path), str(out),
                           "--upload", "alice/refused", "--endpoint", hub.url], env=proc_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "401" in proc.stderr
    assert f"mergekit-lite upload {out} alice/refused --endpoint {hub.url}" in proc.stderr
    files = folder_files(str(out))
    assert {"config.json", "README.md", "model.safetensors"} <= set(files)
    everything = [proc.stdout, proc.stderr] + [d.decode("latin-1") for d in files.values()]
    everything += [d.decode("latin-1") for d in folder_files(env["HF_HOME"]).values()]
    assert not any(WRONG in text for text in everything)
    assert "alice/refused" not in hub.state.repos


def test_upload_to_a_new_branch_and_the_python_api(hub, env, tmp_path):
    out = str(tmp_path / "out")
    mergekit_lite.run(local_plan(tmp_path), out, upload=mergekit_lite.Upload("alice/api", endpoint=hub.url))
    url = mergekit_lite.upload(out, "alice/api", revision="dev", commit_message="second", endpoint=hub.url)
    repo = hub.state.repos["alice/api"]
    assert set(repo.branches) == {"main", "dev"} and url.endswith(repo.branches["dev"])
    assert hub.state.files("alice/api", "dev")["model.safetensors"] == folder_files(out)["model.safetensors"]
    base = mergekit_lite.Model("team/base")  # models by id work the same from Python
    expr = base + 0.5 * (mergekit_lite.Model(f"{EXAMPLES}/ft_math") - base)
    expr.save(str(tmp_path / "expr"), upload=mergekit_lite.Upload("team/expr", private=True, endpoint=hub.url))
    assert hub.state.repos["team/expr"].private
    assert hub.state.files("team/expr").keys() >= set(folder_files(str(tmp_path / "expr")))
    assert card_meta(str(tmp_path / "expr"))["base_model"] == ["team/base"]


def test_upload_falls_back_to_lfs_when_the_hub_has_no_xet(hub, env, tmp_path, monkeypatch):
    pytest.importorskip("hf_xet")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    out = str(tmp_path / "out")
    mergekit_lite.run(local_plan(tmp_path), out, max_shard_size="300KB")
    mergekit_lite.upload(out, "alice/xetless", endpoint=hub.url)
    remote = hub.state.files("alice/xetless")
    assert all(remote[n] == d for n, d in folder_files(out).items())
    assert any("xet" in e["path"] for e in hub.state.log)
    assert constants.HF_HUB_DISABLE_XET is False  # the client's setting is restored


def test_upload_works_on_a_hub_without_card_validation(hub, env, tmp_path, monkeypatch):
    monkeypatch.setattr(hub.state, "disabled", {"validate_yaml"})
    out = str(tmp_path / "out")
    mergekit_lite.run(local_plan(tmp_path), out)
    mergekit_lite.upload(out, "alice/novalidation", endpoint=hub.url)
    assert hub.state.files("alice/novalidation")["README.md"] == folder_files(out)["README.md"]


@pytest.mark.parametrize("token, repo, words", [
    (None, "alice/x", ["no Hugging Face token", "hf auth login"]),
    (BOB, "team/not-bobs", ["403", "write access"]),
])
def test_missing_token_or_rights_is_a_readable_error(hub, env, tmp_path, monkeypatch, capsys, token, repo, words):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert main(["upload", str(folder), repo, "--endpoint", hub.url]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert f"mergekit-lite upload {folder} {repo}" in err and BOB not in err


def test_the_token_is_scrubbed_from_any_failure_message(hub, env, tmp_path, monkeypatch):
    from mergekit_lite.io import hub as hubmod

    def leak(*args, **kwargs):
        raise RuntimeError(f"connection reset while sending Authorization: Bearer {GOOD}")

    monkeypatch.setattr(hubmod, "_publish", leak)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    with pytest.raises(mergekit_lite.UploadFailed) as info:
        mergekit_lite.upload(str(folder), "alice/leak", endpoint=hub.url)
    assert GOOD not in str(info.value) and "***" in str(info.value)


def test_downloads_include_what_an_output_folder_needs():
    for needed in ("config.json", "generation_config.json", "tokenizer.json", "modeling_x.py", "README.md",
                   "chat_template.jinja", "model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        from fnmatch import fnmatch

        assert any(fnmatch(needed, p) for p in HUB_PATTERNS), needed
