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

/* 4-bit weights from the plain layout (row-major, column 2j in the low nibble of byte j) into the
 * blocked one kernels.h reads (Int4Layout(64, half_pairs=True)): full blocks of 64 rows k-major
 * [K, 32] (byte j: row j low, row j + 32 high), a tail of T rows k-major [K, T / 2] (byte j: row
 * 2j low, row 2j + 1 high). Loading a saved model converts each Linear with this instead of
 * PyTorch ops whose temporaries were several times the weight. */
void memfit_int4_to_blocked(const uint8_t *plain, uint8_t *blocked, int64_t n, int64_t k) {
    const int64_t full = n / BLOCK, tail = n - full * BLOCK, half_k = k / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < full + (tail > 0); b++) {
        const int64_t first = b * BLOCK, rows = b < full ? BLOCK : tail, width = rows / 2;
        const int64_t lo_step = b < full ? 1 : 2, hi_offset = b < full ? BLOCK / 2 : 1;
        uint8_t *out = blocked + first * half_k;
        for (int64_t c = 0; c < k; c++) {
            const int shift = (int)(c & 1) * 4;
            for (int64_t j = 0; j < width; j++) {
                const int64_t lo_row = first + j * lo_step, hi_row = lo_row + hi_offset;
                const uint8_t lo = (plain[lo_row * half_k + c / 2] >> shift) & 15;
                const uint8_t hi = (plain[hi_row * half_k + c / 2] >> shift) & 15;
                out[c * width + j] = (uint8_t)(lo | (hi << 4));
            }
        }
    }
}

/* The float weight [N, K] of a packed one, as float32 or (``out_bf16``) bf16: int8 q * scale[n],
 * 4-bit (q - zero[g, n]) * scale[g, n]. Exact products rounded once, as PyTorch's ops on the same
 * dtypes give. Returns 0 for kinds it does not take. */
int32_t memfit_dequantize(int32_t kind, const void *data, const uint16_t *scale, const uint8_t *zero, int64_t n,
                          int64_t k, int64_t group, void *out, int32_t out_bf16) {
    if (kind != KIND_INT8 && kind != KIND_INT4_PLAIN && kind != KIND_INT4_BLOCKED) return 0;
    const int64_t full = n / BLOCK, half_k = k / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; row++) {
        float values[k];
        if (kind == KIND_INT8) {
            const int8_t *q = (const int8_t *)data + row * k;
            const float s = bf16_to_f32(scale[row]);
            for (int64_t c = 0; c < k; c++) values[c] = (float)q[c] * s;
        } else {
            /* where this row's nibbles are: plain, row-major; blocked, a 64-row block k-major
             * (byte j of a column: rows j and j + 32) or the tail (byte j: rows 2j and 2j + 1) */
            const uint8_t *bytes;
            int64_t stride;
            int shift;
            if (kind == KIND_INT4_PLAIN) {
                bytes = (const uint8_t *)data + row * half_k, stride = 0, shift = 0;
            } else if (row / BLOCK < full) {
                const int64_t j = row % BLOCK;
                bytes = (const uint8_t *)data + (row - j) * half_k + j % (BLOCK / 2), stride = BLOCK / 2;
                shift = j < BLOCK / 2 ? 0 : 4;
            } else {
                const int64_t t = row - full * BLOCK;
                stride = (n - full * BLOCK) / 2;
                bytes = (const uint8_t *)data + full * BLOCK * half_k + t / 2, shift = (int)(t & 1) * 4;
            }
            uint8_t q[k];
            if (kind == KIND_INT4_PLAIN) {
                for (int64_t j = 0; j < half_k; j++) {
                    q[2 * j] = bytes[j] & 15;
                    q[2 * j + 1] = bytes[j] >> 4;
                }
            } else {
                for (int64_t c = 0; c < k; c++) q[c] = (bytes[c * stride] >> shift) & 15;
            }
            for (int64_t g = 0, first = 0; first < k; g++, first += group) {
                const int64_t last = first + group < k ? first + group : k;
                const float s = bf16_to_f32(scale[g * n + row]), z = (float)zero[g * n + row];
                for (int64_t c = first; c < last; c++) values[c] = ((float)q[c] - z) * s;
            }
        }
        if (out_bf16)
            for (int64_t c = 0; c < k; c++) ((uint16_t *)out)[row * k + c] = f32_to_bf16(values[c]);
        else
            memcpy((float *)out + row * k, values, sizeof(float) * k);
    }
    return 1;
}
