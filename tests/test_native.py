"""memfit's few-row CPU kernels (native): numbers, shapes, dispatch, build errors."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memfit import native
from memfit.strategies.quantize import kernels
from memfit.strategies.quantize.grids import quantize_int4_groups, quantize_int8_rows
from memfit.strategies.quantize.kernels import NATIVE_INT4_LAYOUT, PLAIN

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernels could not be built here")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("width", [64, 576, 21])
def test_int8_matches_the_dequantized_matmul_in_float32(rows, width):
    q, scale = quantize_int8_rows(torch.randn(200, width))
    x = torch.randn(rows, width)
    reference = x @ kernels.dequantize_int8(q, scale, torch.float32).t()
    out = native.gemv_int8(x, q, scale)
    assert out.dtype == torch.float32 and out.shape == (rows, 200)
    assert _rel(out, reference) < 1e-5
    bf16 = native.gemv_int8(x.bfloat16(), q, scale)  # bf16 in, bf16 out, float32 accumulation
    assert bf16.dtype == torch.bfloat16 and _rel(bf16, x.bfloat16().float() @ kernels.dequantize_int8(
        q, scale, torch.float32).t()) < 4e-3


@pytest.mark.parametrize("layout", [PLAIN, NATIVE_INT4_LAYOUT], ids=["plain", "blocked"])
@pytest.mark.parametrize("out_features", [192, 160])  # 160: a tail of 32 rows after two blocks of 64
@pytest.mark.parametrize("rows", [1, 3])
def test_int4_matches_the_dequantized_matmul(layout, out_features, rows):
    # 576 columns in groups of 128: the last group is short (64), as in the demo model's projections
    q, scale, zero = quantize_int4_groups(torch.randn(out_features, 576), 128)
    packed = layout.pack(q)
    x = torch.randn(rows, 576)
    weight = kernels.dequantize_int4(packed, scale, zero, 128, layout, torch.float32)
    out = native.gemv_int4(x, packed, scale, zero, 128, layout != PLAIN)
    assert out.shape == (rows, out_features)
    # activations may be rounded to bf16 (the AVX512-BF16 path does, as PyTorch's int4 kernel does)
    assert _rel(out, x @ weight.t()) < 4e-3
    assert min(_rel(out, x @ weight.t()), _rel(out, x.bfloat16().float() @ weight.t())) < 1e-5


def _torch_int4(packed, scale, zero, group, layout, dtype):
    q = layout.unpack(packed)
    expand = lambda t: t.t().repeat_interleave(group, dim=1)[:, : q.shape[1]]  # noqa: E731
    return (q.to(dtype) - expand(zero).to(dtype)) * expand(scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features", [192, 160, 130])  # tails of 32 and 2 rows after the 64-row blocks
def test_dequantize_gives_pytorchs_values_exactly(dtype, out_features):
    w = torch.randn(out_features, 576, generator=torch.Generator().manual_seed(out_features))
    q8, s8 = quantize_int8_rows(w)
    fast = native.dequantize(native.NativeWeight(native.KIND_INT8, q8, s8), dtype)
    assert torch.equal(fast, q8.to(dtype) * s8.to(dtype)[:, None])
    q4, s4, z4 = quantize_int4_groups(w, 128)
    for layout, kind in ((PLAIN, native.KIND_INT4_PLAIN), (NATIVE_INT4_LAYOUT, native.KIND_INT4_BLOCKED)):
        packed = layout.pack(q4)
        fast = native.dequantize(native.NativeWeight(kind, packed, s4, z4, 128), dtype)
        assert torch.equal(fast, _torch_int4(packed, s4, z4, 128, layout, dtype)), layout


def test_dequantize_leaves_fake_and_tracked_runs_to_pytorch():
    from memfit.memory.tracker import Tracker

    q, scale = quantize_int8_rows(torch.randn(64, 128))
    weight = native.NativeWeight(native.KIND_INT8, q, scale)
    assert native.dequantize(weight, torch.float32) is not None
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert native.dequantize(weight, torch.float32) is None
    with Tracker():
        assert native.dequantize(weight, torch.float32) is None


@pytest.mark.parametrize("out_features", [192, 160, 130, 64])
def test_int4_to_blocked_is_the_blocked_layouts_packing(out_features):
    q = torch.randint(0, 16, (out_features, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(native.int4_to_blocked(PLAIN.pack(q)), NATIVE_INT4_LAYOUT.pack(q))


def test_the_linear_paths_take_the_native_kernels_at_decode_rows_only():
    q, scale = quantize_int8_rows(torch.randn(64, 128))
    one, many = torch.randn(1, 1, 128), torch.randn(1, native.MAX_ROWS + 1, 128)
    assert native.applies(one) and not native.applies(many)
    assert torch.equal(kernels.int8_linear(one, q, scale, None)[0], native.gemv_int8(one[0], q, scale))
    needs_grad = torch.randn(1, 128, requires_grad=True)
    assert not native.applies(needs_grad)  # no derivative: training takes the dequantize path


@pytest.mark.xdist_group("inductor")  # one worker pays inductor's first compile (about 10 s cold)
def test_fake_tensors_and_compiled_graphs_call_the_operators():
    q, scale, zero = quantize_int4_groups(torch.randn(128, 256), 64)
    packed = PLAIN.pack(q)
    x = torch.randn(2, 256)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = native.gemv_int4(torch.empty(2, 256), packed, scale, zero, 64, False)
    assert fake.shape == (2, 128) and fake.dtype == torch.float32

    compiled = torch.compile(lambda t: native.gemv_int4(t, packed, scale, zero, 64, False) * 2, fullgraph=True)
    assert torch.allclose(compiled(x), native.gemv_int4(x, packed, scale, zero, 64, False) * 2)


def test_a_failed_build_says_so_once_and_falls_back(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    native.library.cache_clear()
    try:
        assert native.library() is None and native.library() is None
        assert capsys.readouterr().err.count("memfit: cannot build the decode kernels") == 1
        monkeypatch.setenv("MEMFIT_NATIVE_KERNELS", "0")
        native.library.cache_clear()
        assert native.library() is None and capsys.readouterr().err == ""
    finally:
        native.library.cache_clear()
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
