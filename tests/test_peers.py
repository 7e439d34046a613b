"""benchmarks/peers.py: each peer config runs on tiny-llama, keeps its SQNR floor, and holds
exactly the bytes worked out by hand from the layer shapes and each library's storage format.

A case is skipped when its library is not installed (the peers are optional benchmark deps).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from memfit.data import token_windows
from memfit.memory.report import weight_bytes
from memfit.models.tiny import tiny_model
from memfit.testing import sqnr_db

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
_spec = importlib.util.spec_from_file_location("memfit_bench_peers", _PATH)
peers = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = peers  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(peers)

CONFIGS = {c.name: c for c in peers.PEER_CONFIGS}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On a shared 2-core box every parallel op pays a thread wake-up (~8 ms); hqq's solver runs
    # hundreds of tiny ops per layer, so one thread keeps this module well under 30 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _skip_unless_runs(config) -> None:
    pytest.importorskip(peers.LIBRARY_MODULES[config.library])
    if not config.available():
        pytest.skip(f"{config.name} does not run here: {config.unavailable_reason()}")


TOKENS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))  # [B, T]


@functools.cache
def _reference():
    model, _ = tiny_model("tiny-llama")
    with torch.inference_mode():
        return model, model(TOKENS).logits  # [2, 48, 256]


@functools.cache
def _quantized(name: str):
    model = CONFIGS[name].apply(tiny_model("tiny-llama")[0])
    with torch.inference_mode():
        return model, model(TOKENS).logits


# ---- bytes by hand ---------------------------------------------------------------------------------
# Per Linear with weight [n, k] (tiny-llama has no biases). Groups of g weights along k.

def _torchao_int8(n, k):  # Int8Tensor: int8 data, fp32 scale and int8 zero point per row
    return n * k + 4 * n + n


def _float8(n, k):  # Float8Tensor: e4m3 data, fp32 scale per row
    return n * k + 4 * n


def _torchao_int4(g):  # Int4OpaqueTensor on a bf16 model: two values a byte, bf16 (scale, zero) per group
    return lambda n, k: n * k // 2 + 4 * n * (k // g) if k % g == 0 else 2 * n * k  # else left bf16


def _intx_int4(g):  # IntxUnpackedToInt8Tensor: one int8 per 4-bit value, fp32 scale + int8 zero per group
    return lambda n, k: n * k + 5 * n * (k // g)


def _quanto_int8(n, k):  # int8 data, fp32 scale per row, QLinear's input/output scale scalars
    return n * k + 4 * n + 8


def _quanto_int4(n, k):  # packed 4-bit, fp32 scale + shift per row (per-row since k <= 128), scalars
    assert k <= 128, "quanto groups by 128/96/64/32 past 128 inputs"
    return n * k // 2 + 8 * n + 8


def _hqq(nbits, g, meta_bytes=4):  # W_q packed over the flattened weight, scale + zero per group
    def count(n, k):
        num_groups = n * k // g
        w_q = math.ceil(num_groups / 10) * g * 4 if nbits == 3 else n * k * nbits // 8  # 3-bit: 10 per int32
        return w_q + 2 * meta_bytes * num_groups

    return count


# name -> (bytes of one quantized Linear, lm_head quantized, bytes per unquantized element)
EXPECTED: dict[str, tuple[Callable[[int, int], int], bool, int]] = {
    "torchao int8wo": (_torchao_int8, True, 4),
    "torchao int8-dyn-act-int8wo (w8a8)": (_torchao_int8, True, 4),
    "torchao float8wo": (_float8, True, 4),
    "torchao int4wo-g32": (_torchao_int4(32), True, 2),  # these cast the model to bf16 first
    "torchao int4wo-g64": (_torchao_int4(64), True, 2),
    # Only down_proj (k = 128) is quantized; lm_head (k = 64) keeps the embedding's storage.
    "torchao int4wo-g128": (_torchao_int4(128), False, 2),
    "torchao int4wo-g128 plain": (_torchao_int4(128), True, 4),
    "torchao int8-dyn-act-int4wo-g32 (da8w4)": (_torchao_int4(32), True, 4),
    "torchao intx-int4wo-g32": (_intx_int4(32), True, 4),
    "quanto qint8": (_quanto_int8, True, 4),
    "quanto qint4": (_quanto_int4, True, 4),
    "quanto qint4 (inference_mode off)": (_quanto_int4, True, 4),
    "hqq 8bit g128": (_hqq(8, 128), False, 4),
    "hqq 4bit g64": (_hqq(4, 64), False, 4),
    "hqq 4bit g128": (_hqq(4, 128), False, 4),
    "hqq 3bit g64": (_hqq(3, 64), False, 4),
    "hqq 2bit g16": (_hqq(2, 16), False, 4),
    "hqq 4bit g64 bfloat16": (_hqq(4, 64, meta_bytes=2), False, 2),  # hqq casts the rest to bf16
}


def _expected_bytes(name: str) -> int:
    linear_bytes, lm_head_quantized, element_bytes = EXPECTED[name]
    fp32, _ = _reference()
    blocks = [m for fqn, m in fp32.named_modules() if isinstance(m, nn.Linear) and fqn != "lm_head"]
    total = sum(linear_bytes(*m.weight.shape) for m in blocks)
    # Embedding [256, 64], 5 RMSNorm weights [64], rotary inv_freq + original_inv_freq [8] each.
    total += element_bytes * (256 * 64 + 5 * 64 + 2 * 8)
    if lm_head_quantized:  # the tie breaks: lm_head gets its own quantized copy
        total += linear_bytes(256, 64)
    return total


def test_expected_table_covers_every_config():
    assert set(EXPECTED) == set(CONFIGS)


# ---- held_bytes ------------------------------------------------------------------------------------

def test_held_bytes_of_fp32_tiny_llama_matches_memfit_weight_bytes():
    model, _ = _reference()
    assert peers.held_bytes(model) == weight_bytes(model) == 4 * (73_728 + 256 * 64 + 5 * 64 + 2 * 8)


def test_held_bytes_counts_tied_weights_once_and_whole_storages():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert peers.held_bytes(model) == 10 * 4 * 4
    model.register_buffer("view", torch.zeros(100)[:10])  # a view holds its whole base
    assert peers.held_bytes(model) == 10 * 4 * 4 + 100 * 4


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torchao int8wo", 64 * 256 + 64 * 4 + 64),  # int8 data + fp32 scale + int8 zero point
        ("torchao int4wo-g64", 64 * 256 // 2 + 64 * 4 * 2 * 2),  # nibbles + bf16 (scale, zero) x 4 groups
        ("quanto qint8", 64 * 256 + 64 * 4 + 2 * 4),  # int8 data + fp32 scale + input/output scales
    ],
)
def test_held_bytes_opens_tensor_subclasses_of_one_linear(name, expected):
    config = CONFIGS[name]
    _skip_unless_runs(config)
    toy = config.apply(nn.Sequential(nn.Linear(256, 64, bias=False)))  # weight [64, 256]
    assert type(toy[0].weight) not in (torch.Tensor, nn.Parameter)
    assert peers.held_bytes(toy) == expected


def test_held_bytes_counts_hqq_meta_scale_and_zero():
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    layer = HQQLinear(nn.Linear(256, 64, bias=False), BaseQuantizeConfig(nbits=4, group_size=64),
                      compute_dtype=torch.float32, device="cpu")
    assert not list(layer.buffers()) and set(layer.meta) >= {"scale", "zero"}  # not buffers: in meta
    w_q = 64 * 256 // 2
    assert peers.held_bytes(layer) == w_q + 256 * 2 * 4  # + fp32 scale and zero for 256 groups


# ---- every config on tiny-llama --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_peer_forward_keeps_shape_and_sqnr_floor(name):
    config = CONFIGS[name]
    _skip_unless_runs(config)
    _, reference = _reference()
    _, logits = _quantized(name)
    assert logits.shape == reference.shape == (2, 48, 256)
    assert sqnr_db(reference, logits) > config.min_sqnr_db
    assert not torch.equal(logits.float(), reference)  # it is lossy, so something happened


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peer_held_bytes_match_hand_count(name):
    config = CONFIGS[name]
    _skip_unless_runs(config)
    model, _ = _quantized(name)
    held = peers.held_bytes(model)
    assert held == _expected_bytes(name)
    assert held < peers.held_bytes(_reference()[0])
    coverage = peers.linear_coverage(model)
    assert coverage["lm_head_quantized"] is EXPECTED[name][1]


def test_int4_g128_on_64_wide_inputs_quantizes_only_down_proj():
    config = CONFIGS["torchao int4wo-g128"]
    _skip_unless_runs(config)
    coverage = peers.linear_coverage(_quantized(config.name)[0])
    assert coverage["num_quantized_linears"] == 2 and "lm_head" in coverage["unquantized_linears"]


def test_unavailable_configs_state_a_reason():
    for config in peers.PEER_CONFIGS:
        assert config.available() == (config.unavailable_reason() is None)


# ---- evaluate_peer ---------------------------------------------------------------------------------

def test_evaluate_peer_measures_quality_bytes_and_speed():
    config = CONFIGS["torchao int8wo"]
    _skip_unless_runs(config)
    _, tokenizer = tiny_model("tiny-llama")
    windows = token_windows(tokenizer, "memfit peers " * 100, 512, 512)  # [1, 512]
    row = peers.evaluate_peer(config, lambda: tiny_model("tiny-llama")[0], windows)
    assert row["error"] is None and row["perplexity"] > 1
    assert row["held_bytes"] == _expected_bytes(config.name)
    assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert row["num_quantized_linears"] == row["num_linears"] == 15


def test_evaluate_peer_records_why_a_config_cannot_run():
    def probe():
        raise OSError("no kernel")

    broken = peers.PeerConfig("none", "broken", "", lambda m: m, probe, 0)
    windows = torch.zeros(1, 512, dtype=torch.long)
    row = peers.evaluate_peer(broken, lambda: pytest.fail("must not load a model"), windows)
    assert row["error"] == "unavailable: OSError: no kernel" and row["perplexity"] is None
