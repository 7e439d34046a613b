"""The conformance suite: every registered strategy's examples, on every tiny architecture.

A strategy added to the registry is tested here automatically; one without examples fails.
"""

import pytest
import torch
from torch import nn

import memfit
from conftest import TINY_NAMES
from memfit.memory.report import weight_report
from memfit.models.meta import meta_copy
from memfit.strategies import strategy_classes
from memfit.strategies.quantize.packed import Int4Linear, Int8Embedding, Int8Linear, PackedModule
from memfit.strategies.training import LoRA
from memfit.testing import sqnr_db

EXAMPLES = [(cls, s) for cls in strategy_classes() for s in cls.examples()]
IDS = [s.token for _, s in EXAMPLES]


def test_every_registered_strategy_has_examples():
    for cls in strategy_classes():
        assert cls.examples(), f"{cls.__name__} has no examples()"


def _structure(model: nn.Module) -> dict:
    tensors = {n: (tuple(t.shape), t.dtype) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    return {"modules": [(n, type(m).__name__) for n, m in model.named_modules()], "tensors": tensors}


def _model_state(model: nn.Module) -> dict:
    """What a strategy may change: modules, shapes, dtypes, which tensors train, and the modules'
    switches (activation checkpointing)."""
    switches = [(n, getattr(m, "gradient_checkpointing", None)) for n, m in model.named_modules()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return {**_structure(model), "switches": switches, "trainable": trainable}


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize(("cls", "strategy"), EXAMPLES, ids=IDS)
def test_strategy_conformance(make_tiny, tokens, name, cls, strategy, tmp_path):
    model, tokenizer = make_tiny(name)
    before_bytes = weight_report(model).weight_bytes
    with torch.no_grad():
        baseline = model(tokens).logits
    dry = meta_copy(model)
    before_state = _model_state(model)

    # calibrated methods fit on other text than the tokens they are scored on
    calibration = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(2))
    ctx = memfit.Context(calibration=calibration)
    memfit.apply(model, memfit.Plan((strategy,)), ctx)
    with torch.no_grad():
        out = model(tokens).logits
    # a strategy that settles choices on data (mixed-bits' widths) records them; the recorded plan
    # is what a dry run, a prediction and a reload must reproduce exactly
    recorded = memfit.Plan(model.memfit_plan.strategies)
    predicted = memfit.estimate(dry, recorded)
    memfit.apply(dry, recorded)

    # 1. it happened: a strategy changes the model (how a step runs is a run setting, not a strategy)
    assert _model_state(model) != before_state, f"{strategy.token} left the model as it was"
    assert model.memfit_plan.strategies == (ctx.resolved.get(strategy, strategy),)
    assert (ctx.resolved != {}) == strategy.resolves
    if isinstance(strategy, (memfit.Int8WeightOnly, memfit.Int4WeightOnly)):
        assert not any(type(m) is nn.Linear for m in model.modules())
        assert isinstance(model.get_input_embeddings(), Int8Embedding)
        assert isinstance(model.get_output_embeddings(), Int8Linear)
        if isinstance(strategy, memfit.Int4WeightOnly):
            linears = [m for m in model.modules() if isinstance(m, Int4Linear)]
            assert linears and all(m.qweight.dtype == torch.uint8 for m in linears)
            assert all(m.qweight.shape[1] * 2 == m.in_features for m in linears)  # two values per byte
    if isinstance(strategy, memfit.Cast):
        floats = [p for p in model.parameters() if p.is_floating_point()]
        assert floats and all(p.dtype == strategy.precision.dtype for p in floats)
    # 2. fidelity above the floor the class declares; lossless strategies change no output bit
    if cls.sqnr_floor_db is None:
        assert torch.equal(out, baseline)
    else:
        assert not torch.equal(out.float(), baseline), "a lossy strategy changed nothing"
        assert sqnr_db(baseline, out) >= cls.sqnr_floor_db

    # 3. memory is real: weight bytes fell if the strategy says it saves them (training-time
    # strategies are checked in test_training_strategies_shrink_what_they_claim), and the
    # prediction equals the measurement per category
    measured = weight_report(model)
    if "parameters" in cls.saves:
        assert measured.weight_bytes < before_bytes
    elif isinstance(strategy, LoRA):  # adds its adapters: rank 8 on 64-wide layers, about a quarter
        assert before_bytes < measured.weight_bytes < 1.3 * before_bytes
    else:
        assert measured.weight_bytes == before_bytes
    assert measured.by_category == predicted.by_category
    assert measured.by_module == predicted.by_module

    # 4. dry run equals real run
    assert _structure(dry) == _structure(model)

    # 5. save and load give the same tensors, bytes and outputs
    memfit.save(model, tokenizer, tmp_path / "out")
    loaded, _ = memfit.load(tmp_path / "out")
    assert _structure(loaded) == _structure(model)
    assert weight_report(loaded).weight_bytes == measured.weight_bytes
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, out)


def test_tied_embedding_and_head_share_packed_storage(make_tiny):
    model, _ = make_tiny("tiny-llama")
    memfit.apply(model, "int8")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.qweight is embedding.qweight and head.scale is embedding.scale


def test_untied_head_is_quantized_separately(make_tiny):
    model, _ = make_tiny("tiny-qwen2")
    memfit.apply(model, "int4-g32")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(head, Int8Linear) and head.qweight is not embedding.qweight


def test_golden_weight_bytes_of_tiny_llama(make_tiny):
    model, _ = make_tiny("tiny-llama")
    # fp32: embedding 256*64 (tied with the head); per layer q 64*64, k 32*64, v 32*64, o 64*64,
    # gate/up 128*64, down 64*128, two norms of 64; a final norm of 64; rotary inv_freq and
    # original_inv_freq buffers of 8 each. 4 bytes per value.
    per_layer = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128 + 2 * 64
    fp32 = 4 * (256 * 64 + 2 * per_layer + 64 + 8 + 8)
    assert weight_report(model).weight_bytes == fp32 == 361_792
    # int8: each Linear N*K bytes + N bf16 scales; the embedding 256*64 + 256 bf16 scales, shared with
    # the head; norms and rotary buffers stay fp32.
    outputs = 64 + 32 + 32 + 64 + 128 + 128 + 64
    linear_int8 = (per_layer - 2 * 64) + 2 * outputs
    int8 = 2 * (linear_int8 + 4 * 2 * 64) + (256 * 64 + 2 * 256) + 4 * (64 + 8 + 8)
    assert memfit.estimate(model, "int8").weight_bytes == int8 == 94_016
    # int4-g32: each Linear N*K/2 bytes + (K/32) groups * N * 3 bytes (bf16 scale + uint8 zero point).
    groups = 64 * 2 + 32 * 2 + 32 * 2 + 64 * 2 + 128 * 2 + 128 * 2 + 64 * 4
    linear_int4 = (per_layer - 2 * 64) // 2 + 3 * groups
    int4 = 2 * (linear_int4 + 4 * 2 * 64) + (256 * 64 + 2 * 256) + 4 * (64 + 8 + 8)
    assert memfit.estimate(model, "int4-g32").weight_bytes == int4


def test_packed_modules_hold_no_float_weight(make_tiny):
    model, _ = make_tiny("tiny-llama")
    memfit.apply(model, "int4-g64")
    for module in model.modules():
        if isinstance(module, PackedModule):
            assert not hasattr(module, "weight")
            assert all(not t.is_floating_point() or t.dtype == torch.bfloat16 for t in module.buffers())


def test_targets_exclude_keeps_modules_in_float(make_tiny):
    model, _ = make_tiny("tiny-qwen2")
    strategy = memfit.Int8WeightOnly(targets=memfit.Targets(exclude=("lm_head", "*mlp*")))
    memfit.apply(model, memfit.Plan((strategy,)))
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)


def test_applying_the_same_strategy_twice_is_refused(make_tiny):
    model, _ = make_tiny("tiny-llama")
    memfit.apply(model, "int8")
    with pytest.raises(memfit.RecipeError, match="uses 'int8' twice"):
        memfit.apply(model, "int8")


def test_int4_notes_the_group_size_it_used(make_tiny):
    model, _ = make_tiny("tiny-llama")
    ctx = memfit.Context()
    memfit.apply(model, "int4-g128", ctx)
    assert any("input width 64 (not a multiple of 128) use groups of 64" in n for n in ctx.notes)
    assert {m.group_size for m in model.modules() if isinstance(m, Int4Linear)} == {64, 128}


TRAINING_CATEGORIES = {"activations", "gradients", "optimizer_state"}


@pytest.mark.parametrize(("cls", "strategy"), [e for e in EXAMPLES if e[0].saves & TRAINING_CATEGORIES],
                         ids=[s.token for c, s in EXAMPLES if c.saves & TRAINING_CATEGORIES])
def test_training_strategies_shrink_what_they_claim(make_tiny, cls, strategy):
    from memfit.profile import profile

    workload = memfit.Workload(mode=memfit.Mode.TRAIN, batch_size=2, seq_len=256)
    model, _ = make_tiny("tiny-llama")
    baseline = profile(model, workload)
    memfit.apply(model, memfit.Plan((strategy,)))
    after = profile(model, workload)
    assert after.peak_bytes < baseline.peak_bytes
    for category in cls.saves & TRAINING_CATEGORIES:
        assert after.by_category[category] < baseline.by_category[category], category


@pytest.mark.parametrize("token", [t for t in memfit.settings.setting_examples() if t not in ("ddp", "fsdp")])
def test_run_settings_shrink_what_they_claim(make_tiny, token):
    from memfit.profile import profile
    from memfit.settings import SETTINGS

    plan = memfit.Plan.parse(token)
    saves = next(s.saves for s in SETTINGS if getattr(plan.settings, s.field) is not None)
    workload = (memfit.Workload(mode=memfit.Mode.GENERATE, batch_size=2, seq_len=64, new_tokens=64)
                if token.startswith("kv-") else memfit.Workload(mode=memfit.Mode.TRAIN, batch_size=2, seq_len=256))
    model, _ = make_tiny("tiny-llama")
    baseline = profile(model, workload)
    after = profile(model, workload, plan.run)
    assert saves and after.peak_bytes < baseline.peak_bytes
    for category in saves:
        assert after.by_category[category] < baseline.by_category[category], category
