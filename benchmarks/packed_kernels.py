"""Where the packed CPU kernels beat dequantize-then-matmul: the crossover behind KERNEL_MAX_ROWS.

For each of the demo model's Linear shapes and a range of row counts (tokens per matmul), times:
fp32 F.linear on the float weight, the packed int8/int4 kernels (bf16 inputs), and dequantize +
F.linear in fp32. Prints medians in microseconds and the kernel/dequantize ratio; the kernel pays
off while the ratio is below 1.

    .venv/bin/python benchmarks/packed_kernels.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from memfit.strategies.quantize import kernels
from memfit.strategies.quantize.grids import quantize_int4_groups, quantize_int8_rows

SHAPES = {"q_proj 576x576": (576, 576), "gate_proj 1536x576": (1536, 576), "down_proj 576x1536": (576, 1536)}
ROWS = (1, 4, 16, 32, 64, 512)


def median_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    layout = kernels.cpu_int4_layout()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, int4 layout {layout}")
    print(f"{'shape':20} {'rows':>5} {'fp32':>9} {'int8 kern':>10} {'int8 deq':>9} {'int4 kern':>10} "
          f"{'int4 deq':>9} {'int8 k/d':>8} {'int4 k/d':>8}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k)
        q8, s8 = quantize_int8_rows(w)
        q4, s4, z4 = quantize_int4_groups(w, 64)
        packed = layout.pack(q4) if layout else None
        for rows in ROWS:
            x = torch.randn(rows, k)
            xb = x.to(torch.bfloat16)
            fp32 = median_us(lambda: F.linear(x, w), args.repeats)
            k8 = median_us(lambda: torch._weight_int8pack_mm(xb, q8, s8), args.repeats)
            d8 = median_us(lambda: F.linear(x, kernels.dequantize_int8(q8, s8, torch.float32)), args.repeats)
            if packed is not None:
                sz = torch.stack([s4.float(), (8 - z4.float()) * s4.float()], -1).to(torch.bfloat16)
                k4 = median_us(lambda: torch._weight_int4pack_mm_for_cpu(xb, packed, 64, sz), args.repeats)
                d4 = median_us(
                    lambda: F.linear(x, kernels.dequantize_int4(packed, s4, z4, 64, layout, torch.float32)),
                    args.repeats,
                )
            else:
                k4 = d4 = float("nan")
            print(f"{name:20} {rows:5d} {fp32:9.1f} {k8:10.1f} {d8:9.1f} {k4:10.1f} {d4:9.1f} "
                  f"{k8 / d8:8.2f} {k4 / d4:8.2f}")


if __name__ == "__main__":
    main()
