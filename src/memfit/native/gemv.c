/* Few-row matmuls (decode: one to a few tokens) over memfit's weight formats, one call per matmul.
 *
 * y[m, n] = sum_k x[m, k] * W[n, k] with W in one of the formats of kernels.h; x and y float32 or
 * bfloat16 (`x_bf16`, y in x's dtype), accumulation in float32. The weight's rows are split across
 * OpenMP threads (the process's one libgomp pool, shared with PyTorch).
 *
 * Built on first use by memfit (native/__init__.py) with the system C compiler for the machine it
 * runs on (-O3 -march=native).
 */
#include <omp.h>

#include "kernels.h"

/* Float32 scratch the call needs, in floats: x as float (bf16 inputs), x as bf16 (float inputs to
 * kernels that read bf16), y as float (bf16 outputs). */
int64_t memfit_gemv_scratch(int32_t kind, int64_t m, int64_t n, int64_t k, int32_t x_bf16) {
    const Weight w = {.kind = kind};
    return (x_bf16 ? m * k + m * n : 0) + (!x_bf16 && weight_reads_bf16(&w) ? (m * k + 1) / 2 : 0);
}

/* Returns 0 when the weight's shape has no kernel here (the caller then multiplies another way). */
int32_t memfit_gemv(int32_t kind, const void *data, const uint16_t *scale, const uint8_t *zero, int64_t n, int64_t k,
                    int64_t group, const void *x, int32_t x_bf16, void *y, float *scratch, int64_t m) {
    const Weight w = {.kind = kind, .data = data, .scale = scale, .zero = zero, .n = n, .k = k, .group = group};
    if (!weight_supported(&w)) return 0;
    Input in = {.m = m, .k = k};
    float *yf = (float *)y;
    if (x_bf16) {
        float *xf = scratch;
        for (int64_t i = 0; i < m * k; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        in.f = xf;
        in.b = (const uint16_t *)x;
        yf = scratch + m * k;
    } else {
        in.f = (const float *)x;
        if (weight_reads_bf16(&w)) {
            uint16_t *xb = (uint16_t *)scratch;
            for (int64_t i = 0; i < m * k; i++) xb[i] = f32_to_bf16(in.f[i]);
            in.b = xb;
        }
    }
    const int64_t unit = row_unit(&w), units = (n + unit - 1) / unit;
    #pragma omp parallel
    {
        int64_t a, b;
        thread_share(units, omp_get_thread_num(), omp_get_num_threads(), &a, &b);
        const int64_t first = a * unit, last = b * unit < n ? b * unit : n;
        if (first < last) weight_rows(&w, &in, yf, n, first, last);
    }
    if (x_bf16)
        for (int64_t i = 0; i < m * n; i++) ((uint16_t *)y)[i] = f32_to_bf16(yf[i]);
    return 1;
}

/* Reads ``bytes`` (a multiple of 64) with every thread, prefetching as the kernels do, and returns
 * a checksum: the benchmarks' measure of how fast this machine streams weights from memory. */
int64_t memfit_read(const void *data, int64_t bytes) {
    int64_t total = 0;
    #pragma omp parallel reduction(+:total)
    {
        int64_t a, b;
        thread_share(bytes / 64, omp_get_thread_num(), omp_get_num_threads(), &a, &b);
        const int64_t *p = (const int64_t *)data;
        int64_t acc[8] = {0};
        for (int64_t line = a; line < b; line++) {
            prefetch((const char *)data + line * 64 + PREFETCH_BYTES);
            for (int i = 0; i < 8; i++) acc[i] += p[line * 8 + i];
        }
        for (int i = 0; i < 8; i++) total += acc[i];
    }
    return total;
}
