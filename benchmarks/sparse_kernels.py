"""The forward of a 50%-sparse Linear: memfit's bitmask layout against a CSR sparse matmul.

For the demo model's Linear shapes and a few row counts, times (medians, microseconds): fp32
F.linear on the dense weight; `SparseLinear` (unpack the bitmask, scatter the kept values into a
dense weight, one F.linear); `SparseLinear` with int8 values (decode: scatter the int8 codes, the
packed int8 kernel); and PyTorch's CSR matmul on the same weights (`torch.sparse_csr`, int32
indices, built once). Also prints the bytes each layout holds.

    .venv/bin/python benchmarks/sparse_kernels.py [--repeats 30]
"""

from __future__ import annotations

import argparse

import torch
from kernels import SHAPES, median_us

from memfit.memory.report import weight_bytes
from memfit.strategies.prune.masks import keep_mask, magnitude_scores
from memfit.strategies.prune.packed import SparseLinear
from memfit.strategies.quantize.rtn import int8_linear_from

ROWS = (1, 16, 512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':20} {'rows':>5} {'dense':>9} {'bitmask':>9} {'bitmask i8':>10} {'csr':>9} "
          f"{'bitmask/dense':>13} {'csr/dense':>9}")
    sizes = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k)
        keep = keep_mask(magnitude_scores(w), 50)
        sparse = SparseLinear.from_dense(w, keep, None)
        sparse8 = SparseLinear.from_dense(w, keep, None)
        sparse8.values = int8_linear_from(sparse8.values)
        csr = (w * keep).to_sparse_csr().to_sparse_csr()
        csr = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape)
        layout_bytes = lambda t: sum(x.numel() * x.element_size()
                                     for x in (t.crow_indices(), t.col_indices(), t.values()))
        sizes[name] = (4 * n * k, weight_bytes(sparse), weight_bytes(sparse8), layout_bytes(csr))
        with torch.no_grad():
            for rows in ROWS:
                x = torch.randn(rows, k)
                dense = median_us(lambda: torch.nn.functional.linear(x, w), args.repeats)
                bitmask = median_us(lambda: sparse(x), args.repeats)
                bitmask8 = median_us(lambda: sparse8(x), args.repeats)
                sparse_mm = median_us(lambda: (csr @ x.t()).t(), args.repeats)
                print(f"{name:20} {rows:5d} {dense:9.0f} {bitmask:9.0f} {bitmask8:10.0f} {sparse_mm:9.0f} "
                      f"{bitmask / dense:13.2f} {sparse_mm / dense:9.2f}")
    print(f"\n{'shape':20} {'dense B':>10} {'bitmask B':>10} {'bitmask i8 B':>12} {'csr B':>10}")
    for name, (dense, bitmask, bitmask8, csr) in sizes.items():
        print(f"{name:20} {dense:10d} {bitmask:10d} {bitmask8:12d} {csr:10d}")


if __name__ == "__main__":
    main()
