"""Packed int4/int8 storage and the CPU kernel paths against dequantize-then-matmul references."""

import pytest
import torch

from memfit.strategies.quantize import kernels
from memfit.strategies.quantize.grids import int4_group_size, quantize_int4_groups, quantize_int8_rows
from memfit.strategies.quantize.kernels import PLAIN, Int4Layout, cpu_int4_layout
from memfit.testing import sqnr_db

needs_int4_kernel = pytest.mark.skipif(cpu_int4_layout() is None, reason="no CPU int4 kernel layout on this build")


@needs_int4_kernel
@pytest.mark.parametrize("n", [16, 48, 64, 96, 144, 576])
def test_int4_cpu_layout_matches_torch_converter_and_unpacks(n):
    q = torch.randint(0, 16, (n, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    layout = cpu_int4_layout()
    packed = layout.pack(q)
    assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(q, 2))
    assert torch.equal(layout.unpack(packed).int(), q)


@pytest.mark.parametrize("layout", [PLAIN, Int4Layout(64, True), Int4Layout(32, False)])
def test_int4_layouts_round_trip_with_two_values_per_byte(layout):
    q = torch.randint(0, 16, (96, 40), dtype=torch.uint8)
    packed = layout.pack(q)
    assert packed.shape == (96, 20) and packed.dtype == torch.uint8
    assert torch.equal(layout.unpack(packed), q)


def test_int8_rows_round_within_half_a_step():
    w = torch.randn(64, 96) * torch.linspace(0.01, 3, 64)[:, None]
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (64,)
    error = (q.float() * scale.float()[:, None] - w).abs()
    assert (error <= scale.float()[:, None] / 2 + 1e-6).all()


def test_int4_groups_round_within_half_a_step_and_short_last_group():
    w = torch.randn(32, 80)
    q, scale, zero = quantize_int4_groups(w, 32)  # 80 = 32 + 32 + 16
    assert q.shape == (32, 80) and scale.shape == (3, 32) and zero.shape == (3, 32)
    assert int(q.max()) <= 15 and int(zero.max()) <= 15
    step = scale.float().t().repeat_interleave(32, dim=1)[:, :80]
    zp = zero.float().t().repeat_interleave(32, dim=1)[:, :80]
    deq = (q.float() - zp) * step
    low, high = -zp * step, (15 - zp) * step  # what each group's grid can represent
    inside = (w >= low) & (w <= high)
    assert ((deq - w).abs()[inside] <= step[inside] / 2 + 1e-5).all()  # nearest grid point
    assert torch.allclose(deq[~inside], torch.where(w < low, low, high)[~inside])  # clipped to the ends
    assert sqnr_db(w, deq) > 18


def test_int4_least_squares_grid_beats_min_max():
    w = torch.randn(256, 128)
    q, scale, zero = quantize_int4_groups(w, 128)
    fitted = (q.float() - zero.float().t()[:, :1]) * scale.float().t()[:, :1]
    q0, s0, z0 = quantize_int4_groups(w, 128, shrink=(1.0,), refits=0)
    plain = (q0.float() - z0.float().t()[:, :1]) * s0.float().t()[:, :1]
    assert sqnr_db(w, fitted) > sqnr_db(w, plain) + 0.3


def test_constant_group_is_reproduced():
    w = torch.full((16, 32), 0.25)
    q, scale, zero = quantize_int4_groups(w, 32)
    deq = (q.float() - zero.float().t()) * scale.float().t()
    assert torch.allclose(deq, w, rtol=1e-2)


@pytest.mark.parametrize(
    ("width", "group", "expected"), [(576, 128, 64), (1536, 128, 128), (576, 32, 32), (80, 64, 64)]
)
def test_int4_group_size_for_widths_that_do_not_divide(width, group, expected):
    assert int4_group_size(width, group) == expected


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_int8_kernel_path_matches_dequantized_matmul(rows):
    w = torch.randn(96, 64)
    q, scale = quantize_int8_rows(w)
    x = torch.randn(rows, 64)
    reference = x @ kernels.dequantize_int8(q, scale, torch.float32).t()
    out = kernels.int8_linear(x, q, scale, None)  # rows <= INT8_KERNEL_MAX_ROWS: packed kernel, bf16 inputs
    assert out.dtype == torch.float32 and out.shape == (rows, 96)
    assert sqnr_db(reference, out) > 35


@pytest.mark.parametrize("width", [21, 40])
def test_int8_widths_the_kernel_cannot_take_run_the_exact_path(width):
    # a low-rank factor's rank: torch._weight_int8pack_mm crashed the process on such widths
    q, scale = quantize_int8_rows(torch.randn(64, width))
    x = torch.randn(1, 64, width)
    assert not kernels.int8_kernel_applies(x) and kernels.int8_kernel_applies(torch.randn(1, 64, 32))
    out = kernels.int8_linear(x, q, scale, None)
    assert torch.equal(out, x @ kernels.dequantize_int8(q, scale, torch.float32).t())


@needs_int4_kernel
@pytest.mark.parametrize("rows", [1, 3, 16, 512])
def test_int4_kernel_path_matches_dequantized_matmul(rows):
    w = torch.randn(128, 576)
    q, scale, zero = quantize_int4_groups(w, 64)
    layout = cpu_int4_layout()
    packed = layout.pack(q)
    x = torch.randn(rows, 576)
    reference = x @ kernels.dequantize_int4(packed, scale, zero, 64, layout, torch.float32).t()
    out = kernels.int4_linear(x, packed, scale, zero, 64, layout, None)
    assert sqnr_db(reference, out) > 35


def test_many_rows_take_the_exact_dequantize_path():
    w = torch.randn(32, 64)
    q, scale = quantize_int8_rows(w)
    x = torch.randn(kernels.INT8_KERNEL_MAX_ROWS + 1, 64)
    reference = x @ kernels.dequantize_int8(q, scale, torch.float32).t()
    assert torch.allclose(kernels.int8_linear(x, q, scale, None), reference, atol=1e-5)
