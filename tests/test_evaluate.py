import copy
import math

import pytest
import torch

import memfit
from memfit.data import builtin_text, calibration_text, eval_text, read_text, token_windows
from memfit.errors import DataError
from memfit.evaluate import perplexity


def test_builtin_text_splits_into_disjoint_halves():
    whole = builtin_text()
    assert eval_text() + calibration_text() == whole
    assert abs(len(eval_text()) - len(whole) / 2) < 5_000
    assert eval_text().endswith("\n")


def test_token_windows_cut_whole_windows(make_tiny):
    _, tokenizer = make_tiny()
    windows = token_windows(tokenizer, "abcdefghij" * 30, num_tokens=250, window=64)
    assert windows.shape == (3, 64) and windows.dtype == torch.long
    assert windows[0, :3].tolist() == [97, 98, 99]


def test_windows_come_from_one_encoding_per_tokenizer_and_text(make_tiny):
    _, tokenizer = make_tiny()
    text = "A text no other test encodes. " + eval_text()[:20_000]
    calls = []
    original = type(tokenizer).__call__

    def counting(self, text, **kwargs):
        calls.append(text)
        return original(self, text, **kwargs)

    type(tokenizer).__call__ = counting
    try:
        first = token_windows(tokenizer, text, 512, 128)
        first[:] = 0  # windows are the caller's own: changing them changes nothing cached
        again = token_windows(tokenizer, text, 1024, 256)
        assert len(calls) == 1
        assert again.flatten()[:512].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"][:512]
        assert len(calls) == 2
        other = copy.deepcopy(tokenizer)  # another vocabulary encodes the same text differently
        other.add_tokens(["statement"])
        changed = token_windows(other, text, 1024, 256)
        assert len(calls) == 3 and not torch.equal(changed, again)
    finally:
        type(tokenizer).__call__ = original


def test_too_short_text_is_a_data_error(make_tiny):
    _, tokenizer = make_tiny()
    with pytest.raises(DataError, match="fewer than one window of 512"):
        token_windows(tokenizer, "short", num_tokens=1024, window=512)


def test_read_text_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  ")
    with pytest.raises(DataError, match="is empty"):
        read_text(tmp_path / "empty.txt")


def test_perplexity_is_exp_of_mean_next_token_loss(make_tiny):
    model, tokenizer = make_tiny()
    windows = token_windows(tokenizer, eval_text(), 256, 128)
    with torch.no_grad():
        logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), windows[:, 1:].reshape(-1))
    assert perplexity(model, windows) == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_evaluate_reports_every_metric(make_tiny):
    model, tokenizer = make_tiny()
    metrics = memfit.evaluate(model, tokenizer, num_tokens=1024)
    assert metrics.eval_tokens == 1024
    assert metrics.weight_bytes == 361_792
    assert 100 < metrics.perplexity < 1000  # random weights over 256 byte tokens: near uniform
    assert metrics.prefill_tokens_per_s > 0 and metrics.decode_tokens_per_s > 0
    assert metrics.peak_rss_bytes > 100e6
    assert set(metrics.to_dict()) == {
        "perplexity", "eval_tokens", "weight_bytes", "peak_rss_bytes", "prefill_tokens_per_s", "decode_tokens_per_s"
    }
