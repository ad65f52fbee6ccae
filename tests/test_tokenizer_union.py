"""Vocabulary alignment: ``tokenizer_source: union | base | MODEL``, the ``tokenizer:`` section and
``chat_template``, checked against an independent row-by-row computation (numpy, float64, one
token at a time), against transformers (the output loads with its tokenizer, and the ids it gives
pick the rows we computed), and against mergekit 0.1.5 (tensors within 1e-5, same vocabulary).

The models have clean word-level tokenizers: ``base`` and ``a`` share a 256-token vocabulary; ``b``
added two special tokens (``<|im_start|>``, ``<|im_end|>``, 258 rows); ``c`` numbers two words the
other way round (its rows are permuted accordingly), has a new regular word and ``<|im_end|>``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite.chat_templates import BUILTIN
from mergekit_lite.examples import LLAMA_CONFIG, finetune, llama_shapes, random_model, save_model
from mergekit_lite.vocab import VocabularyMismatch

from conftest import REPO, load_dir, write_plan

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 256)]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
T1 = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
T2 = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"


def write_clean_tokenizer(folder: str, words: list[str], added: list[str] = (), template: str | None = None) -> None:
    vocab = {w: i for i, w in enumerate(words)}
    entries = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for t in ("<unk>", "<s>", "</s>")]
    entries += [{"id": len(words) + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for k, t in enumerate(added)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": entries, "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    with open(os.path.join(folder, "tokenizer.json"), "w") as fh:
        json.dump(tok, fh)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if template:
        cfg["chat_template"] = template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump(cfg, fh)


def vocab_of(words: list[str], added: list[str]) -> dict[str, int]:
    return {t: i for i, t in enumerate(list(words) + list(added))}


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    base = random_model(llama_shapes(LLAMA_CONFIG), seed=21)
    rng = np.random.default_rng(5)
    specs = {}
    specs["base"] = (base, WORDS, [], None)
    specs["a"] = (finetune(base, "dense", 22), WORDS, [], T1)
    b = finetune(base, "dense", 23)
    for n in VOCAB_TENSORS:
        b[n] = np.concatenate([b[n], rng.normal(0, 0.02, (2, 64)).astype(np.float32)])
    specs["b"] = (b, WORDS, ["<|im_start|>", "<|im_end|>"], T1)
    c = finetune(base, "sparse", 24)
    words_c = list(WORDS)
    words_c[10], words_c[20] = words_c[20], words_c[10]
    perm = np.arange(256)
    perm[10], perm[20] = 20, 10
    for n in VOCAB_TENSORS:
        c[n] = np.concatenate([c[n][perm], rng.normal(0, 0.02, (2, 64)).astype(np.float32)])
    specs["c"] = (c, words_c + ["newword"], ["<|im_end|>"], T2)
    paths, vocabs = {}, {}
    for name, (tensors, words, added, template) in specs.items():
        folder = str(root / name)
        config = {**LLAMA_CONFIG, "vocab_size": tensors["model.embed_tokens.weight"].shape[0]}
        save_model(folder, tensors, config, max_shard_bytes=300_000, tokenizer=False)
        write_clean_tokenizer(folder, words, added, template)
        paths[name], vocabs[name] = folder, vocab_of(words, added)
    return {"root": str(root), "paths": paths, "tensors": {k: v[0] for k, v in specs.items()}, "vocabs": vocabs}


UNION = """\
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters: {weight: 0.5}
  - model: b
    parameters: {weight: 0.7}
  - model: c
    parameters: {weight: 0.3}
"""
WEIGHTS = {"a": 0.5, "b": 0.7, "c": 0.3}
SECTION = """\
tokenizer:
  source: union
  tokens:
    <|im_start|>: {source: {kind: zero}}
    <|im_end|>: {source: b, force: true}
    w5: {source: {kind: model_token, model: c, token: w6}, force: true}
  pad_to_multiple_of: 8
"""
OUT_VOCAB = vocab_of(WORDS, ["newword", "<|im_start|>", "<|im_end|>"])


def expected_rows(vm, name: str, vocab: dict[str, int], settings: dict | None = None, size: int | None = None):
    """Task arithmetic of each token's rows, token by token (float64), as the alignment rules say."""
    settings = settings or {}
    models = ["base", "a", "b", "c"]
    rows = {m: vm["tensors"][m][name].astype(np.float64) for m in models}
    out = np.zeros((size or len(vocab), 64))
    aligned = {m: np.zeros((size or len(vocab), 64)) for m in models}
    for token, t in vocab.items():
        have = [m for m in models if token in vm["vocabs"][m]]
        cfg = settings.get(token)
        if cfg is not None:
            kind, src, force = cfg
            default = (np.zeros(64) if kind == "zero" else
                       rows[src][vm["vocabs"][src][token if kind == "model" else kind]])
        elif len(have) == 1:
            default = rows[have[0]][vm["vocabs"][have[0]][token]]
        elif "base" in have:
            default = rows["base"][vm["vocabs"]["base"][token]]
        else:
            default = np.mean([rows[m][vm["vocabs"][m][token]] for m in have], axis=0) if have else np.zeros(64)
        for m in models:
            own = m in have and not (cfg is not None and cfg[2])
            aligned[m][t] = rows[m][vm["vocabs"][m][token]] if own else default
    if size and size > len(vocab):
        for m in models:
            aligned[m][len(vocab):] = aligned[m][:len(vocab)].mean(0)
    out = aligned["base"] + sum(w * (aligned[m] - aligned["base"]) for m, w in WEIGHTS.items())
    return out


def run_plan(vm, tmp_path, text: str, name: str = "plan.yml") -> str:
    plan = write_plan(vm["root"], text, name)
    out = str(tmp_path / name.replace(".yml", ""))
    mergekit_lite.run(plan, out)
    return out


def output_vocab(folder: str) -> dict[str, int]:
    from mergekit_lite.io.vocab import read_vocab

    return read_vocab(folder).ids


def test_union_rows_match_a_token_by_token_computation(vocab_models, tmp_path):
    out = run_plan(vocab_models, tmp_path, UNION + "tokenizer_source: union\n", "union.yml")
    got = load_dir(out)
    assert output_vocab(out) == OUT_VOCAB
    for name in VOCAB_TENSORS:
        want = expected_rows(vocab_models, name, OUT_VOCAB)
        assert got[name].shape == (259, 64)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=2e-7)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["vocab_size"] == 259
    # a token only b has takes b's row; one b and c have (not the base) is their mean in the others
    b = vocab_models["tensors"]["b"]["lm_head.weight"]
    np.testing.assert_allclose(got["lm_head.weight"][257].numpy(), b[256], atol=1e-7)


def test_tokenizer_section_sources_force_and_padding(vocab_models, tmp_path):
    out = run_plan(vocab_models, tmp_path, UNION + SECTION, "section.yml")
    got = load_dir(out)
    settings = {"<|im_start|>": ("zero", None, False), "<|im_end|>": ("model", "b", True), "w5": ("w6", "c", True)}
    for name in VOCAB_TENSORS:
        want = expected_rows(vocab_models, name, OUT_VOCAB, settings, size=264)
        assert got[name].shape == (264, 64)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=2e-7)
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 264


def test_base_vocabulary_drops_and_reorders_rows(vocab_models, tmp_path):
    out = run_plan(vocab_models, tmp_path, UNION + "tokenizer_source: base\n", "base.yml")
    got = load_dir(out)
    base_vocab = vocab_of(WORDS, [])
    for name in VOCAB_TENSORS:
        np.testing.assert_allclose(got[name].double().numpy(), expected_rows(vocab_models, name, base_vocab),
                                   rtol=0, atol=2e-7)
    assert output_vocab(out) == base_vocab


def test_mismatched_vocabularies_without_a_setting_say_what_differs_and_what_to_set(vocab_models, tmp_path):
    with pytest.raises(VocabularyMismatch) as info:
        run_plan(vocab_models, tmp_path, UNION, "none.yml")
    text = str(info.value)
    assert "model 'b' has 258 embedding rows, model 'base' has 256: 2 token(s) not in model 'base'" in text
    assert "'<|im_start|>', '<|im_end|>'" in text and "tokenizer_source: union" in text
    assert "model 'a'" not in text


def test_a_later_step_aligns_an_earlier_steps_vocabulary(vocab_models, tmp_path):
    text = ("name: chat\nmerge_method: linear\nmodels:\n  - {model: base, parameters: {weight: 0.5}}\n"
            "  - {model: b, parameters: {weight: 0.5}}\ntokenizer_source: union\n---\n"
            "merge_method: linear\nmodels:\n  - {model: chat, parameters: {weight: 0.5}}\n"
            "  - {model: a, parameters: {weight: 0.5}}\ntokenizer_source: union\n")
    out = run_plan(vocab_models, tmp_path, text, "steps.yml")
    got = load_dir(out)["model.embed_tokens.weight"]
    t = vocab_models["tensors"]
    assert got.shape == (258, 64) and output_vocab(out)["<|im_end|>"] == 257
    np.testing.assert_allclose(got[256:].numpy(), t["b"]["model.embed_tokens.weight"][256:], atol=1e-7)
    want = 0.25 * t["base"]["model.embed_tokens.weight"] + 0.25 * t["b"]["model.embed_tokens.weight"][:256] \
        + 0.5 * t["a"]["model.embed_tokens.weight"]
    np.testing.assert_allclose(got[:256].numpy(), want, atol=1e-7)


@pytest.mark.parametrize("setting, want", [("chatml", BUILTIN["chatml"]), ("auto", T1), (repr(T2), T2)])
def test_chat_template_setting(vocab_models, tmp_path, setting, want):
    out = run_plan(vocab_models, tmp_path, UNION + f"tokenizer_source: union\nchat_template: {setting}\n",
                   f"tpl-{abs(hash(setting))}.yml")
    assert open(os.path.join(out, "chat_template.jinja")).read() == want
    assert "chat_template" not in json.load(open(os.path.join(out, "tokenizer_config.json")))


def test_example_union_plan_rows(tmp_path):
    """merge_configs/union.yml: the shared rows are task arithmetic, the two new ones ft_chatml's."""
    out = str(tmp_path / "out")
    mergekit_lite.run(os.path.join(REPO, "merge_configs", "union.yml"), out)
    got = load_dir(out)
    ex = {n: load_dir(os.path.join(REPO, "merge_configs", "models", n)) for n in ("base", "ft_math", "ft_chatml")}
    for name in VOCAB_TENSORS:
        b = ex["base"][name].double()
        want = b + 0.6 * (ex["ft_math"][name].double() - b) + 0.8 * (ex["ft_chatml"][name][:256].double() - b)
        assert torch.allclose(got[name][:256].double(), want, atol=1e-7, rtol=0)
        assert torch.equal(got[name][256:], ex["ft_chatml"][name][256:])
    assert output_vocab(out)["<|im_end|>"] == 257
    assert open(os.path.join(out, "chat_template.jinja")).read() == BUILTIN["chatml"]
    transformers = pytest.importorskip("transformers")
    # the example vocabulary has a gap (id 3); the new tokens still get the ids of their rows
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("<|im_start|> the <|im_end|>", add_special_tokens=False).input_ids == [256, 39, 257]


def test_transformers_loads_the_union_with_its_tokenizer(vocab_models, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = run_plan(vocab_models, tmp_path, UNION + "tokenizer_source: union\nchat_template: chatml\n", "tf.yml")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = tok("<|im_start|> newword w5 <|im_end|>", add_special_tokens=False).input_ids
    assert ids == [257, 256, 5, 258]
    want = expected_rows(vocab_models, "model.embed_tokens.weight", OUT_VOCAB)
    emb = model.get_input_embeddings().weight.detach().double().numpy()
    np.testing.assert_allclose(emb[ids], want[ids], atol=2e-7)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model(torch.tensor([ids])).logits.shape == (1, 4, 259)


PARITY = {"union": "tokenizer_source: union\n", "base": "tokenizer_source: base\n", "section": SECTION}


@pytest.fixture(scope="module")
def mergekit_outputs(vocab_models, tmp_path_factory):
    """The parity plans run by mergekit, in one process (its import alone takes seconds)."""
    from test_parity_mergekit import MERGEKIT, run_mergekit

    if not (MERGEKIT and os.path.exists(MERGEKIT)):
        pytest.skip("mergekit-yaml not found (set MERGEKIT_YAML to run the parity tests)")
    tmp = tmp_path_factory.mktemp("mk")
    jobs = {key: (write_plan(vocab_models["root"], UNION + extra, f"mk-{key}.yml"), str(tmp / key), [])
            for key, extra in PARITY.items()}
    run_mergekit(list(jobs.values()), str(tmp))
    return {key: (plan, out) for key, (plan, out, _) in jobs.items()}


@pytest.mark.parametrize("key", list(PARITY))
def test_parity_with_mergekit(mergekit_outputs, tmp_path, key):
    """Same tokens, and each token's rows within 1e-5 of mergekit's. Which ids the new tokens get is
    not compared: mergekit visits the models in the order of a Python set, which changes from run to
    run (we follow the plan's order)."""
    plan, theirs = mergekit_outputs[key]
    ours = str(tmp_path / "ours")
    mergekit_lite.run(plan, ours)
    a, b = load_dir(ours), load_dir(theirs)
    va, vb = output_vocab(ours), output_vocab(theirs)
    assert set(a) == set(b) and set(va) == set(vb)
    tokens = sorted(va)
    for name in a:
        x, y = a[name].double(), b[name].double()
        assert x.shape == y.shape, name
        if name in VOCAB_TENSORS:  # row of each token, then the padding rows
            n = len(tokens)
            x = torch.cat([x[[va[t] for t in tokens]], x[n:]])
            y = torch.cat([y[[vb[t] for t in tokens]], y[n:]])
        err = (x - y).norm() / y.norm()
        assert err < 1e-5, (name, float(err))
    assert json.load(open(os.path.join(ours, "config.json")))["vocab_size"] == \
        json.load(open(os.path.join(theirs, "config.json")))["vocab_size"]


def test_tokenizer_keys_problems_are_all_reported_with_lines():
    from mergekit_lite.errors import PlanError
    from mergekit_lite.plan.schema import parse_plan

    text = ("merge_method: linear\nmodels:\n  - model: a\n  - model: b\ntokenizer_source: union\n"
            "tokenizer:\n  source: union\n  bogus: 1\n  pad_to_multiple_of: 0\n  tokens:\n"
            "    x: {source: {kind: sideways}}\n    y: {source: elsewhere}\n"
            "    z: {source: {kind: model_token, model: a, token: t, token_id: 3}}\nchat_template: nope\n")
    with pytest.raises(PlanError) as info:
        parse_plan(text, "p.yml")
    found = [(i.line, i.path) for i in info.value.issues]
    assert found == [(5, "tokenizer_source"), (8, "tokenizer.bogus"), (9, "tokenizer.pad_to_multiple_of"),
                     (11, "tokenizer.tokens.x.source.kind"),
                     (13, "tokenizer.tokens.z.source"), (14, "chat_template")]
    messages = " ".join(i.message for i in info.value.issues)
    for words in ("either tokenizer_source or a tokenizer: section", "allowed: source, tokens, pad_to_multiple_of",
                  "positive integer", "allowed: model_token, zero", "exactly one of token and token_id",
                  "unknown chat template 'nope'"):
        assert words in messages, words
    # which models a token may take its row from is checked once the step itself is valid
    with pytest.raises(PlanError) as info:
        parse_plan("merge_method: linear\nmodels:\n  - model: a\n  - model: b\ntokenizer:\n  tokens:\n"
                   "    y: {source: elsewhere}\n", "p.yml")
    (issue,) = info.value.issues
    assert (issue.line, issue.path) == (7, "tokenizer.tokens.y.source")
    assert "model elsewhere is not one of this step's models" in issue.message


def test_slices_take_the_rows_their_models_have_and_warn_about_the_rest(vocab_models, tmp_path):
    """A frankenmerge's embedding comes from the first slice's model and lm_head from the last's: a
    token the first lacks gets a zero embedding row (as in mergekit), and the plan warns about it."""
    from mergekit_lite.merge import compile_plan

    text = ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: base, layer_range: [0, 2]}\n"
            "  - sources:\n      - {model: b, layer_range: [2, 4]}\ntokenizer_source: union\n")
    plan = write_plan(vocab_models["root"], text, "slices.yml")
    warnings = compile_plan(plan).warnings
    assert any("'<|im_start|>', '<|im_end|>') have no row in model 'base'" in w for w in warnings), warnings
    out = str(tmp_path / "out")
    mergekit_lite.run(plan, out)
    got, b = load_dir(out), vocab_models["tensors"]["b"]
    assert got["model.embed_tokens.weight"][256:].abs().sum() == 0
    np.testing.assert_array_equal(got["lm_head.weight"].numpy(), b["lm_head.weight"])


def test_same_vocabularies_are_merged_untouched_padding_rows_included(vocab_models, tmp_path):
    """tokenizer_source on models that already share a vocabulary changes nothing: the merge is the plain
    one, padding rows past the tokens included (mergekit would drop them)."""
    root = tmp_path / "padded"
    for name in ("base", "a"):
        tensors = dict(vocab_models["tensors"][name])
        for n in VOCAB_TENSORS:
            tensors[n] = np.concatenate([tensors[n], np.full((8, 64), 0.01, np.float32)])
        folder = str(root / name)
        save_model(folder, tensors, {**LLAMA_CONFIG, "vocab_size": 264}, tokenizer=False)
        write_clean_tokenizer(folder, WORDS)
    text = "merge_method: linear\nmodels:\n  - model: base\n  - model: a\nparameters: {weight: 0.5}\n"
    plain = run_plan({"root": str(root)}, tmp_path, text, "plain.yml")
    for setting in ("base", "union", "a"):
        out = run_plan({"root": str(root)}, tmp_path, text + f"tokenizer_source: {setting}\n", f"{setting}.yml")
        assert open(os.path.join(out, "model.safetensors"), "rb").read() == \
            open(os.path.join(plain, "model.safetensors"), "rb").read()
    assert json.load(open(os.path.join(plain, "config.json")))["vocab_size"] == 264
