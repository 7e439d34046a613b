"""Training the demo model (SmolLM2-135M), at a scale CI affords; the full-scale figures are in
docs/benchmarks.md (benchmarks/training.py)."""

from __future__ import annotations

import pytest

import memfit
from memfit.workload import Mode, Workload

pytestmark = pytest.mark.slow


def test_lora_fine_tune_lowers_perplexity_on_the_held_out_half():
    model, tokenizer = memfit.load("demo")
    before = memfit.evaluate(model, tokenizer, num_tokens=2048, measure_speed=False).perplexity
    result = memfit.train(model, tokenizer, steps=12, batch=2, seq=128, recipe="lora-8", lr=2e-3, device="cpu")
    after = memfit.evaluate(result.model.eval(), tokenizer, num_tokens=2048, measure_speed=False).perplexity
    assert after < 0.97 * before, (before, after)


def test_demo_training_peak_is_predicted():
    # one run through every new path: a packed base's backward, LoRA, re-cast autocast, 8-bit AdamW
    recipe = "int4-g128,bf16-autocast,lora-8,adamw-8bit"
    model, tokenizer = memfit.load("demo")
    workload = Workload(mode=Mode.TRAIN, batch_size=1, seq_len=128)
    predicted = memfit.estimate(model, recipe, workload).peak_bytes
    baseline = memfit.estimate(model, "none", workload).peak_bytes
    result = memfit.train(model, tokenizer, steps=2, batch=1, seq=128, recipe=recipe, device="cpu")
    assert abs(predicted - result.peak_bytes[0]) <= 0.01 * result.peak_bytes[0]
    assert result.peak_bytes[0] < baseline
