"""Pruning acceptance on the demo model (SmolLM2-135M-Instruct): quality against dense, bytes held,
and SparseGPT's calibration memory. Marked slow; the full-size figures are in docs/benchmarks.md.

Perplexity is scored on 2,048 evaluation tokens and the calibration statistics come from 16
windows of 512 tokens of the calibration half (the benchmark uses 32 and 4,096).
"""

import copy

import pytest

import memfit
from memfit.compress import predict_calibration_memory
from memfit.data import calibration_windows
from memfit.memory.report import weight_bytes
from memfit.memory.tracker import track
from memfit.models.arch import decoder_parts

pytestmark = pytest.mark.slow

TOKENS = 2048
WINDOWS = 16


def _linear_bytes(model) -> int:
    return sum(weight_bytes(layer.self_attn) + weight_bytes(layer.mlp) for layer in decoder_parts(model).layers)


@pytest.fixture(scope="module")
def pruned(demo):
    """recipe -> (perplexity, decoder Linear bytes), and the dense figures under "dense"; under
    "streamed", SparseGPT's tracked peak and predicted peak (bytes): ``prune-50-sparsegpt`` reads
    the checkpoint layer by layer under the tracker, as `memfit compress` does."""
    from memfit.models.load import load_lazy

    model, tokenizer = demo
    calibration = calibration_windows(tokenizer, windows=WINDOWS)
    score = lambda m: memfit.evaluate(m, tokenizer, num_tokens=TOKENS, measure_speed=False).perplexity
    results = {"dense": (score(model), _linear_bytes(model))}
    for recipe in ("prune-50-magnitude", "prune-50-wanda", "prune-50-sparsegpt",
                   "prune-2of4-wanda", "prune-2of4-sparsegpt"):
        if recipe == "prune-50-sparsegpt":
            work, _, source = load_lazy("demo")
            plan = memfit.Plan.parse(recipe)
            predicted = predict_calibration_memory(work, plan, calibration, source=source).peak_bytes
            with track() as tracker:
                memfit.apply(work, plan, memfit.Context(calibration=calibration, source=source))
                source.materialize(work)
            results["streamed"] = (tracker.report().peak_bytes, predicted)
        else:
            work = copy.deepcopy(model)
            memfit.apply(work, recipe, memfit.Context(calibration=calibration))
        results[recipe] = (score(work), _linear_bytes(work))
        del work
    return results


@pytest.mark.xdist_group("demo-prune")  # one worker computes the module's pruned models
def test_calibrated_pruning_keeps_perplexity_within_twice_dense_and_sparsegpt_leads(pruned):
    dense = pruned["dense"][0]
    ratio = {recipe: perplexity / dense for recipe, (perplexity, _) in pruned.items() if recipe != "streamed"}
    assert ratio["prune-50-magnitude"] > 10  # far above: zeroing the smallest weights is not enough
    assert ratio["prune-50-wanda"] <= 2.0, ratio
    assert ratio["prune-50-sparsegpt"] <= min(2.0, ratio["prune-50-wanda"]), ratio
    assert ratio["prune-2of4-sparsegpt"] <= min(5.0, ratio["prune-2of4-wanda"]), ratio


@pytest.mark.xdist_group("demo-prune")  # one worker computes the module's pruned models
def test_pruned_linears_hold_at_most_56_percent_of_their_dense_bytes(pruned):
    dense_bytes = pruned["dense"][1]
    for recipe, (_, held) in pruned.items():
        if recipe not in ("dense", "streamed"):
            assert held / dense_bytes <= 0.56, (recipe, held / dense_bytes)


def test_sparse_int8_holds_at_most_16_percent_of_dense_fp32(demo):
    model, _ = demo
    predicted = memfit.estimate(model, "prune-50-magnitude,int8")
    work = copy.deepcopy(model)
    memfit.apply(work, "prune-50-magnitude,int8")
    assert weight_bytes(work) == predicted.weight_bytes
    assert _linear_bytes(work) / _linear_bytes(model) <= 0.16


@pytest.mark.xdist_group("demo-prune")  # one worker computes the module's pruned models
def test_streamed_sparsegpt_peak_stays_under_the_model_plus_two_layers(demo, pruned):
    """The whole fp32 model plus two decoder layers' working set (weights, calibration inputs and
    outputs, X^T X sums) bounds the tracked peak; the prediction made before the run is within 1%."""
    dense, tokenizer = demo
    peak, predicted = pruned["streamed"]
    config = dense.config
    layer = weight_bytes(decoder_parts(dense).layers[0])
    hidden = 2 * WINDOWS * 512 * config.hidden_size * 4  # one layer's inputs and outputs
    sums = 4 * (3 * config.hidden_size**2 + config.intermediate_size**2)  # q/k/v, o, gate/up, down
    bound = weight_bytes(dense) + 2 * (layer + hidden + sums)
    assert peak < bound, (peak, bound)
    assert abs(predicted / peak - 1) <= 0.01, (predicted, peak)


_PLAIN_PERPLEXITY = """
import math, sys
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

windows = load_file(sys.argv[1])["windows"]
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).eval()
nll, count = 0.0, 0
with torch.no_grad():
    for ids in windows:
        logits = model(ids[None], use_cache=False).logits[0]
        nll += F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum").item()
        count += len(ids) - 1
assert "memfit" not in sys.modules
print(math.exp(nll / count), model.config.num_hidden_layers, model.config.num_key_value_heads,
      model.config.intermediate_size)
"""


def test_structurally_pruned_demo_is_a_plain_checkpoint_with_the_same_perplexity(demo, tmp_path):
    """Layers, key/value groups and MLP channels removed: bytes as predicted, and plain transformers
    (no memfit imported) loads the saved directory and scores the same perplexity as memfit."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from memfit.data import eval_text, token_windows

    model, tokenizer = demo
    recipe = "drop-layers-4,prune-heads-25,prune-mlp-25"
    predicted = memfit.estimate(model, recipe).weight_bytes
    work = copy.deepcopy(model)
    memfit.apply(work, recipe, memfit.Context(calibration=calibration_windows(tokenizer, windows=4)))
    assert weight_bytes(work) == predicted
    assert (work.config.num_hidden_layers, work.config.num_key_value_heads) == (26, 2)
    assert work.config.intermediate_size == 1536 - 384
    ours = memfit.evaluate(work, tokenizer, num_tokens=TOKENS, measure_speed=False).perplexity
    memfit.save(work, tokenizer, tmp_path / "pruned")
    save_file({"windows": token_windows(tokenizer, eval_text(), TOKENS, 512)}, str(tmp_path / "windows.safetensors"))
    script = tmp_path / "plain.py"
    script.write_text(_PLAIN_PERPLEXITY)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "windows.safetensors"), str(tmp_path / "pruned")],
                         check=True, capture_output=True, text=True).stdout.split()
    assert [int(x) for x in out[1:]] == [26, 2, 1152]
    assert float(out[0]) == pytest.approx(ours, rel=1e-5)
