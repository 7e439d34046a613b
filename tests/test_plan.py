import json

import pytest

from memfit import Cast, Int4WeightOnly, Int8WeightOnly, Plan, Precision, Targets, Workload
from memfit.errors import RecipeError
from memfit.strategies import strategy_classes


def test_recipe_tokens_become_typed_strategies_in_phase_order():
    plan = Plan.parse("bf16,int4-g64")
    assert plan.strategies == (Int4WeightOnly(group_size=64), Cast(precision=Precision.BF16))
    assert plan.recipe == "int4-g64,bf16"


def test_empty_recipe_is_the_empty_plan():
    assert Plan.parse("none").strategies == ()
    assert Plan().recipe == "none"


def test_unknown_token_names_the_known_ones():
    known = ("bf16, fp16, checkpointing, checkpointing-2, bf16-master, lora-8, lowrank-mlp-50, lowrank-mlp-e50, "
             "lowrank-mlp-50-act, lowrank-mlp-e50-act, prune-50-magnitude, prune-50-wanda, prune-50-sparsegpt, "
             "prune-2of4-wanda, prune-2of4-sparsegpt, prune-2of8-magnitude, prune-mlp-25, prune-heads-50, "
             "drop-layers-1, int8, int8-gptq, int4-g32, int4-g64, int4-g128, int4-g128-gptq, int4-g128-awq, "
             "mixed-bits, mixed-bits-6-rtn, w8a8, w8a8-smooth, fp8, bf16-autocast, adamw-8bit, adafactor, sgd, "
             "grad-accum-2, ddp, fsdp")
    with pytest.raises(RecipeError, match=f"unknown recipe token 'int3'; known tokens: {known}"):
        Plan.parse("int3")


def test_bad_group_size_names_the_allowed_tokens():
    with pytest.raises(RecipeError, match=r"groups of 100.*int4-g32, int4-g64, int4-g128, int4-g256"):
        Plan.parse("int4-g100")


def test_conflicting_strategies_are_rejected():
    with pytest.raises(RecipeError, match="conflict"):
        Plan.parse("int8,int4-g128")


def test_repeated_strategy_is_rejected():
    with pytest.raises(RecipeError, match="uses 'cast' twice"):
        Plan.parse("bf16,fp16")


@pytest.mark.parametrize("cls", strategy_classes())
def test_every_example_round_trips_through_json_and_yaml(cls, tmp_path):
    for strategy in cls.examples():
        plan = Plan((strategy,), Workload(batch_size=3))
        assert Plan.from_dict(json.loads(plan.to_json())) == plan
        path = tmp_path / "recipe.yaml"
        path.write_text(plan.to_yaml())
        assert Plan.parse(str(path)) == plan
        assert Plan.parse(strategy.token).strategies == (strategy,)


def test_nested_targets_round_trip():
    plan = Plan((Int8WeightOnly(targets=Targets(include=("re:.*mlp.*",), exclude=("lm_head",))),))
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    assert again.strategies[0].targets.matches("model.layers.0.mlp.up_proj")
    assert not again.strategies[0].targets.matches("lm_head")


def test_unknown_setting_fails_and_lists_the_allowed():
    data = Plan.parse("int8").to_dict()
    data["strategies"][0]["bits"] = 3
    with pytest.raises(RecipeError, match=r"unknown setting\(s\) \['bits'\].*allowed: \['method', 'targets'\]"):
        Plan.from_dict(data)


def test_unknown_top_level_key_fails():
    with pytest.raises(RecipeError, match=r"unknown recipe key\(s\) \['steps'\]"):
        Plan.from_dict({"strategies": [], "steps": 3})


def test_version_mismatch_fails():
    data = Plan.parse("int8").to_dict()
    data["strategies"][0]["version"] = 99
    with pytest.raises(RecipeError, match="version 99"):
        Plan.from_dict(data)


def test_bad_field_value_is_a_recipe_error():
    with pytest.raises(RecipeError, match="group_size must be one of"):
        Plan.from_dict({"strategies": [{"strategy": "int4", "group_size": 48}]})


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Plan.parse(str(tmp_path / "nope.yaml"))


def test_corrupt_recipe_file_is_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(RecipeError, match="cannot parse recipe file"):
        Plan.parse(str(path))


def test_targets_match_globs_and_regexes():
    targets = Targets(include=("*.mlp.*", "re:.*q_proj"), exclude=("*layers.1.*",))
    assert targets.matches("model.layers.0.mlp.down_proj")
    assert targets.matches("model.layers.0.self_attn.q_proj")
    assert not targets.matches("model.layers.1.mlp.down_proj")
    assert not targets.matches("model.layers.0.self_attn.k_proj")


def test_bad_regex_in_targets_is_rejected():
    with pytest.raises(ValueError, match="bad regex"):
        Targets(include=("re:(",))
