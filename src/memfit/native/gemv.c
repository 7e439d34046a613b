/* Few-row matmuls (decode: one to a few tokens) over memfit's packed weights, for the CPU.
 *
 * y[m, n] = sum_k x[m, k] * W[n, k], with W held int8 per row (W = q * scale[n]) or 4-bit in
 * groups along k (W = (q - zero[g, n]) * scale[g, n]) in the CPU int4 kernel's blocked layout.
 * x and y are float32 or bfloat16 (`bf16` = 1); accumulation is float32. Rows of W are split
 * across OpenMP threads (the process's one libgomp pool, shared with PyTorch).
 *
 * Built on first use by memfit (native.py) with the system C compiler for the machine it runs on
 * (-O3 -march=native): the loops below are written so the compiler vectorizes them (fixed-width
 * lanes, no cross-iteration dependency but the accumulators). At one row these read the weights
 * at close to the memory bandwidth; PyTorch's packed kernels reach about half of it there.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch's cast */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* x as float32: x itself, or (bf16) converted into the scratch xf */
static const float *as_float(const void *x, int bf16, float *xf, int64_t count) {
    if (!bf16) return (const float *)x;
    const uint16_t *src = (const uint16_t *)x;
    for (int64_t i = 0; i < count; i++) xf[i] = bf16_to_f32(src[i]);
    return xf;
}

static inline void store(void *y, int bf16, int64_t index, float value) {
    if (bf16) ((uint16_t *)y)[index] = f32_to_bf16(value);
    else ((float *)y)[index] = value;
}

static inline float dot_int8(const float *x, const int8_t *w, int64_t k) {
    float total = 0;
    #pragma omp simd reduction(+:total)
    for (int64_t i = 0; i < k; i++) total += x[i] * (float)w[i];
    return total;
}

/* x [M, K]; w int8 [N, K]; scale bf16 [N]; y [M, N]; xf: float scratch [M, K] */
void memfit_gemv_int8(const void *x, const int8_t *w, const uint16_t *scale, void *y, float *xf,
                      int64_t m, int64_t n, int64_t k, int bf16) {
    const float *xs = as_float(x, bf16, xf, m * k);
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; row++) {
        const float s = bf16_to_f32(scale[row]);
        for (int64_t r = 0; r < m; r++) store(y, bf16, r * n + row, dot_int8(xs + r * k, w + row * k, k) * s);
    }
}

#define BLOCK 64 /* rows per block of the int4 layout; each byte holds row i (low) and i + 32 (high) */

/* w: uint8 [N, K / 2] in the layout Int4Layout(block_n=64, half_pairs=True) describes: full blocks
 * of 64 rows, each k-major [K, 32]; a tail of T rows (T even) k-major [K, T / 2] pairing neighbours.
 * scale bf16 [G, N]; zero uint8 [G, N]; group: columns per group (the last may be short). */
void memfit_gemv_int4(const void *x, const uint8_t *w, const uint16_t *scale, const uint8_t *zero, void *y,
                      float *xf, int64_t m, int64_t n, int64_t k, int64_t group, int bf16) {
    const float *xs = as_float(x, bf16, xf, m * k);
    const int64_t full = n / BLOCK, tail = n - full * BLOCK, groups = (k + group - 1) / group;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < full + (tail > 0); b++) {
        const int64_t first = b * BLOCK, rows = b < full ? BLOCK : tail, half = rows / 2;
        const uint8_t *block = w + first * (k / 2);
        for (int64_t r = 0; r < m; r++) {
            const float *xr = xs + r * k;
            float out[BLOCK] = {0};
            for (int64_t g = 0; g < groups; g++) {
                const int64_t lo_k = g * group, hi_k = lo_k + group < k ? lo_k + group : k;
                float acc[BLOCK] = {0}, xsum = 0;
                if (b < full) {
                    for (int64_t c = lo_k; c < hi_k; c++) {
                        const float xv = xr[c];
                        const uint8_t *bytes = block + c * (BLOCK / 2);
                        xsum += xv;
                        for (int j = 0; j < BLOCK / 2; j++) {
                            acc[j] += xv * (float)(bytes[j] & 15);
                            acc[j + BLOCK / 2] += xv * (float)(bytes[j] >> 4);
                        }
                    }
                } else { /* tail: byte j pairs rows 2j (low) and 2j + 1 (high) */
                    for (int64_t c = lo_k; c < hi_k; c++) {
                        const float xv = xr[c];
                        const uint8_t *bytes = block + c * half;
                        xsum += xv;
                        for (int64_t j = 0; j < half; j++) {
                            acc[2 * j] += xv * (float)(bytes[j] & 15);
                            acc[2 * j + 1] += xv * (float)(bytes[j] >> 4);
                        }
                    }
                }
                const uint16_t *s = scale + g * n + first;
                const uint8_t *z = zero + g * n + first;
                for (int64_t j = 0; j < rows; j++) out[j] += bf16_to_f32(s[j]) * (acc[j] - (float)z[j] * xsum);
            }
            for (int64_t j = 0; j < rows; j++) store(y, bf16, r * n + first + j, out[j]);
        }
    }
}

/* w: uint8 [N, K / 2] in the plain layout (row-major; byte j of a row holds column 2j in its low
 * nibble and 2j + 1 in its high one); scale, zero, group as above (group even). xf: float scratch
 * of at least [M, K + groups]. */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* With AVX512-BF16: a nibble q becomes the bf16 number 128 + q by OR-ing it into 0x4300, so 16
 * bytes (32 columns) become 32 bf16 weights in column order with three integer operations, and one
 * vdpbf16ps multiplies them with 32 bf16 activations, accumulating in float32. The 128 is taken
 * off per group with the group's activation sum. Activations are rounded to bf16 (as PyTorch's
 * packed kernels round them). Groups must hold a multiple of 32 columns. */
static int int4_plain_bf16(const void *x, const uint8_t *w, const uint16_t *scale, const uint8_t *zero, void *y,
                           float *xf, int64_t m, int64_t n, int64_t k, int64_t group, int bf16) {
    if (group % 32 || k % 32) return 0;
    const int64_t groups = (k + group - 1) / group, width = k / 2 + groups; /* bf16 row, then its group sums */
    for (int64_t r = 0; r < m; r++) {
        uint16_t *xb = (uint16_t *)(xf + r * width);
        float *sums = xf + r * width + k / 2;
        for (int64_t c = 0; c < k; c++)
            xb[c] = bf16 ? ((const uint16_t *)x)[r * k + c] : f32_to_bf16(((const float *)x)[r * k + c]);
        for (int64_t g = 0; g < groups; g++) {
            float total = 0;
            for (int64_t c = g * group; c < (g + 1) * group && c < k; c++) total += bf16_to_f32(xb[c]);
            sums[g] = total;
        }
    }
    const __m512i low = _mm512_set1_epi32(0x0f), high = _mm512_set1_epi32(0x0f0000), base = _mm512_set1_epi32(0x43004300);
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *bytes = w + row * (k / 2);
        for (int64_t r = 0; r < m; r++) {
            const uint16_t *xb = (const uint16_t *)(xf + r * width);
            const float *sums = xf + r * width + k / 2;
            __m512 total = _mm512_setzero_ps();
            float offset = 0;
            for (int64_t g = 0; g < groups; g++) {
                const int64_t first = g * group, last = first + group < k ? first + group : k;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t c = first; c < last; c += 32) {
                    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + c / 2)));
                    __m512i pairs = _mm512_or_si512(_mm512_or_si512(_mm512_and_si512(d, low),
                                                                    _mm512_and_si512(_mm512_slli_epi32(d, 12), high)), base);
                    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)(xb + c)), (__m512bh)pairs);
                }
                const float s = bf16_to_f32(scale[g * n + row]);
                total = _mm512_fmadd_ps(_mm512_set1_ps(s), acc, total);
                offset += s * (128.0f + (float)zero[g * n + row]) * sums[g];
            }
            store(y, bf16, r * n + row, _mm512_reduce_add_ps(total) - offset);
        }
    }
    return 1;
}
#else
static int int4_plain_bf16(const void *x, const uint8_t *w, const uint16_t *scale, const uint8_t *zero, void *y,
                           float *xf, int64_t m, int64_t n, int64_t k, int64_t group, int bf16) {
    return 0;
}
#endif

void memfit_gemv_int4_plain(const void *x, const uint8_t *w, const uint16_t *scale, const uint8_t *zero, void *y,
                            float *xf, int64_t m, int64_t n, int64_t k, int64_t group, int bf16) {
    if (int4_plain_bf16(x, w, scale, zero, y, xf, m, n, k, group, bf16)) return;
    const int64_t groups = (k + group - 1) / group, half_group = group / 2, width = k + groups;
    for (int64_t r = 0; r < m; r++) { /* each row split: even columns, odd ones, then group sums */
        float *even = xf + r * width, *odd = even + k / 2, *sums = even + k;
        for (int64_t j = 0; j < k / 2; j++) {
            if (bf16) {
                const uint16_t *src = (const uint16_t *)x + r * k;
                even[j] = bf16_to_f32(src[2 * j]);
                odd[j] = bf16_to_f32(src[2 * j + 1]);
            } else {
                const float *src = (const float *)x + r * k;
                even[j] = src[2 * j];
                odd[j] = src[2 * j + 1];
            }
        }
        for (int64_t g = 0; g < groups; g++) {
            const int64_t lo = g * half_group, hi = lo + half_group < k / 2 ? lo + half_group : k / 2;
            float total = 0;
            for (int64_t j = lo; j < hi; j++) total += even[j] + odd[j];
            sums[g] = total;
        }
    }
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *bytes = w + row * (k / 2);
        for (int64_t r = 0; r < m; r++) {
            const float *even = xf + r * width, *odd = even + k / 2, *sums = even + k;
            float out = 0;
            for (int64_t g = 0; g < groups; g++) {
                const int64_t lo = g * half_group, hi = lo + half_group < k / 2 ? lo + half_group : k / 2;
                float acc = 0;
                #pragma omp simd reduction(+:acc)
                for (int64_t j = lo; j < hi; j++)
                    acc += even[j] * (float)(bytes[j] & 15) + odd[j] * (float)(bytes[j] >> 4);
                out += bf16_to_f32(scale[g * n + row]) * (acc - (float)zero[g * n + row] * sums[g]);
            }
            store(y, bf16, r * n + row, out);
        }
    }
}

/* Float weights: w bf16 (`w_bf16` = 1) or float32 [N, K]; x, y as above. */
static inline float dot_f32(const float *x, const float *w, int64_t k) {
    float total = 0;
    #pragma omp simd reduction(+:total)
    for (int64_t i = 0; i < k; i++) total += x[i] * w[i];
    return total;
}

static inline float dot_bf16(const float *x, const uint16_t *w, int64_t k) {
    float total = 0;
    #pragma omp simd reduction(+:total)
    for (int64_t i = 0; i < k; i++) total += x[i] * bf16_to_f32(w[i]);
    return total;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* bf16 weights and activations: vdpbf16ps multiplies 32 pairs per instruction, float32 accumulation
 * (four accumulators, so the adds do not wait on each other). k a multiple of 32. */
static int float_bf16_dp(const void *x, const uint16_t *w, void *y, int64_t m, int64_t n, int64_t k) {
    if (k % 32) return 0;
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; row++)
        for (int64_t r = 0; r < m; r++) {
            const uint16_t *xr = (const uint16_t *)x + r * k, *wr = w + row * k;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            int64_t c = 0;
            for (; c + 128 <= k; c += 128)
                for (int u = 0; u < 4; u++)
                    acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_loadu_si512((const void *)(xr + c + 32 * u)),
                                              (__m512bh)_mm512_loadu_si512((const void *)(wr + c + 32 * u)));
            for (; c < k; c += 32)
                acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_loadu_si512((const void *)(xr + c)),
                                          (__m512bh)_mm512_loadu_si512((const void *)(wr + c)));
            store(y, 1, r * n + row, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]),
                                                                         _mm512_add_ps(acc[2], acc[3]))));
        }
    return 1;
}
#else
static int float_bf16_dp(const void *x, const uint16_t *w, void *y, int64_t m, int64_t n, int64_t k) { return 0; }
#endif

void memfit_gemv_float(const void *x, const void *w, void *y, float *xf, int64_t m, int64_t n, int64_t k,
                       int bf16, int w_bf16) {
    if (bf16 && w_bf16 && float_bf16_dp(x, (const uint16_t *)w, y, m, n, k)) return;
    const float *xs = as_float(x, bf16, xf, m * k);
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; row++)
        for (int64_t r = 0; r < m; r++) {
            const float value = w_bf16 ? dot_bf16(xs + r * k, (const uint16_t *)w + row * k, k)
                                       : dot_f32(xs + r * k, (const float *)w + row * k, k);
            store(y, bf16, r * n + row, value);
        }
}
