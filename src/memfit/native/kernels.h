/* Row kernels for few-row matmuls (decode) over memfit's weight formats, shared by the per-matmul
 * operators (gemv.c) and the fused decode step (step.c).
 *
 * y[r, n] = sum_k x[r, k] * W[n, k] for the rows n in [first, last) of one weight, for every
 * input row r < m. Inputs come prepared (`Input`): x as float32 (values that are bf16 numbers when
 * the activations are bf16) and, where a kernel multiplies in bf16, the same values as bf16. Every
 * output row's dot product is computed by one thread in a fixed order, so a result does not depend
 * on how rows are split between threads.
 *
 * The AVX-512 loops keep several partial sums in flight, so they are not bound by the latency of one
 * chain of fused multiply-adds, and prefetch the weights ahead of the loads (see PREFETCH_BYTES).
 * Without AVX-512 the plain C loops run instead (the compiler vectorizes them).
 */
#ifndef MEMFIT_KERNELS_H
#define MEMFIT_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MEMFIT_AVX512 1
#if defined(__AVX512BF16__)
#define MEMFIT_AVX512_BF16 1
#endif
#endif

enum {
    KIND_F32 = 0,          /* float32 [N, K] */
    KIND_BF16 = 1,         /* bfloat16 [N, K] (activations bf16 too) */
    KIND_INT8 = 2,         /* int8 [N, K], bf16 scale [N] */
    KIND_INT4_PLAIN = 3,   /* uint8 [N, K / 2] row-major, column 2j low nibble; bf16 scale, uint8 zero [G, N] */
    KIND_INT4_BLOCKED = 4, /* the same values in 64-row k-major blocks (Int4Layout(64, half_pairs=True)) */
};

#define BLOCK 64 /* rows per block of the blocked int4 layout; each byte holds row i (low) and i + 32 (high) */

typedef struct {
    int32_t kind;
    int32_t pad_;
    const void *data;
    const uint16_t *scale; /* bf16: [N] (int8) or [G, N] (int4) */
    const uint8_t *zero;   /* uint8 [G, N] (int4) */
    int64_t n, k, group;   /* rows, columns, columns per group (int4) */
} Weight;

typedef struct {
    const float *f;    /* [m, k] float32 */
    const uint16_t *b; /* [m, k] the same values as bf16 (rounded), or NULL where no kernel needs them */
    int64_t m, k;
} Input;

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

/* ``v`` as the activation dtype holds it: rounded to bf16 when ``bf16``, else unchanged */
static inline float round_act(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* Whether `weight_rows` can run ``w`` (shape conditions of the fast loops). */
static inline int weight_supported(const Weight *w) {
    switch (w->kind) {
    case KIND_F32: case KIND_INT8: return 1;
    case KIND_BF16: return w->k % 32 == 0;
    case KIND_INT4_PLAIN: return w->group % 32 == 0 && w->k % 32 == 0;
    case KIND_INT4_BLOCKED: return w->group % 2 == 0 && (w->n % BLOCK) % 2 == 0;
    default: return 0;
    }
}

/* Whether ``w`` reads the bf16 copy of its input. */
static inline int weight_reads_bf16(const Weight *w) { return w->kind == KIND_BF16 || w->kind == KIND_INT4_PLAIN; }

/* Software prefetch: the loops below read each weight once, front to back, and on the machines
 * measured the hardware prefetcher alone let a core stream int8 weights at about 5 GB/s while
 * computing (16.7 GB/s for a plain read); asking for the line PREFETCH_BYTES ahead lifts two cores
 * to about 41 GB/s (2048 to 16384 bytes ahead measured about the same). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 3
#endif

static inline void prefetch(const void *p) { __builtin_prefetch(p, 0, PREFETCH_LOCALITY); }

/* -- float32, bf16 and int8 weights: one row at a time, four partial sums -------------------------- */
#ifdef MEMFIT_AVX512
static inline __m512 load_int8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static inline __mmask16 tail_mask(int64_t count) { return (__mmask16)((1u << count) - 1); }

static inline float reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

static inline __m512 load_int8_tail(__mmask16 m, const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

/* x . w for one row of k weights of type T: four partial sums of 16 lanes, 64 weights an
 * iteration, the weights' lines asked for PREFETCH_BYTES ahead, a masked tail */
#define DEFINE_DOT(NAME, T, LOAD, LOAD_TAIL)                                                              \
    static inline float NAME(const float *x, const T *w, int64_t k) {                                      \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                       \
        int64_t c = 0;                                                                                    \
        for (; c + 64 <= k; c += 64) {                                                                    \
            for (int64_t at = 0; at < 64 * (int64_t)sizeof(T); at += 64)                                  \
                prefetch((const char *)(w + c) + PREFETCH_BYTES + at);                                    \
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c), LOAD(w + c), a0);                                 \
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 16), LOAD(w + c + 16), a1);                       \
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 32), LOAD(w + c + 32), a2);                       \
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 48), LOAD(w + c + 48), a3);                       \
        }                                                                                                 \
        for (; c < k; c += 16) {                                                                          \
            const __mmask16 m = tail_mask(k - c < 16 ? k - c : 16);                                       \
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + c), LOAD_TAIL(m, w + c), a0);                \
        }                                                                                                 \
        return reduce4(a0, a1, a2, a3);                                                                   \
    }
DEFINE_DOT(dot_int8, int8_t, load_int8, load_int8_tail)
DEFINE_DOT(dot_f32, float, _mm512_loadu_ps, _mm512_maskz_loadu_ps)
#else
static inline float dot_int8(const float *x, const int8_t *w, int64_t k) {
    float total = 0;
    #pragma omp simd reduction(+:total)
    for (int64_t i = 0; i < k; i++) total += x[i] * (float)w[i];
    return total;
}

static inline float dot_f32(const float *x, const float *w, int64_t k) {
    float total = 0;
    #pragma omp simd reduction(+:total)
    for (int64_t i = 0; i < k; i++) total += x[i] * w[i];
    return total;
}
#endif

/* bf16 weights times bf16 activations: vdpbf16ps, 32 products per instruction (k a multiple of 32) */
#ifdef MEMFIT_AVX512_BF16
static inline float dot_bf16(const uint16_t *x, const uint16_t *w, int64_t k) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = 0;
    for (; c + 128 <= k; c += 128) {
        for (int i = 0; i < 4; i++) prefetch((const char *)(w + c) + PREFETCH_BYTES + 64 * i);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + c), (__m512bh)_mm512_loadu_si512(w + c));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + c + 32), (__m512bh)_mm512_loadu_si512(w + c + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(x + c + 64), (__m512bh)_mm512_loadu_si512(w + c + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(x + c + 96), (__m512bh)_mm512_loadu_si512(w + c + 96));
    }
    for (; c < k; c += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + c), (__m512bh)_mm512_loadu_si512(w + c));
    return reduce4(a0, a1, a2, a3);
}
#else
static inline float dot_bf16(const uint16_t *x, const uint16_t *w, int64_t k) {
    float total = 0;
    #pragma omp simd reduction(+:total)
    for (int64_t i = 0; i < k; i++) total += bf16_to_f32(x[i]) * bf16_to_f32(w[i]);
    return total;
}
#endif

/* -- int4, plain layout ---------------------------------------------------------------------------
 * Activations as bf16. With AVX512-BF16 a nibble q becomes the bf16 number 128 + q by OR-ing it
 * into 0x4300, so 16 bytes (32 columns) become 32 bf16 weights in column order with a few integer
 * operations, and one vdpbf16ps multiplies them with 32 activations, accumulating in float32; the
 * 128 and the zero point are taken off per group with the group's activation sum:
 * sum_k x_k (q_k - z) s = s (sum_k x_k (128 + q_k) - (128 + z) sum_k x_k). */
static inline void int4_group_sums(const uint16_t *xb, int64_t k, int64_t group, float *sums) {
    for (int64_t g = 0, first = 0; first < k; g++, first += group) {
        const int64_t last = first + group < k ? first + group : k;
        float total = 0;
        for (int64_t c = first; c < last; c++) total += bf16_to_f32(xb[c]);
        sums[g] = total;
    }
}

#ifdef MEMFIT_AVX512_BF16
static inline __m512bh int4_plain_bf16x32(const uint8_t *bytes) {
    const __m512i low = _mm512_set1_epi32(0x0f), high = _mm512_set1_epi32(0x0f0000), base = _mm512_set1_epi32(0x43004300);
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    return (__m512bh)_mm512_or_si512(_mm512_or_si512(_mm512_and_si512(d, low), _mm512_and_si512(_mm512_slli_epi32(d, 12), high)), base);
}

/* row ``n`` of the weight, one input row xb [k] with its group sums */
static inline float int4_plain_row(const uint16_t *xb, const float *sums, const Weight *w, int64_t row) {
    const int64_t k = w->k, group = w->group, n = w->n;
    const uint8_t *bytes = (const uint8_t *)w->data + row * (k / 2);
    __m512 total = _mm512_setzero_ps();
    float offset = 0;
    for (int64_t g = 0, first = 0; first < k; g++, first += group) {
        const int64_t last = first + group < k ? first + group : k;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        int64_t c = first;
        for (; c + 64 <= last; c += 64) {
            if (c % 128 == 0) prefetch(bytes + c / 2 + PREFETCH_BYTES);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(xb + c), int4_plain_bf16x32(bytes + c / 2));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(xb + c + 32), int4_plain_bf16x32(bytes + c / 2 + 16));
        }
        if (c < last) {
            prefetch(bytes + c / 2 + PREFETCH_BYTES);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(xb + c), int4_plain_bf16x32(bytes + c / 2));
        }
        const float s = bf16_to_f32(w->scale[g * n + row]);
        total = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_add_ps(a0, a1), total);
        offset += s * (128.0f + (float)w->zero[g * n + row]) * sums[g];
    }
    return _mm512_reduce_add_ps(total) - offset;
}
#else
static inline float int4_plain_row(const uint16_t *xb, const float *sums, const Weight *w, int64_t row) {
    const int64_t k = w->k, group = w->group, n = w->n;
    const uint8_t *bytes = (const uint8_t *)w->data + row * (k / 2);
    float result = 0;
    for (int64_t g = 0, first = 0; first < k; g++, first += group) {
        const int64_t last = first + group < k ? first + group : k;
        float acc = 0;
        for (int64_t c = first; c < last; c += 2)
            acc += bf16_to_f32(xb[c]) * (float)(bytes[c / 2] & 15) + bf16_to_f32(xb[c + 1]) * (float)(bytes[c / 2] >> 4);
        result += bf16_to_f32(w->scale[g * n + row]) * (acc - (float)w->zero[g * n + row] * sums[g]);
    }
    return result;
}
#endif

/* -- int4, blocked layout: full blocks of 64 rows, each k-major [K, 32] bytes (byte j holds row j
 * in its low nibble and row j + 32 in its high one); a tail of T rows (T even) k-major [K, T / 2]
 * pairing neighbours. One block (or the tail) for one input row x (float). ------------------------ */
static inline void int4_blocked_tail(const float *x, const Weight *w, int64_t b, float *out) {
    const int64_t k = w->k, group = w->group, n = w->n, first = b * BLOCK, rows = n - first, half = rows / 2;
    const uint8_t *block = (const uint8_t *)w->data + first * (k / 2);
    for (int64_t j = 0; j < rows; j++) out[j] = 0;
    for (int64_t g = 0, lo_k = 0; lo_k < k; g++, lo_k += group) {
        const int64_t hi_k = lo_k + group < k ? lo_k + group : k;
        float acc[BLOCK] = {0}, xsum = 0;
        for (int64_t c = lo_k; c < hi_k; c++) { /* byte j pairs rows 2j (low) and 2j + 1 (high) */
            const float xv = x[c];
            const uint8_t *bytes = block + c * half;
            xsum += xv;
            for (int64_t j = 0; j < half; j++) {
                acc[2 * j] += xv * (float)(bytes[j] & 15);
                acc[2 * j + 1] += xv * (float)(bytes[j] >> 4);
            }
        }
        const uint16_t *s = w->scale + g * n + first;
        const uint8_t *z = w->zero + g * n + first;
        for (int64_t j = 0; j < rows; j++) out[j] += bf16_to_f32(s[j]) * (acc[j] - (float)z[j] * xsum);
    }
}

#ifdef MEMFIT_AVX512
static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 load_u8x16(const uint8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#endif

static inline void int4_blocked_block(const float *x, const Weight *w, int64_t b, float *out) {
    const int64_t k = w->k, group = w->group, n = w->n, first = b * BLOCK;
    if (first + BLOCK > n) {
        int4_blocked_tail(x, w, b, out);
        return;
    }
#ifdef MEMFIT_AVX512
    const uint8_t *block = (const uint8_t *)w->data + first * (k / 2);
    const __m512i nibble = _mm512_set1_epi32(15);
    __m512 o[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0, lo_k = 0; lo_k < k; g++, lo_k += group) {
        const int64_t hi_k = lo_k + group < k ? lo_k + group : k;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        float xsum = 0;
        for (int64_t c = lo_k; c < hi_k; c++) {
            const uint8_t *bytes = block + c * (BLOCK / 2);
            if (c % 2 == 0) prefetch(bytes + PREFETCH_BYTES);
            const __m512 xv = _mm512_set1_ps(x[c]);
            xsum += x[c];
            const __m512i d0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));      /* rows 0-15 | 32-47 */
            const __m512i d1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + 16))); /* rows 16-31 | 48-63 */
            acc[0] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_and_si512(d0, nibble)), acc[0]);
            acc[1] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_and_si512(d1, nibble)), acc[1]);
            acc[2] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_srli_epi32(d0, 4)), acc[2]);
            acc[3] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_srli_epi32(d1, 4)), acc[3]);
        }
        const __m512 sum = _mm512_set1_ps(xsum);
        for (int q = 0; q < 4; q++) {
            const __m512 s = load_bf16x16(w->scale + g * n + first + 16 * q);
            const __m512 z = load_u8x16(w->zero + g * n + first + 16 * q);
            o[q] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, sum, acc[q]), o[q]);
        }
    }
    for (int q = 0; q < 4; q++) _mm512_storeu_ps(out + 16 * q, o[q]);
#else
    const uint8_t *block = (const uint8_t *)w->data + first * (k / 2);
    for (int64_t j = 0; j < BLOCK; j++) out[j] = 0;
    for (int64_t g = 0, lo_k = 0; lo_k < k; g++, lo_k += group) {
        const int64_t hi_k = lo_k + group < k ? lo_k + group : k;
        float acc[BLOCK] = {0}, xsum = 0;
        for (int64_t c = lo_k; c < hi_k; c++) {
            const float xv = x[c];
            const uint8_t *bytes = block + c * (BLOCK / 2);
            xsum += xv;
            for (int j = 0; j < BLOCK / 2; j++) {
                acc[j] += xv * (float)(bytes[j] & 15);
                acc[j + BLOCK / 2] += xv * (float)(bytes[j] >> 4);
            }
        }
        const uint16_t *s = w->scale + g * n + first;
        const uint8_t *z = w->zero + g * n + first;
        for (int64_t j = 0; j < BLOCK; j++) out[j] += bf16_to_f32(s[j]) * (acc[j] - (float)z[j] * xsum);
    }
#endif
}

/* -- one weight's rows [first, last) for every input row ------------------------------------------
 * y: float32 [m, ldy], row r's outputs at y + r * ldy (+ n). For the blocked int4 layout, first and
 * last fall on block boundaries (or n). */
static inline void weight_rows(const Weight *w, const Input *in, float *y, int64_t ldy, int64_t first, int64_t last) {
    const int64_t k = w->k, m = in->m;
    switch (w->kind) {
    case KIND_F32:
        for (int64_t n = first; n < last; n++)
            for (int64_t r = 0; r < m; r++) y[r * ldy + n] = dot_f32(in->f + r * k, (const float *)w->data + n * k, k);
        break;
    case KIND_BF16:
        for (int64_t n = first; n < last; n++)
            for (int64_t r = 0; r < m; r++) y[r * ldy + n] = dot_bf16(in->b + r * k, (const uint16_t *)w->data + n * k, k);
        break;
    case KIND_INT8:
        for (int64_t n = first; n < last; n++) {
            const float s = bf16_to_f32(w->scale[n]);
            for (int64_t r = 0; r < m; r++) y[r * ldy + n] = dot_int8(in->f + r * k, (const int8_t *)w->data + n * k, k) * s;
        }
        break;
    case KIND_INT4_PLAIN: {
        const int64_t groups = (k + w->group - 1) / w->group;
        float sums[m * groups];
        for (int64_t r = 0; r < m; r++) int4_group_sums(in->b + r * k, k, w->group, sums + r * groups);
        for (int64_t n = first; n < last; n++)
            for (int64_t r = 0; r < m; r++) y[r * ldy + n] = int4_plain_row(in->b + r * k, sums + r * groups, w, n);
        break;
    }
    case KIND_INT4_BLOCKED:
        for (int64_t b = first / BLOCK; b * BLOCK < last; b++) {
            const int64_t rows = w->n - b * BLOCK < BLOCK ? w->n - b * BLOCK : BLOCK;
            for (int64_t r = 0; r < m; r++) {
                float out[BLOCK];
                int4_blocked_block(in->f + r * k, w, b, out);
                memcpy(y + r * ldy + b * BLOCK, out, sizeof(float) * rows);
            }
        }
        break;
    }
}

/* The share [*first, *last) of ``units`` work units that thread ``tid`` of ``threads`` takes. */
static inline void thread_share(int64_t units, int tid, int threads, int64_t *first, int64_t *last) {
    *first = units * tid / threads;
    *last = units * (tid + 1) / threads;
}

/* Rows of ``w`` that go together to one thread: whole blocks of the blocked int4 layout, else 16. */
static inline int64_t row_unit(const Weight *w) { return w->kind == KIND_INT4_BLOCKED ? BLOCK : 16; }

#endif
