"""Prediction equals measurement: `estimate` runs the workload on fake tensors under the same tracker."""

import pytest
import torch

import memfit
from conftest import TINY_NAMES
from memfit.profile import profile
from memfit.workload import Mode, Workload

WORKLOADS = {
    "infer": Workload(batch_size=2, seq_len=48),
    "generate": Workload(mode=Mode.GENERATE, batch_size=3, seq_len=20, new_tokens=5),
    "train": Workload(mode=Mode.TRAIN, batch_size=2, seq_len=48),
}


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("recipe", ["none", "int8", "int4-g32", "bf16", "bf16-autocast,checkpointing", "bf16,sgd"])
@pytest.mark.parametrize("mode", list(WORKLOADS))
def test_prediction_equals_tracked_measurement(make_tiny, name, recipe, mode):
    model, _ = make_tiny(name)
    workload = WORKLOADS[mode]
    predicted = memfit.estimate(model, recipe, workload)
    plan = memfit.Plan.parse(recipe)
    memfit.apply(model, plan)
    measured = profile(model, workload, plan.run)  # run settings are passed, never read from the model
    assert predicted.peak_bytes == measured.peak_bytes
    assert predicted.by_category == measured.by_category
    assert predicted.by_module == measured.by_module


def test_training_profile_leaves_the_weights_unchanged(make_tiny):
    model, _ = make_tiny("tiny-llama")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    report = profile(model, WORKLOADS["train"])
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    params = sum(p.numel() * 4 for p in model.parameters())
    # the peak comes in the second step, with AdamW's two moments and step counters allocated
    assert report.by_category["optimizer_state"] == 2 * params + 4 * len(list(model.parameters()))


def test_estimate_allocates_nothing_real(make_tiny):
    model, _ = make_tiny("tiny-llama")
    big = Workload(mode=Mode.TRAIN, batch_size=64, seq_len=1024)
    report = memfit.estimate(model, "none", big)
    # logits alone: 64 x 1024 x 256 fp32 = 64 MiB, far above what this test process could hide
    assert report.peak_bytes > 64 * 1024 * 256 * 4
    assert report.by_category["parameters"] == memfit.weight_bytes(model) - 64  # rotary buffers apart


def test_max_batch_size_is_the_largest_that_fits(make_tiny):
    from memfit.errors import BudgetError
    from memfit.estimate import max_batch_size

    model, _ = make_tiny("tiny-llama")
    workload = Workload(mode=Mode.TRAIN, seq_len=32)
    budget = 6_000_000
    batch = max_batch_size(model, budget, workload)
    at = lambda b: memfit.estimate(model, "none", Workload(mode=Mode.TRAIN, batch_size=b, seq_len=32)).peak_bytes
    assert batch > 1
    assert at(batch) <= budget < at(batch + 1)
    assert profile(model, Workload(mode=Mode.TRAIN, batch_size=batch, seq_len=32)).peak_bytes <= budget
    with pytest.raises(BudgetError, match=r"batch size 1 needs .* over the budget of 1 MB"):
        max_batch_size(model, "1MB", workload)


def _kv_formula(config, batch: int, tokens: int, bytes_per_element: int) -> int:
    """The runtime's static cache: prompt plus new tokens rounded up to the engine's cache step."""
    from memfit.runtime.engine import cache_length

    tokens = cache_length(tokens, config.max_position_embeddings)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * batch * bytes_per_element


@pytest.mark.parametrize("name", TINY_NAMES)
def test_generation_kv_cache_is_exactly_the_formula(make_tiny, name):
    model, _ = make_tiny(name)
    workload = Workload(mode=Mode.GENERATE, batch_size=3, seq_len=20, new_tokens=7)
    expected = _kv_formula(model.config, 3, 20 + 7, 4)
    assert profile(model, workload).by_category["kv_cache"] == expected
    assert memfit.estimate(model, "none", workload).by_category["kv_cache"] == expected
    assert memfit.estimate(model, "bf16", workload).by_category["kv_cache"] == expected // 2


def test_bundled_llama_3_70b_counts_every_parameter():
    # 80 layers x (2 x 8192^2 attention q/o + 2 x 8192 x 1024 k/v + 3 x 8192 x 28672 MLP + 2 x 8192
    # norms) + final norm + untied embedding and head of 128256 x 8192.
    params = 70_553_706_496
    assert memfit.estimate("llama-3-70b").by_category["parameters"] == 4 * params
    assert memfit.estimate("llama-3-70b", "bf16").by_category["parameters"] == 2 * params


def test_bundled_llama_3_70b_training_step_is_predicted_in_seconds():
    import time

    start = time.perf_counter()
    report = memfit.estimate("llama-3-70b", "none", Workload(mode=Mode.TRAIN, batch_size=1, seq_len=4096))
    assert time.perf_counter() - start < 60
    params = 4 * 70_553_706_496
    by = report.by_category
    assert by["parameters"] == by["gradients"] == params
    # AdamW: two moments per parameter, and a 4-byte step counter per parameter tensor (723 of them)
    assert by["optimizer_state"] == 2 * params + 4 * 723
    assert report.peak_bytes == sum(by.values())


@pytest.mark.parametrize("ref", ["llama-3-8b", "mistral-7b", "qwen2.5-7b"])
def test_bundled_configs_predict_generation_from_shapes(ref):
    from memfit.io import skeleton

    config = skeleton(ref).config
    report = memfit.estimate(ref, "bf16", Workload(mode=Mode.GENERATE, batch_size=2, seq_len=16, new_tokens=4))
    assert report.by_category["kv_cache"] == _kv_formula(config, 2, 20, 2)
    assert report.by_category["parameters"] > 7e9 * 2


def test_config_json_and_model_directory_give_the_loaded_models_bytes(make_tiny, tmp_path):
    model, tokenizer = make_tiny("tiny-qwen2")
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    loaded, _ = memfit.load(tmp_path / "hf")
    expected = memfit.estimate(loaded, "int8")
    assert memfit.estimate(tmp_path / "hf", "int8") == expected
    assert memfit.estimate(tmp_path / "hf" / "config.json", "int8").weight_bytes == expected.weight_bytes
    memfit.apply(loaded, "int4-g32")
    memfit.save(loaded, tokenizer, tmp_path / "int4")
    assert memfit.estimate(tmp_path / "int4").weight_bytes == memfit.weight_bytes(memfit.load(tmp_path / "int4")[0])


def test_unknown_model_or_config_is_a_clear_error(tmp_path):
    with pytest.raises(memfit.ModelNotFoundError, match=r"'llama-9' not found.*bundled config: llama-3-70b"):
        memfit.estimate("llama-9")
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 4}')
    with pytest.raises(memfit.ModelNotFoundError, match=r"cannot read a model config .*KeyError.*model_type"):
        memfit.estimate(bad)


@pytest.mark.parametrize("recipe", ["int8", "int4-g32", "int4-g64,bf16"])
def test_quantized_parameter_bytes_equal_the_compressed_models(make_tiny, recipe):
    model, _ = make_tiny("tiny-qwen2")
    predicted = memfit.estimate(model, recipe, WORKLOADS["train"])
    memfit.apply(model, recipe)
    assert predicted.weight_bytes == memfit.weight_bytes(model)


@pytest.mark.parametrize("mode", ["infer", "generate"])
def test_prediction_of_bitmask_sparse_layers_equals_tracked_measurement(make_tiny, mode):
    # their bit table is a module-level constant, a real tensor among the fake ones of a prediction
    model, _ = make_tiny("tiny-llama")
    predicted = memfit.estimate(model, "prune-50-magnitude", WORKLOADS[mode])
    memfit.apply(model, "prune-50-magnitude")
    assert predicted == profile(model, WORKLOADS[mode])
