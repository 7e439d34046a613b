"""The live tracker: exact byte counts on toy models, categories, frees and module attribution."""

import torch
from torch import nn

import memfit
from memfit.memory.tracker import track


def _toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))


def test_forward_peak_and_module_attribution_are_exact():
    model = _toy()
    x = torch.randn(8, 64)
    with torch.no_grad(), track(model) as tracker:
        y = model(x)
    report = tracker.report()
    # weights: (64*256 + 256 + 256*64 + 64) fp32 values; x existed before and is not counted.
    assert report.by_category["parameters"] == 4 * (64 * 256 + 256 + 256 * 64 + 64)
    # Linear(64->256) output [8, 256] and ReLU's new output of the same size are live together.
    assert report.by_category["activations"] == 2 * 4 * 8 * 256
    assert report.peak_bytes == report.by_category["parameters"] + 2 * 4 * 8 * 256
    # by module at the peak (inside ReLU): the weights a module holds plus what it allocated
    # that is still live; Linear 2 has not run yet
    assert dict(report.by_module) == {
        "0": 4 * (64 * 256 + 256) + 4 * 8 * 256,
        "1": 4 * 8 * 256,
        "2": 4 * (256 * 64 + 64),
    }
    assert sum(b for _, b in report.by_module) == report.peak_bytes
    assert tracker.live["activations"] == y.untyped_storage().nbytes()  # only the returned output is left


def test_everything_allocated_inside_is_freed_when_dropped(make_tiny, tokens):
    model, _ = make_tiny("tiny-llama")
    with torch.no_grad(), track(model) as tracker:
        logits = model(tokens, use_cache=False).logits
        del logits
    assert tracker.live_bytes == memfit.weight_bytes(model)
    report = tracker.report()
    assert report.by_category["parameters"] + report.by_category["buffers"] == memfit.weight_bytes(model)
    assert report.peak_bytes > memfit.weight_bytes(model)
    assert sum(b for _, b in report.by_module) == report.peak_bytes
    assert any(name.startswith("model.layers.") and "mlp" in name for name, _ in report.by_module)


def test_gradients_and_adamw_state_are_recognised(make_tiny, tokens):
    model, _ = make_tiny("tiny-llama")
    params = list(model.parameters())
    param_bytes = sum(p.untyped_storage().nbytes() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    with track(model, optimizer) as tracker:
        loss = model(tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        assert tracker.live["gradients"] == param_bytes
        optimizer.step()
        # exp_avg and exp_avg_sq per parameter, plus a 4-byte step counter per parameter
        assert tracker.live["optimizer_state"] == 2 * param_bytes + 4 * len(params)
        optimizer.zero_grad(set_to_none=True)
        assert tracker.live["gradients"] == 0


def test_kv_cache_held_by_the_tracker_matches_the_formula(make_tiny):
    model, _ = make_tiny("tiny-llama")
    config = model.config
    batch, prompt = 3, 20
    ids = torch.randint(0, 256, (batch, prompt))
    with torch.no_grad(), track(model) as tracker:
        out = model(ids, use_cache=True)
        tracker.hold(out.get("cache") if out.get("cache") is not None else out.get("past_key_values"))
    head_dim = config.hidden_size // config.num_attention_heads
    expected = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * prompt * batch * 4
    assert tracker.live["kv_cache"] == expected


def test_timeline_ends_where_live_bytes_are():
    model = _toy()
    with torch.no_grad(), track(model) as tracker:
        model(torch.randn(4, 64))
    timeline = tracker.timeline()
    index, last = timeline[-1]
    assert index == len(timeline) - 1
    assert sum(last.values()) == tracker.live_bytes
    assert max(sum(c.values()) for _, c in timeline) == tracker.report().peak_bytes
    thinned = tracker.timeline(points=3)
    assert len(thinned) < len(timeline) and thinned[-1] == timeline[-1]
    assert max(sum(c.values()) for _, c in thinned) == tracker.report().peak_bytes


def test_fake_tensors_give_the_same_report_as_real_ones():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run():
        model = _toy()
        with torch.no_grad(), track(model) as tracker:
            model(torch.randn(8, 64))
        return tracker.report()

    real = run()
    with FakeTensorMode():
        fake = run()
    assert fake == real
