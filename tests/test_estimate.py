"""Prediction equals measurement: `estimate` runs the workload on fake tensors under the same tracker."""

import pytest
import torch

import memfit
from conftest import TINY_NAMES
from memfit.memory.workload import profile
from memfit.plan import Mode, Workload

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
    memfit.apply(model, recipe)
    measured = profile(model, workload)
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
    from memfit.memory.estimate import max_batch_size

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
