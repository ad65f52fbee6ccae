"""``mergekit-lite eval``: scores against hand-counted answers of a model whose output is known by
construction (tests/quality_helpers.py), perplexity against its closed form, a plan's output
scored in memory equal to the same plan written and scored, and readable errors."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("transformers")

from mergekit_lite.cli import main  # noqa: E402
from mergekit_lite.quality.evaluate import evaluate  # noqa: E402
from mergekit_lite.quality.scoring import char_accuracy, exact_match, prediction  # noqa: E402

from conftest import REPO, write_plan  # noqa: E402
from quality_helpers import save_successor, token_nll  # noqa: E402

# (prompt, answer): the successor model continues 'b=' with 'xy' then stops, 'b:' with 'z\na…' (cut
# at the line break), and 'ba' with 'aaaa…' (never stops)
EXAMPLES = [("b=", "xy"), ("b=", " xy "), ("b:", "z"), ("b:", "zz"), ("ba", "aa"), ("b=", "xz"), ("a", "a")]
# exact:  1       1         1        0 (z)      0 (aaaaaa)  0 (xy)     0 (aaaaa)
# char:   1       1         1        1/2        1           1/2        1
HAND_EM = 3 / 7
HAND_CHAR = (1 + 1 + 1 + 0.5 + 1 + 0.5 + 1) / 7


@pytest.fixture(scope="module")
def successor(tmp_path_factory):
    root = tmp_path_factory.mktemp("successor")
    folder = save_successor(str(root / "model"))
    task = root / "tiny.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in EXAMPLES))
    (root / "text.txt").write_text("b=xy")
    return {"model": folder, "task": str(task), "text": str(root / "text.txt"), "root": root}


def test_scoring_definitions():
    assert prediction("xy\nmore", "xy") == "xy" and prediction("x\ny", "x\ny") == "x\ny"
    assert exact_match(" cba ", "cba") == 1.0 and exact_match("cbaa", "cba") == 0.0
    assert char_accuracy("cbd", "cba") == pytest.approx(2 / 3)
    assert char_accuracy("c", "cba") == pytest.approx(1 / 3)
    assert char_accuracy("acba", "cba") == 0.0  # positions, not alignment
    assert char_accuracy("", "") == 1.0 and char_accuracy("x", "") == 0.0


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_exact_match_and_char_accuracy_equal_the_hand_count(successor, batch_size):
    report = evaluate([successor["model"]], [successor["task"]], device="cpu", batch_size=batch_size)
    scores = report.rows[0].scores["tiny"]
    assert scores["examples"] == len(EXAMPLES)
    assert scores["exact_match"] == pytest.approx(HAND_EM)
    assert scores["char_accuracy"] == pytest.approx(HAND_CHAR)


def test_perplexity_equals_its_closed_form(successor):
    """'<s> b = x y': b and = are not successors of the token before them, x and y are."""
    report = evaluate([successor["model"]], [successor["text"]], device="cpu")
    scores = report.rows[0].scores["text"]
    want = math.exp((2 * token_nll(False) + 2 * token_nll(True)) / 4)
    assert scores["tokens"] == 4
    assert scores["perplexity"] == pytest.approx(want, rel=1e-5)


def test_a_plan_is_scored_in_memory_like_its_written_output(successor, tmp_path, monkeypatch):
    """The linear merge of two copies of the model is the model (and bit for bit its written output)."""
    monkeypatch.chdir(tmp_path)
    copy = save_successor(str(tmp_path / "copy"))
    plan = write_plan(tmp_path, f"""\
        merge_method: linear
        models:
          - model: {successor['model']}
          - model: {copy}
        parameters:
          weight: 1.0
        """)
    before = sorted(os.listdir(tmp_path))
    report = evaluate(tasks=[successor["task"]], plan=plan, device="cpu")
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    assert [r.label for r in report.rows] == [successor["model"], copy, f"output of {plan}"]
    import mergekit_lite

    mergekit_lite.run(plan, str(tmp_path / "written"))
    written = evaluate([str(tmp_path / "written")], [successor["task"]], device="cpu")
    assert report.rows[2].scores == written.rows[0].scores == report.rows[0].scores


def test_python_expressions_are_scored_without_files(successor, tmp_path):
    from mergekit_lite import Model

    m, copy = Model(successor["model"]), Model(save_successor(str(tmp_path / "copy")))
    report = evaluate([m, m.linear([copy], weight=[0.5, 0.5])], [successor["task"]], device="cpu")
    assert [r.scores["tiny"]["exact_match"] for r in report.rows] == [pytest.approx(HAND_EM)] * 2


def test_cli_prints_a_table_and_writes_json(successor, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert main(["eval", successor["model"], "--tasks", successor["task"], successor["text"], "--device", "cpu",
                 "--json", str(out), "-q"]) == 0
    table = capsys.readouterr().out
    assert "tiny (EM/char)" in table and f"{HAND_EM:.3f}/{HAND_CHAR:.3f}" in table
    data = json.loads(out.read_text())
    assert [t["name"] for t in data["tasks"]] == ["tiny", "text"]
    assert data["models"][0]["scores"]["tiny"]["exact_match"] == pytest.approx(HAND_EM)


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a"}\n', "tiny.jsonl:1: 'answer' must be a string"),
    ('{"prompt": "a", "answer": "b"}\nnot json\n', "tiny.jsonl:2: not valid JSON"),
    ('[1, 2]\n', "tiny.jsonl:1: expected a JSON object"),
    ('{"question": "a"}\n', "tiny.jsonl:1: expected 'prompt' and 'answer'"),
    ('\n', "no examples"),
])
def test_a_bad_task_file_is_a_readable_error(successor, tmp_path, capsys, content, message):
    bad = tmp_path / "tiny.jsonl"
    bad.write_text(content)
    assert main(["eval", successor["model"], "--tasks", str(bad), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_prompt_longer_than_the_context_is_reported_with_its_line(successor, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "b" * 40, "answer": "x"}) + "\n")
    assert main(["eval", successor["model"], "--tasks", str(long), "--device", "cpu", "-q"]) == 2
    assert "long.jsonl:1: the prompt is 41 tokens, the model's context is 32" in capsys.readouterr().err


def test_a_model_that_lacks_a_tensor_is_refused(successor, tmp_path, capsys):
    from quality_helpers import SUCCESSOR_CONFIG, successor_tensors

    from mergekit_lite.demo import write_tokenizer
    from mergekit_lite.examples import save_model

    tensors = successor_tensors()
    del tensors["model.norm.weight"]
    folder = save_model(str(tmp_path / "broken"), tensors, SUCCESSOR_CONFIG, tokenizer=False)
    write_tokenizer(folder)
    assert main(["eval", folder, "--tasks", successor["task"], "--device", "cpu", "-q"]) == 2
    assert "lacks tensors its config.json needs: model.norm.weight" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_predictions_equal_transformers_generate(arch, tmp_path):
    """On random checkpoints of two architectures (GPT-2: tied embeddings, no BOS), eval's batched
    greedy decoding gives what transformers' own generate() gives one prompt at a time."""
    import torch

    from mergekit_lite import Model
    from mergekit_lite.examples import GPT2_CONFIG, LLAMA_CONFIG, gpt2_shapes, llama_shapes, random_model, save_model
    from mergekit_lite.io.vocab import TokenizerOutput
    from mergekit_lite.quality.hf import ModelCache, stream_into
    from mergekit_lite.quality.infer import encode_prompt, generate
    from mergekit_lite.quality.tasks import load_task

    config, shapes = (LLAMA_CONFIG, llama_shapes) if arch == "llama" else (GPT2_CONFIG, gpt2_shapes)
    folder = save_model(str(tmp_path / arch), random_model(shapes(config), seed=3, std=0.5), config)
    words = ["the model", "merge the weights", "a of to", "it is you", "that and in", "model weights of the"]
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"prompt": w, "answer": "x y z"}) + "\n" for w in words))
    cache = ModelCache()
    model = cache.model(config, arch, torch.device("cpu"), torch.float32)
    stream_into(model, Model(folder).iter_tensors(device="cpu"), arch)
    tokenizer = cache.tokenizer(TokenizerOutput(folder), arch)
    got = generate(model, tokenizer, load_task(str(task)), torch.device("cpu"), batch_size=4)
    eos = config["eos_token_id"]
    for prompt, text in zip(words, got):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             max_new_tokens=7, eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:].tolist()
        until_eos = out[:out.index(eos)] if eos in out else out
        assert text == tokenizer.decode(until_eos, skip_special_tokens=True), (prompt, out)


def test_task_files_as_people_write_them(successor, tmp_path):
    """A byte-order mark, CRLF line ends, numbers as answers, extra keys, a .json list; an end token
    named only in generation_config.json stops generation."""
    from mergekit_lite.quality.tasks import load_task

    crlf = tmp_path / "bom.jsonl"
    crlf.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "b=", "answer": "xy", "id": 1}\r\n\r\n{"prompt": "q", "answer": 7}\r\n')
    task = load_task(str(crlf))
    assert task.examples == (("b=", "xy"), ("q", "7")) and task.lines == (1, 3)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"prompt": "b=", "answer": "xy"}, {"prompt": "b:", "answer": "z"}]))
    assert load_task(str(listed)).examples == (("b=", "xy"), ("b:", "z"))
    folder = save_successor(str(tmp_path / "chatty"), mapping={"=": "x", "x": "q", "q": "y"})  # x q y …
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "b=", "answer": "x"}) + "\n")
    assert evaluate([folder], [str(tmp_path / "t.jsonl")], device="cpu").rows[0].scores["t"]["exact_match"] == 0
    from quality_helpers import VOCAB

    (tmp_path / "chatty" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, VOCAB["q"]]}))
    assert evaluate([folder], [str(tmp_path / "t.jsonl")], device="cpu").rows[0].scores["t"]["exact_match"] == 1


def test_a_merge_is_scored_with_the_tokenizer_its_output_would_get(tmp_path):
    """tokenizer_source: union adds ft_chatml's two chat tokens: the tokenizer loaded for scoring
    is the output's (258 tokens), not the base donor's files as they are."""
    from mergekit_lite.merge import Options, compile_plan
    from mergekit_lite.quality.hf import ModelCache

    compiled = compile_plan(os.path.join(REPO, "merge_configs", "union.yml"), Options(), sink="emit")
    tokenizer = ModelCache().tokenizer(compiled.outputs[0].tokenizer, "union")
    # the example vocabularies leave id 3 unused: count rows by the largest id, not by len()
    assert max(tokenizer.get_vocab().values()) + 1 == compiled.outputs[0].config["vocab_size"] == 258
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 257
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "<|im_start|>the model", "answer": "a"}) + "\n")
    report = evaluate([os.path.join(REPO, "merge_configs", "union.yml")], [str(tmp_path / "chat.jsonl")],
                      device="cpu")
    assert report.rows[0].scores["chat"]["examples"] == 1
