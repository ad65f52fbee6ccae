"""Parameter settings: gradients, filters and precedence, against hand-worked values."""

import pytest

from mergekit_lite.arch import detect
from mergekit_lite.plan.params import evaluate, interpolate, resolve


def test_scalar_is_returned_as_is():
    assert evaluate(0.3, "model.layers.0.mlp.up_proj.weight", 0.7) == 0.3
    assert evaluate(True, "x", 0.5) is True


@pytest.mark.parametrize("t,expected", [(0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (0.75, 0.75), (1.0, 1.0)])
def test_two_point_gradient_is_linear(t, expected):
    assert interpolate([0, 1], t) == pytest.approx(expected)


def test_five_point_gradient_matches_hand_computation():
    # mergekit's gradient-slerp example: [0, 0.5, 0.3, 0.7, 1]; t=0.6 -> scaled 2.4 -> 0.3 + 0.4*(0.7-0.3)
    values = [0, 0.5, 0.3, 0.7, 1]
    assert interpolate(values, 0.6) == pytest.approx(0.46)
    assert interpolate(values, 1 / 3) == pytest.approx(0.5 + (4 / 3 - 1) * (0.3 - 0.5))
    assert interpolate(values, 1.0) == 1


def test_non_numeric_list_is_a_step_function():
    assert interpolate(["a", "b", "c"], 0.49) == "a"
    assert interpolate(["a", "b", "c"], 0.5) == "b"
    assert interpolate([True, False], 1.0) is False


def test_filters_first_substring_match_wins():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.2}, {"value": 0.9}]
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 0) == 0.1
    assert evaluate(setting, "transformer.h.1.attn.c_attn.weight", 0) == 0.2
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", 0) == 0.9


def test_filter_value_can_be_a_gradient():
    setting = [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]
    assert evaluate(setting, "model.layers.3.mlp.up_proj.weight", 0.25) == pytest.approx(0.25)
    assert evaluate(setting, "model.norm.weight", 0.25) == 0.5


def test_no_match_falls_through_to_next_scope():
    per_model = {"weight": [{"filter": "mlp", "value": 2.0}]}
    top = {"weight": 1.0}
    assert resolve("weight", [per_model, top], "model.layers.0.mlp.up_proj.weight", 0) == 2.0
    assert resolve("weight", [per_model, top], "model.layers.0.self_attn.q_proj.weight", 0) == 1.0
    assert resolve("weight", [{}, None], "x", 0) is None


def test_layer_position_t():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.embed_tokens.weight",
                                                                          "lm_head.weight"]
    arch = detect(names, {"num_hidden_layers": 5})
    assert arch.prefix == "model.layers." and arch.num_layers == 5 and arch.layer_key == "num_hidden_layers"
    assert [arch.t(f"model.layers.{i}.mlp.up_proj.weight") for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert arch.t("model.embed_tokens.weight") == 0 and arch.t("lm_head.weight") == 0
    assert arch.section("model.embed_tokens.weight") == "pre" and arch.section("lm_head.weight") == "post"
