"""memfit's few-row CPU kernels for packed weights (``gemv.c``), built on first use.

At one to a few rows (decode), PyTorch's packed kernels (``torch._weight_int8pack_mm``,
``torch._weight_int4pack_mm_for_cpu``) read the weights at about half the memory bandwidth;
these loops, compiled for the machine they run on, read them at close to all of it
(benchmarks/packed_kernels.py). They are registered as PyTorch operators (``memfit::gemv_int8``,
``memfit::gemv_int4``) with shape functions, so ``torch.compile`` calls them from a compiled
graph and fake tensors (the estimator) see the same outputs as real runs.

The library is compiled with the system C compiler (``cc``, as ``torch.compile``'s CPU backend
needs) with ``-O3 -march=native -fopenmp`` into ``$XDG_CACHE_HOME/memfit/kernels/<key>/``, where
the key covers the source, the flags and this CPU's instruction sets, so a cache shared between
machines never runs code built for another CPU. Where it cannot be built, memfit says so once on
stderr and uses PyTorch's kernels. ``MEMFIT_NATIVE_KERNELS=0`` turns these kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only", "-shared", "-fPIC")
MAX_ROWS = 4  # rows (tokens) up to which these kernels run; prefill-sized inputs keep PyTorch's


def _cpu_key() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = os.uname().machine
    return flags


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "memfit" / "kernels"


def _build() -> ctypes.CDLL:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    target = _cache_dir() / key / "gemv.so"
    if not target.exists():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise OSError("no C compiler (cc) found")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / "gemv.so"
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if result.returncode != 0:
                raise OSError(f"{compiler} failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
            os.replace(built, target)  # atomic: a concurrent build of the same key writes the same file
    lib = ctypes.CDLL(str(target))
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.memfit_gemv_int8.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32]
    lib.memfit_gemv_int4.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32]
    lib.memfit_gemv_int4_plain.argtypes = lib.memfit_gemv_int4.argtypes
    lib.memfit_gemv_float.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i32, i32]
    lib.memfit_gemv_float.restype = None
    lib.memfit_gemv_int8.restype = lib.memfit_gemv_int4.restype = lib.memfit_gemv_int4_plain.restype = None
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (turned off, not an x86/ARM Linux CPU build, or no compiler)."""
    if os.environ.get("MEMFIT_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        return _build()
    except OSError as exc:
        sys.stderr.write(f"memfit: cannot build the decode kernels ({exc}); using PyTorch's packed kernels\n")
        return None


@torch.compiler.assume_constant_result  # decided once, outside any compiled graph
def available() -> bool:
    return library() is not None


def applies(x: torch.Tensor) -> bool:
    """Whether the native kernels serve input ``x``: few rows, float32 or bf16, on the CPU, no gradient."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        0 < rows <= MAX_ROWS
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and not (x.requires_grad and torch.is_grad_enabled())
        and available()
    )


def gemv_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ (qweight [N, K] int8 * scale [N] bf16).T`` -> [M, N] in x's dtype."""
    if _direct(x):
        return _int8(x, qweight, scale)
    return torch.ops.memfit.gemv_int8(x, qweight, scale)


def gemv_int4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
              group_size: int, blocked: bool) -> torch.Tensor:
    """``x [M, K] @ W.T`` for a 4-bit weight [N, K // 2], plain or (``blocked``) in the CPU kernel's
    64-row blocked layout, scales bf16 and zero points uint8 [G, N] -> [M, N] in x's dtype."""
    if _direct(x):
        return _int4(x, qweight, scale, zero_point, group_size, blocked)
    return torch.ops.memfit.gemv_int4(x, qweight, scale, zero_point, group_size, blocked)


def gemv_float(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ weight.T`` for a float32 or bf16 weight [N, K] -> [M, N] in x's dtype."""
    if _direct(x):
        return _float(x, weight)
    return torch.ops.memfit.gemv_float(x, weight)


def _direct(x: torch.Tensor) -> bool:
    # Eagerly, on plain tensors, call the library straight away: the operator's dispatch costs more
    # than a small layer's whole matmul. Compiled graphs, fake tensors and the tracker go through it.
    if torch.compiler.is_compiling():
        return False
    return type(x) is torch.Tensor and _get_current_dispatch_mode() is None


def _int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, qweight.shape[0], dtype=x.dtype)
    bf16 = x.dtype == torch.bfloat16
    scratch = torch.empty(m, k) if bf16 else out  # float32 inputs are read in place
    library().memfit_gemv_int8(x.data_ptr(), qweight.data_ptr(), scale.data_ptr(), out.data_ptr(),
                               scratch.data_ptr(), m, qweight.shape[0], k, int(bf16))
    return out


def _int4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
          group_size: int, blocked: bool) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype)
    bf16 = x.dtype == torch.bfloat16
    scratch = torch.empty(m, k + -(-k // group_size)) if bf16 or not blocked else out
    kernel = library().memfit_gemv_int4 if blocked else library().memfit_gemv_int4_plain
    kernel(x.data_ptr(), qweight.data_ptr(), scale.data_ptr(), zero_point.data_ptr(), out.data_ptr(),
           scratch.data_ptr(), m, n, k, group_size, int(bf16))
    return out


def _float(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x, weight = x.contiguous(), weight.contiguous()
    m, k = x.shape
    out = torch.empty(m, weight.shape[0], dtype=x.dtype)
    bf16 = x.dtype == torch.bfloat16
    scratch = torch.empty(m, k) if bf16 and (weight.dtype != torch.bfloat16 or k % 32) else out
    library().memfit_gemv_float(x.data_ptr(), weight.data_ptr(), out.data_ptr(), scratch.data_ptr(), m,
                                weight.shape[0], k, int(bf16), int(weight.dtype == torch.bfloat16))
    return out


# Defined through torch.library.Library rather than custom_op: its dispatch costs about 2.5 us less
# per call, which at 211 calls per token of the demo model is half a millisecond.
_LIBRARY = torch.library.Library("memfit", "DEF")
_LIBRARY.define("gemv_int8(Tensor x, Tensor qweight, Tensor scale) -> Tensor")
_LIBRARY.define("gemv_int4(Tensor x, Tensor qweight, Tensor scale, Tensor zero_point, int group_size, "
                "bool blocked) -> Tensor")
_LIBRARY.define("gemv_float(Tensor x, Tensor weight) -> Tensor")
_LIBRARY.impl("gemv_int8", _int8, "CPU")
_LIBRARY.impl("gemv_float", _float, "CPU")
_LIBRARY.impl("gemv_int4", _int4, "CPU")


@torch.library.register_fake("memfit::gemv_int8")
def _(x, qweight, scale):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.register_fake("memfit::gemv_float")
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("memfit::gemv_int4")
def _(x, qweight, scale, zero_point, group_size, blocked):
    return x.new_empty(x.shape[0], qweight.shape[0])
