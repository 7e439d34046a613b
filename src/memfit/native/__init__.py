"""memfit's few-row CPU kernels (``gemv.c``) and fused decode step (``step.c``), built on first use.

At one to a few rows (decode), PyTorch's packed kernels (``torch._weight_int8pack_mm``,
``torch._weight_int4pack_mm_for_cpu``) read the weights at about half the memory bandwidth;
these loops, compiled for the machine they run on, read them at close to all of it
(benchmarks/packed_kernels.py). They are registered as PyTorch operators (``memfit::gemv_int8``,
``memfit::gemv_int4``) with shape functions, so ``torch.compile`` calls them from a compiled
graph and fake tensors (the estimator) see the same outputs as real runs.

The decode step of a whole model, one token per row, runs in ``step.c`` in one call
(`memfit.runtime.native_step`).

The library is compiled with the system C compiler (``cc``, as ``torch.compile``'s CPU backend
needs) with ``-O3 -march=native -fopenmp`` into ``$XDG_CACHE_HOME/memfit/kernels/<key>/``, where
the key covers the sources, the flags and this CPU's instruction sets, so a cache shared between
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
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

HERE = Path(__file__).parent
SOURCES = (HERE / "gemv.c", HERE / "step.c", HERE / "stream.c")
HEADERS = (HERE / "kernels.h",)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only", "-shared", "-fPIC", "-pthread")
MAX_ROWS = 4  # rows (tokens) up to which these kernels run; prefill-sized inputs keep PyTorch's

# weight formats, as kernels.h numbers them
KIND_F32, KIND_BF16, KIND_INT8, KIND_INT4_PLAIN, KIND_INT4_BLOCKED = range(5)
BLOCK = 64  # rows per block of the blocked int4 layout


def weight_supported(kind: int, n: int, k: int, group: int = 0) -> bool:
    """Whether the kernels run a weight of this format and shape (kernels.h's `weight_supported`)."""
    if kind in (KIND_F32, KIND_INT8):
        return True
    if kind == KIND_BF16:
        return k % 32 == 0
    if kind == KIND_INT4_PLAIN:
        return group % 32 == 0 and k % 32 == 0
    if kind == KIND_INT4_BLOCKED:
        return group % 2 == 0 and (n % BLOCK) % 2 == 0
    return False


class NativeWeight(NamedTuple):
    """A weight as the kernels read it: `kind` (a ``KIND_*``), the packed ``data`` [N, K] (or
    [N, K // 2] for 4-bit), bf16 ``scale`` ([N] or [G, N]), uint8 ``zero`` ([G, N]) and ``group``
    (columns per 4-bit group). Packed modules return one from ``native_weight()``."""

    kind: int
    data: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.data.shape
        return n, k * 2 if self.kind in (KIND_INT4_PLAIN, KIND_INT4_BLOCKED) else k

    @property
    def supported(self) -> bool:
        return weight_supported(self.kind, *self.shape, self.group)


_BUILT = {"seconds": 0.0}


def build_seconds() -> float:
    """Seconds this process spent compiling the library (0 when it came from the cache)."""
    return _BUILT["seconds"]


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
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    digest.update(" ".join(FLAGS).encode() + _cpu_key().encode())
    target = _cache_dir() / digest.hexdigest()[:16] / "memfit_native.so"
    if not target.exists():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise OSError("no C compiler (cc) found")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"]
            began = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True)
            _BUILT["seconds"] = time.perf_counter() - began
            if result.returncode != 0:
                raise OSError(f"{compiler} failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
            os.replace(built, target)  # atomic: a concurrent build of the same key writes the same file
    lib = ctypes.CDLL(str(target))
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.memfit_gemv.argtypes = [i32, ptr, ptr, ptr, i64, i64, i64, ptr, i32, ptr, ptr, i64]
    lib.memfit_gemv.restype = i32
    lib.memfit_step.argtypes = [ptr, ptr, i64, ptr, ptr, ptr]
    lib.memfit_step.restype = None
    lib.memfit_greedy.argtypes = [ptr, ptr, i64, ptr, i64, ptr, ptr, ptr]
    lib.memfit_greedy.restype = None
    lib.memfit_step_scratch.argtypes = [ptr]
    lib.memfit_step_scratch.restype = i64
    lib.memfit_read.argtypes = [ptr, i64]
    lib.memfit_read.restype = i64
    lib.memfit_int4_to_blocked.argtypes = [ptr, ptr, i64, i64]
    lib.memfit_int4_to_blocked.restype = None
    lib.memfit_dequantize.argtypes = [i32, ptr, ptr, ptr, i64, i64, i64, ptr, i32]
    lib.memfit_dequantize.restype = i32
    lib.memfit_stream_open.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, i64, ctypes.c_int, ctypes.c_int, i64]
    lib.memfit_stream_open.restype = ptr
    lib.memfit_stream_patches.argtypes = [ptr, i64, ptr, ptr, ptr]
    lib.memfit_stream_patches.restype = ctypes.c_int
    lib.memfit_cached_fraction.argtypes = [ctypes.c_int, i64, i64]
    lib.memfit_cached_fraction.restype = ctypes.c_double
    lib.memfit_stream_claim.argtypes = [ptr, ptr, ptr]
    lib.memfit_stream_claim.restype = ctypes.c_int
    lib.memfit_stream_read.argtypes = [ptr, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.memfit_stream_read.restype = ctypes.c_int
    lib.memfit_stream_finish.argtypes = [ptr, ctypes.c_int, ctypes.c_int]
    lib.memfit_stream_finish.restype = i64
    lib.memfit_stream_acquire.argtypes = [ptr]
    lib.memfit_stream_acquire.restype = i64
    lib.memfit_stream_release.argtypes = [ptr]
    lib.memfit_stream_release.restype = None
    lib.memfit_stream_cursor.argtypes = [ptr]
    lib.memfit_stream_cursor.restype = i64
    lib.memfit_stream_stats.argtypes = [ptr, ptr]
    lib.memfit_stream_stats.restype = None
    lib.memfit_stream_close.argtypes = [ptr]
    lib.memfit_stream_close.restype = None
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
    64-row blocked layout, scales bf16 and zero points uint8 [G, N] -> [M, N] in x's dtype (shapes
    as `weight_supported` allows)."""
    if _direct(x):
        return _int4(x, qweight, scale, zero_point, group_size, blocked)
    return torch.ops.memfit.gemv_int4(x, qweight, scale, zero_point, group_size, blocked)


def gemv_float(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ weight.T`` for a float32 or bf16 weight [N, K] of x's dtype -> [M, N] in x's dtype
    (a bf16 weight needs K a multiple of 32: `weight_supported`)."""
    if _direct(x):
        return _float(x, weight)
    return torch.ops.memfit.gemv_float(x, weight)


def dequantize(weight: NativeWeight, dtype: torch.dtype) -> torch.Tensor | None:
    """The float weight [N, K] in ``dtype`` (float32 or bf16) of a packed int8 or 4-bit one, the same
    values PyTorch's ops give, in one pass without temporaries; None where this does not apply (the
    library is not built, ``dtype`` is another, or the call is traced, faked or tracked: there the
    caller's PyTorch ops run, so memory predictions and tracked runs see the same operators)."""
    if dtype not in (torch.float32, torch.bfloat16) or not _direct(weight.data) or not available():
        return None
    if weight.kind not in (KIND_INT8, KIND_INT4_PLAIN, KIND_INT4_BLOCKED) or weight.data.device.type != "cpu":
        return None
    n, k = weight.shape
    data = weight.data.contiguous()
    out = torch.empty(n, k, dtype=dtype)
    zero = weight.zero.contiguous().data_ptr() if weight.zero is not None else None
    library().memfit_dequantize(weight.kind, data.data_ptr(), weight.scale.contiguous().data_ptr(), zero, n, k,
                                weight.group or k, out.data_ptr(), int(dtype == torch.bfloat16))
    return out


def int4_to_blocked(plain: torch.Tensor) -> torch.Tensor | None:
    """A plain-layout 4-bit weight [N, K // 2] in the blocked layout the kernels read
    (``Int4Layout(64, half_pairs=True)``), made without temporaries; None where the library is
    not built or ``plain`` is not a real CPU tensor (callers then convert with PyTorch)."""
    if (not available() or plain.device.type != "cpu" or type(plain) is not torch.Tensor or plain.is_meta
            or plain.dtype != torch.uint8 or (plain.shape[0] % BLOCK) % 2):
        return None
    plain = plain.contiguous()
    blocked = torch.empty_like(plain)
    library().memfit_int4_to_blocked(plain.data_ptr(), blocked.data_ptr(), plain.shape[0], plain.shape[1] * 2)
    return blocked


def _direct(x: torch.Tensor) -> bool:
    # Eagerly, on plain tensors, call the library straight away: the operator's dispatch costs more
    # than a small layer's whole matmul. Compiled graphs, fake tensors and the tracker go through it.
    if torch.compiler.is_compiling():
        return False
    return type(x) is torch.Tensor and _get_current_dispatch_mode() is None


def _gemv(kind: int, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
          n: int, group: int) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, n, dtype=x.dtype)
    bf16 = x.dtype == torch.bfloat16
    reads_bf16 = kind in (KIND_BF16, KIND_INT4_PLAIN)
    scratch = torch.empty((m * k + m * n) if bf16 else (m * k + 1) // 2 if reads_bf16 else 0)
    done = library().memfit_gemv(kind, data.data_ptr(), None if scale is None else scale.data_ptr(),
                                 None if zero is None else zero.data_ptr(), n, k, group, x.data_ptr(), int(bf16),
                                 out.data_ptr(), scratch.data_ptr(), m)
    if not done:  # callers check `weight_supported` first
        raise ValueError(f"no native kernel for format {kind} at [{n}, {k}] (group {group})")
    return out


def _int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _gemv(KIND_INT8, x, qweight, scale, None, qweight.shape[0], 0)


def _int4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
          group_size: int, blocked: bool) -> torch.Tensor:
    kind = KIND_INT4_BLOCKED if blocked else KIND_INT4_PLAIN
    return _gemv(kind, x, qweight, scale, zero_point, qweight.shape[0], group_size)


def _float(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    kind = KIND_BF16 if weight.dtype == torch.bfloat16 else KIND_F32
    return _gemv(kind, x, weight.contiguous(), None, None, weight.shape[0], 0)


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
