"""Which keys each mapping of a plan may hold: refused mergekit keys come from one table, input entries
(``models:`` and ``slices: sources:``) are read by one reader, and problems keep their order."""

import pytest

from mergekit_lite.errors import PlanError
from mergekit_lite.plan import parser
from mergekit_lite.plan.schema import UNSUPPORTED_KEYS, parse_plan

MODELS = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
SLICES = "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n"


def problems(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(PlanError) as info:
        parse_plan(text, "p.yml")
    return [(i.line, i.path, i.message) for i in info.value.issues]


def test_every_refused_key_is_in_the_table_and_the_table_is_used():
    refused = {k for spec in (parser.STEP, parser.RECIPE, parser.SLICE, parser.UPSCALE, parser.MODEL_ENTRY.keys,
                              parser.SLICE_SOURCE.keys) for k in spec.refused}
    assert refused | {"override_architecture"} == set(UNSUPPORTED_KEYS)


@pytest.mark.parametrize("key", ["modules"])
def test_step_keys_refused_with_the_table_message_in_every_step_form(key):
    assert problems(MODELS + f"{key}: x\n") == [(5, key, UNSUPPORTED_KEYS[key])]
    steps = "steps:\n  - " + MODELS.replace("\n", "\n    ").rstrip() + f"\n    {key}: x\n"
    assert problems(steps) == [(6, f"steps[0].{key}", UNSUPPORTED_KEYS[key])]
    multi = "name: x\n" + MODELS + "---\n" + MODELS.replace("model: a", "model: x") + f"{key}: x\n"
    assert problems(multi) == [(11, key, UNSUPPORTED_KEYS[key])]


@pytest.mark.parametrize("form", ["{model: {path: c}, override_architecture: X}"])
def test_model_reference_keys_refused_with_the_table_message_wherever_a_model_is_named(form):
    message = UNSUPPORTED_KEYS["override_architecture"]
    assert problems(MODELS.replace("model: a", f"model: {form}")) == [(3, "models[0].model", message)]
    assert problems(SLICES.replace("model: a", f"model: {form}")) == [(4, "slices[0].sources[0].model", message)]
    assert problems(MODELS + f"base_model: {form}\n") == [(5, "base_model", message)]


def test_a_refused_key_in_another_mapping_is_an_unknown_key_there():
    assert problems(MODELS.replace("    parameters", "    modules: 1\n    parameters")) == [
        (4, "models[0].modules", "unknown key 'modules' in a model entry; allowed: model, parameters")]
    assert problems(SLICES + "        tokenizer: x\n") == [
        (6, "slices[0].sources[0].tokenizer",
         "unknown key 'tokenizer' in a slice source; allowed: model, layer_range, parameters")]
    assert problems(MODELS + "lora: x\n") == [
        (5, "lora", "unknown key 'lora'; allowed keys: " + ", ".join(parser.STEP_KEYS))]


@pytest.mark.parametrize("ref, message", [
    ("org/a+b+c", "'org/a+b+c': expected BASE+ADAPTER (one '+' between a model and a PEFT adapter)"),
    ("'a@'", "'a@': expected org/name@revision"),
    ("{path: a, revision: 3}", "a revision is a string, got 3"),
    ("[a]", "expected a model path or Hugging Face repo id, got ['a']"),
])
def test_models_entries_and_slice_sources_read_a_model_the_same_way(ref, message):
    (_, mpath, mmsg), = problems(MODELS.replace("model: a", f"model: {ref}"))
    (_, spath, smsg), = problems(SLICES.replace("model: a", f"model: {ref}"))
    assert mmsg == smsg == message
    assert mpath.removeprefix("models[0]") == spath.removeprefix("slices[0].sources[0]")


def test_problems_of_every_level_in_one_plan_keep_their_order_and_place():
    text = ("merge_method: linear\nchat_template: x\nbase_model: org/b+adapter+x\nmodels:\n  - model: a\n"
            "    modules: {}\n    parameters: {weight: 1, normalize: true}\n"
            "  - model: {model: {path: c}, override_architecture: X}\n"
            "slices:\n  - sources:\n      - model: a\n        tokenizer: x\n        layer_range: [0, 2]\n"
            "    residual_weight: 0.5\ndtype: float8\ntokenizer_source: union\ntokenizer: {source: union}\n")
    assert [(line, path) for line, path, _ in problems(text)] == [
        (15, "dtype"), (3, "base_model"), (16, "tokenizer_source"), (2, "chat_template"),
        (6, "models[0].modules"), (7, "models[0].parameters.normalize"), (8, "models[1].model"),
        (14, "slices[0].residual_weight"), (12, "slices[0].sources[0].tokenizer"), (9, "slices"),
    ]
