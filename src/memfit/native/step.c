/* The decode step of a llama-family model in one call: every layer of one token (per batch row).
 *
 * What `memfit.runtime.decoder.Decoder.forward` computes for one new token per row, with the same
 * operations in the same dtypes (activations float32 or bf16; bf16 results rounded where the
 * PyTorch step rounds them), over the model's own tensors: the weights as memfit holds them
 * (kernels.h), the norms, the rotary table and the static KV cache, which it writes in place.
 * Called once per token instead of once per matmul, so no Python, dispatcher or graph runs between
 * the layers, and all threads stay in one OpenMP parallel region, meeting at a barrier between
 * stages that depend on each other.
 *
 * Per layer: RMSNorm -> q, k, v -> rotary -> cache write -> attention over the row's columns ->
 * o -> residual -> RMSNorm -> gate, up -> SiLU(gate) * up -> down -> residual. Then the final
 * RMSNorm and the output head, whose float32 logits [B, V] are the result.
 */
#include <float.h>
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

typedef struct {
    Weight w;
    const void *bias; /* [N] in the activation dtype, or NULL */
} Linear;

typedef struct {
    const void *input_norm, *post_norm; /* [hidden], activation dtype */
    Linear q, k, v, o, gate, up, down;
    void *keys, *values; /* [B, KV, L, D], activation dtype */
    int64_t heads, kv_heads;
    int64_t streamed; /* its weights come from the model's stream, five units (stream.c) */
} Layer;

typedef struct {
    int64_t num_layers, hidden, head_dim, vocab, batch, max_len, window; /* window: 0 for none */
    float eps, scaling;
    int32_t act_bf16;   /* activations, norms, biases, caches and rotary tables in bf16 (else float32) */
    int32_t embed_int8; /* embedding rows int8 with bf16 scales (else a float table in the activation dtype) */
    const void *embed;
    const uint16_t *embed_scale;
    const void *cos, *sin; /* [rotary rows, head_dim], activation dtype */
    const void *final_norm;
    Linear head;
    const Layer *layers;
    struct Stream *stream; /* streamed layers' weights (NULL if every layer is resident) */
    int64_t threads;       /* threads of the step (0: OpenMP's default) */
} Model;

/* stream.c: a streamed layer's units, in the order the step uses them: attention inputs (input
 * norm, q, k, v), attention output (o, post-attention norm), gate, up, down. Thread 0 acquires
 * each before the barrier that starts its stage (acquire writes the unit's pointers into the
 * layer) and releases it as soon as its last use has ended, before acquiring the next, so at most
 * gate and up are held at once. Every thread takes part in an acquire: a unit the background reader
 * has not claimed is read by all of them (on a machine whose reads are page-cache copies, one
 * thread copies at about half the rate two do). */
struct Stream;
int memfit_stream_claim(struct Stream *s, int64_t *at, int64_t *unit);
int memfit_stream_read(struct Stream *s, int64_t unit, int64_t at, int part, int parts);
int64_t memfit_stream_finish(struct Stream *s, int mine, int err);
void memfit_stream_release(struct Stream *s);

typedef struct {
    int64_t at, unit;
    int mine, err;
} Claim;

/* Acquires a streamed layer's next unit with every thread: if the background reader has not
 * claimed it, the step's threads read it together (each a slice of every tensor); called by all
 * threads (it holds barriers, the last after the unit's pointers are written). */
static void acquire_all(const Model *md, Claim *c, int tid, int threads) {
    if (tid == 0) {
        c->err = 0;
        c->mine = memfit_stream_claim(md->stream, &c->at, &c->unit);
    }
    #pragma omp barrier
    if (c->mine > 0) {
        const int err = memfit_stream_read(md->stream, c->unit, c->at, tid, threads);
        if (err) {
            #pragma omp atomic write
            c->err = err;
        }
        #pragma omp barrier
    }
    if (tid == 0) memfit_stream_finish(md->stream, c->mine > 0, c->err);
    #pragma omp barrier /* the unit's pointers are written, and *c may be reused */
}

#define ACQUIRE(l, n) do { if ((l)->streamed) for (int u_ = 0; u_ < (n); u_++) acquire_all(md, claim, tid, threads); } while (0)
#define RELEASE(l, n) do { if ((l)->streamed) for (int u_ = 0; u_ < (n); u_++) memfit_stream_release(md->stream); } while (0)

#ifdef MEMFIT_PROFILE /* stage times of thread 0, for development (benchmark harnesses define it) */
double memfit_profile[16];
const char *memfit_profile_names[16] = {"qkv", "rope+cache", "attention", "o", "norm", "gate/up", "silu", "down",
                                        "final norm", "head", "input norm"};
#define MARK(i) do { if (tid == 0) { const double now_ = omp_get_wtime(); memfit_profile[i] += now_ - mark_; mark_ = now_; } } while (0)
#else
#define MARK(i) do { } while (0)
#endif

static inline float load_act(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_act(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* The widest input of any matmul and the most heads of any layer, for the scratch layout. */
static void widths(const Model *md, int64_t *width, int64_t *heads, int64_t *inter) {
    *width = md->hidden, *heads = 1, *inter = 1;
    for (int64_t i = 0; i < md->num_layers; i++) {
        const Layer *l = &md->layers[i];
        *heads = max64(*heads, l->heads);
        *inter = max64(*inter, l->gate.w.n);
        *width = max64(*width, max64(l->o.w.k, l->down.w.k));
    }
}

/* Scratch floats `memfit_step` needs for this model and its batch. */
int64_t memfit_step_scratch(const Model *md) {
    int64_t width, heads, inter;
    widths(md, &width, &heads, &inter);
    const int64_t b = md->batch, d = md->head_dim;
    /* h, x (normalized / matmul input), its bf16 copy, q k v, attention, a [B, width] output, gate
     * and up outputs, the gated products as bf16, scores */
    return b * (md->hidden + width + (width + 1) / 2 + 4 * heads * d + width + 2 * inter + (inter + 1) / 2 +
                heads * md->max_len);
}

/* y = RMSNorm(h) * weight, as LlamaRMSNorm: float32 statistics, then rounded to the activation
 * dtype, times the weight, rounded again. */
static void rms_norm(const float *h, const void *weight, float *y, int64_t n, float eps, int bf16) {
    float total = 0;
    for (int64_t i = 0; i < n; i++) total += h[i] * h[i];
    const float r = 1.0f / sqrtf(total / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = round_act(load_act(weight, i, bf16) * round_act(h[i] * r, bf16), bf16);
}

static void to_bf16(const float *x, uint16_t *xb, int64_t n) {
    for (int64_t i = 0; i < n; i++) xb[i] = f32_to_bf16(x[i]);
}

typedef struct {
    const Linear *linear;
    float *y; /* [B, N] */
} Job;

/* Calls ``each`` with the rows [first, last) of each job that thread ``tid`` takes: the rows of
 * several matmuls sharing one input, split across the threads in units of rows. */
#define FOR_SHARE(jobs, count, tid, threads, BODY)                                                         \
    do {                                                                                                  \
        int64_t units_ = 0, first_, last_, seen_ = 0;                                                      \
        for (int j_ = 0; j_ < (count); j_++) units_ += (jobs[j_].linear->w.n + row_unit(&jobs[j_].linear->w) - 1) / row_unit(&jobs[j_].linear->w); \
        thread_share(units_, (tid), (threads), &first_, &last_);                                           \
        for (int j_ = 0; j_ < (count) && seen_ < last_; j_++) {                                           \
            const Job *job = &jobs[j_];                                                                   \
            const Weight *w = &job->linear->w;                                                            \
            const int64_t unit_ = row_unit(w), mine_ = (w->n + unit_ - 1) / unit_;                          \
            const int64_t a_ = first_ > seen_ ? first_ - seen_ : 0, b_ = last_ - seen_ < mine_ ? last_ - seen_ : mine_; \
            if (a_ < b_) {                                                                                \
                const int64_t first = a_ * unit_, last = b_ * unit_ < w->n ? b_ * unit_ : w->n;            \
                BODY;                                                                                     \
            }                                                                                             \
            seen_ += mine_;                                                                               \
        }                                                                                                 \
    } while (0)

static void run_jobs(const Job *jobs, int count, const Input *in, int tid, int threads) {
    FOR_SHARE(jobs, count, tid, threads, weight_rows(w, in, job->y, w->n, first, last));
}

/* Bytes of one weight row as stored. */
static int64_t row_bytes(const Weight *w) {
    switch (w->kind) {
    case KIND_F32: return w->k * 4;
    case KIND_BF16: return w->k * 2;
    case KIND_INT8: return w->k;
    default: return w->k / 2;
    }
}

/* Asks for the first ``bytes`` of this thread's rows of the next stage's weights, while the thread
 * would otherwise wait (at a barrier, or for another thread's serial work): the start of each
 * stage then finds them in the cache instead of waiting on memory before its own prefetching
 * runs ahead. */
#ifndef EARLY_BYTES
#define EARLY_BYTES 16384
#endif

static void prefetch_jobs(const Job *jobs, int count, int tid, int threads) {
    FOR_SHARE(jobs, count, tid, threads, {
        const char *data = (const char *)w->data + first * row_bytes(w);
        const int64_t bytes = (last - first) * row_bytes(w) < EARLY_BYTES ? (last - first) * row_bytes(w) : EARLY_BYTES;
        for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(data + at, 0, 2);
    });
}

/* y = round(round(y) + bias) for a matmul's float outputs, as the step rounds them */
static void finish(const Linear *l, float *y, int64_t b, int bf16) {
    const int64_t n = l->w.n;
    if (!bf16 && !l->bias) return; /* float32 results stand as computed */
    for (int64_t i = 0; i < b * n; i++) {
        float v = round_act(y[i], bf16);
        if (l->bias) v = round_act(v + load_act(l->bias, i % n, bf16), bf16);
        y[i] = v;
    }
}

/* Rotary embedding of one head vector in place: x * cos + rotate_half(x) * sin, rounded after
 * each operation as the step's elementwise ops round; cos and sin: the position's row [d] */
static void rotate(float *x, const float *cos, const float *sin, int64_t d, int bf16) {
    float out[d];
    const int64_t half = d / 2;
    for (int64_t i = 0; i < d; i++) {
        const float rotated = i < half ? -x[i + half] : x[i - half];
        out[i] = round_act(round_act(x[i] * cos[i], bf16) + round_act(rotated * sin[i], bf16), bf16);
    }
    memcpy(x, out, sizeof(float) * d);
}

/* q . key_j for the columns j in [first, first + count) of one cache head [L, d] */
static void key_scores(const float *q, const void *keys, int64_t first, int64_t count, int64_t d, float scaling,
                       float *s, int bf16) {
#ifdef MEMFIT_AVX512
    if (d % 16 == 0 && d <= 256) {
        __m512 qv[16];
        for (int64_t i = 0; i < d / 16; i++) qv[i] = _mm512_loadu_ps(q + 16 * i);
        const int64_t row = d * (bf16 ? 2 : 4);
        for (int64_t j = 0; j < count; j++) {
            const char *ahead = (const char *)keys + (first + j + 8) * row;  /* the cache is read once: stream it */
            for (int64_t at = 0; at < row; at += 64) prefetch(ahead + at);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < d / 16; i++) {
                const __m512 kv = bf16 ? load_bf16x16((const uint16_t *)keys + (first + j) * d + 16 * i)
                                       : _mm512_loadu_ps((const float *)keys + (first + j) * d + 16 * i);
                acc = _mm512_fmadd_ps(qv[i], kv, acc);
            }
            s[j] = _mm512_reduce_add_ps(acc) * scaling;
        }
        return;
    }
#endif
    for (int64_t j = 0; j < count; j++) {
        float dot = 0;
        for (int64_t i = 0; i < d; i++) dot += q[i] * load_act(keys, (first + j) * d + i, bf16);
        s[j] = dot * scaling;
    }
}

/* acc[0:d] = sum_j p_j value_j over the columns [first, first + count) */
static void weighted_values(const float *p, const void *values, int64_t first, int64_t count, int64_t d, float *acc,
                            int bf16) {
#ifdef MEMFIT_AVX512
    if (d % 16 == 0 && d <= 256) {
        __m512 a[16];
        for (int64_t i = 0; i < d / 16; i++) a[i] = _mm512_setzero_ps();
        const int64_t row = d * (bf16 ? 2 : 4);
        for (int64_t j = 0; j < count; j++) {
            const char *ahead = (const char *)values + (first + j + 8) * row;
            for (int64_t at = 0; at < row; at += 64) prefetch(ahead + at);
            const __m512 pj = _mm512_set1_ps(p[j]);
            for (int64_t i = 0; i < d / 16; i++) {
                const __m512 vv = bf16 ? load_bf16x16((const uint16_t *)values + (first + j) * d + 16 * i)
                                       : _mm512_loadu_ps((const float *)values + (first + j) * d + 16 * i);
                a[i] = _mm512_fmadd_ps(pj, vv, a[i]);
            }
        }
        for (int64_t i = 0; i < d / 16; i++) _mm512_storeu_ps(acc + 16 * i, a[i]);
        return;
    }
#endif
    for (int64_t i = 0; i < d; i++) acc[i] = 0;
    for (int64_t j = 0; j < count; j++)
        for (int64_t i = 0; i < d; i++) acc[i] += p[j] * load_act(values, (first + j) * d + i, bf16);
}

/* One query head of one row over its cache columns [first, column]: softmax(q K^T * scale) V,
 * in float32 (keys and values read as float32 or bf16), rounded to the activation dtype at the
 * end; the result also goes to ``outb`` as bf16 (the o matmul's input). */
static void attend(const float *q, const void *keys, const void *values, int64_t first, int64_t column, int64_t d,
                   float scaling, float *scores, float *out, uint16_t *outb, int bf16) {
    const int64_t count = column - first + 1;
    float *s = scores + first;
    key_scores(q, keys, first, count, d, scaling, s, bf16);
    float top = -FLT_MAX, total = 0;
    for (int64_t j = 0; j < count; j++) top = s[j] > top ? s[j] : top;
    for (int64_t j = 0; j < count; j++) s[j] = expf(s[j] - top);
    for (int64_t j = 0; j < count; j++) total += s[j];
    const float inverse = 1.0f / total;
    for (int64_t j = 0; j < count; j++) s[j] *= inverse;
    float acc[d];
    weighted_values(s, values, first, count, d, acc, bf16);
    for (int64_t i = 0; i < d; i++) {
        out[i] = round_act(acc[i], bf16);
        outb[i] = f32_to_bf16(out[i]);
    }
}

/* prod[j] = SiLU(gate[j]) * up[j] for j in [first, last) of each input row, rounded as the step
 * rounds (gate and up first, then SiLU, then the product), and the products as bf16. */
static void gated(const Linear *gate_l, const Linear *up_l, float *gate, float *up, uint16_t *xb, int64_t b,
                  int64_t n, int64_t first, int64_t last, int bf16) {
    for (int64_t r = 0; r < b; r++)
        for (int64_t j = r * n + first; j < r * n + last; j++) {
            float g = round_act(gate[j], bf16), u = round_act(up[j], bf16);
            if (gate_l->bias) g = round_act(g + load_act(gate_l->bias, j - r * n, bf16), bf16);
            if (up_l->bias) u = round_act(u + load_act(up_l->bias, j - r * n, bf16), bf16);
            const float silu = round_act(g / (1.0f + expf(-g)), bf16);
            gate[j] = round_act(silu * u, bf16);
            xb[j] = f32_to_bf16(gate[j]);
        }
}

/* Thread 0's serial part: ``block``'s output (``out``, if any) added to the residual stream h, then
 * the rows' RMSNorm of h into x and xb. */
static void add_block(const Linear *block, const float *out, float *h, int64_t b, int64_t n, int bf16) {
    finish(block, (float *)out, b, bf16);
    for (int64_t i = 0; i < b * n; i++) h[i] = round_act(h[i] + out[i], bf16);
}

static void normalize(const float *h, const void *weight, float *x, uint16_t *xb, int64_t b, int64_t n, float eps,
                      int bf16) {
    for (int64_t r = 0; r < b; r++) rms_norm(h + r * n, weight, x + r * n, n, eps, bf16);
    to_bf16(x, xb, b * n);
}

static void add_and_normalize(const Linear *block, const float *out, float *h, const void *weight, float *x,
                              uint16_t *xb, int64_t b, int64_t n, float eps, int bf16) {
    add_block(block, out, h, b, n, bf16);
    normalize(h, weight, x, xb, b, n, eps, bf16);
}

/* ids [B]: the new token of each row; column: the cache column they take; pad [B]: each row's first
 * column (left padding); logits: float32 [B, V]; scratch: `memfit_step_scratch` floats. */
void memfit_step(const Model *md, const int64_t *ids, int64_t column, const int64_t *pad, float *logits, float *scratch) {
    const int bf16 = md->act_bf16;
    const int64_t B = md->batch, H = md->hidden, D = md->head_dim, L = md->max_len;
    int64_t width, heads_max, inter_max;
    widths(md, &width, &heads_max, &inter_max);
    float *h = scratch;                          /* [B, H] the residual stream */
    float *x = h + B * H;                        /* [B, width] a matmul's input */
    uint16_t *xb = (uint16_t *)(x + B * width);  /* [B, width] the same as bf16 */
    float *q = x + B * width + (B * width + 1) / 2; /* [B, heads * D] */
    float *k = q + B * heads_max * D;            /* [B, heads * D] (kv heads <= heads) */
    float *v = k + B * heads_max * D;
    float *att = v + B * heads_max * D;          /* [B, heads * D] */
    float *out = att + B * heads_max * D;        /* [B, width] o and down outputs */
    float *gate = out + B * width;               /* [B, inter] */
    float *up = gate + B * inter_max;            /* [B, inter] */
    /* [B, inter] the gated products as bf16 (down's input): not xb, which other threads may still
     * read as gate/up's input while one writes its products */
    uint16_t *gb = (uint16_t *)(up + B * inter_max);
    float *scores = up + B * inter_max + (B * inter_max + 1) / 2; /* [B, heads, L] */

    /* embedding */
    for (int64_t r = 0; r < B; r++)
        for (int64_t i = 0; i < H; i++) {
            if (md->embed_int8) {
                const float s = round_act(bf16_to_f32(md->embed_scale[ids[r]]), bf16);
                h[r * H + i] = round_act((float)((const int8_t *)md->embed)[ids[r] * H + i] * s, bf16);
            } else {
                h[r * H + i] = load_act(md->embed, ids[r] * H + i, bf16);
            }
        }

    Claim claim_ = {0}, *claim = &claim_; /* shared by the threads of the region */
    /* Each stage's matmuls split their rows across the threads; between them, thread 0 does the
     * small serial work (norms, rotary, cache writes) while the others ask for the first bytes of
     * their next weights; a barrier ends each stage. */
    #pragma omp parallel num_threads(md->threads > 0 ? (int)md->threads : omp_get_max_threads())
    {
        const int tid = omp_get_thread_num(), threads = omp_get_num_threads();
#ifdef MEMFIT_PROFILE
        double mark_ = omp_get_wtime();
#endif
        const Input xin = {.f = x, .b = xb, .m = B, .k = H};
        for (int64_t li = 0; li < md->num_layers; li++) {
            const Layer *l = &md->layers[li];
            const int64_t nh = l->heads, kvh = l->kv_heads, group = nh / kvh, inter = l->gate.w.n;
            const Job qkv[3] = {{&l->q, q}, {&l->k, k}, {&l->v, v}}, o[1] = {{&l->o, out}};
            const Job gu[2] = {{&l->gate, gate}, {&l->up, up}}, down[1] = {{&l->down, out}};
            if (tid == 0 && li > 0) { /* the previous layer's MLP residual */
                add_block(&l[-1].down, out, h, B, H, bf16);
                RELEASE(l - 1, 1); /* the previous layer's down */
            }
            ACQUIRE(l, 1); /* q, k, v and the input norm */
            if (tid == 0) {
                normalize(h, l->input_norm, x, xb, B, H, md->eps, bf16);
            } else {
                prefetch_jobs(qkv, 3, tid, threads);
            }
            #pragma omp barrier
            MARK(10);
            prefetch_jobs(o, 1, tid, threads);  /* the next stage's first lines, into the cache while this one streams */
            run_jobs(qkv, 3, &xin, tid, threads);
            #pragma omp barrier
            MARK(0);
            if (tid == 0) {
                finish(&l->q, q, B, bf16);
                finish(&l->k, k, B, bf16);
                finish(&l->v, v, B, bf16);
                RELEASE(l, 1); /* q, k, v and the input norm: the matmuls ended at the barrier */
                for (int64_t r = 0; r < B; r++) {
                    const int64_t position = column - pad[r] > 0 ? column - pad[r] : 0;
                    float cos[D], sin[D];
                    for (int64_t i = 0; i < D; i++) {
                        cos[i] = load_act(md->cos, position * D + i, bf16);
                        sin[i] = load_act(md->sin, position * D + i, bf16);
                    }
                    for (int64_t head = 0; head < nh; head++) rotate(q + (r * nh + head) * D, cos, sin, D, bf16);
                    for (int64_t head = 0; head < kvh; head++) {
                        rotate(k + (r * kvh + head) * D, cos, sin, D, bf16);
                        const int64_t at = ((r * kvh + head) * L + column) * D;
                        for (int64_t i = 0; i < D; i++) {
                            store_act(l->keys, at + i, k[(r * kvh + head) * D + i], bf16);
                            store_act(l->values, at + i, v[(r * kvh + head) * D + i], bf16);
                        }
                    }
                }
            } else {
                prefetch_jobs(o, 1, tid, threads);
            }
            ACQUIRE(l, 1); /* o and the post-attention norm */
            #pragma omp barrier
            MARK(1);
            {   /* attention: one (row, head) pair per unit; each writes its slice of o's input */
                int64_t first, last;
                thread_share(B * nh, tid, threads, &first, &last);
                const int64_t elem = bf16 ? 2 : 4;
                for (int64_t u = first; u < last; u++) {
                    const int64_t r = u / nh, head = u % nh, kv = head / group;
                    int64_t lo = pad[r];
                    if (md->window > 0 && column - md->window + 1 > lo) lo = column - md->window + 1;
                    const int64_t base = (r * kvh + kv) * L * D;
                    attend(q + (r * nh + head) * D, (const char *)l->keys + base * elem,
                           (const char *)l->values + base * elem, lo, column, D, md->scaling,
                           scores + (r * nh + head) * L, att + (r * nh + head) * D, xb + (r * nh + head) * D, bf16);
                }
                if (tid == 0) prefetch_jobs(o, 1, tid, threads);
            }
            #pragma omp barrier
            MARK(2);
            const Input ain = {.f = att, .b = xb, .m = B, .k = nh * D};
            prefetch_jobs(gu, 2, tid, threads);
            run_jobs(o, 1, &ain, tid, threads);
            #pragma omp barrier
            MARK(3);
            if (tid == 0) {
                add_and_normalize(&l->o, out, h, l->post_norm, x, xb, B, H, md->eps, bf16);
                RELEASE(l, 1); /* o and the post-attention norm */
            } else {
                prefetch_jobs(gu, 2, tid, threads);
            }
            ACQUIRE(l, 2); /* gate and up */
            #pragma omp barrier
            MARK(4);
            {   /* gate and up over the same rows, so each thread can take SiLU(gate) * up of its rows
                 * at once; units of the larger row unit of the two, which the smaller divides */
                const int64_t unit = row_unit(&l->gate.w) > row_unit(&l->up.w) ? row_unit(&l->gate.w) : row_unit(&l->up.w);
                int64_t a, b;
                thread_share((inter + unit - 1) / unit, tid, threads, &a, &b);
                const int64_t first = a * unit, last = b * unit < inter ? b * unit : inter;
                prefetch_jobs(down, 1, tid, threads);
                if (first < last) {
                    weight_rows(&l->gate.w, &xin, gate, inter, first, last);
                    weight_rows(&l->up.w, &xin, up, inter, first, last);
                    MARK(5);
                    gated(&l->gate, &l->up, gate, up, gb, B, inter, first, last, bf16);
                }
            }
            #pragma omp barrier
            MARK(6);
            if (l->streamed) { /* down arrives once gate and up are given back */
                if (tid == 0) RELEASE(l, 2);
                ACQUIRE(l, 1);
                #pragma omp barrier
            }
            const Input gin = {.f = gate, .b = gb, .m = B, .k = inter};
            if (li + 1 < md->num_layers) {
                const Layer *next = l + 1;
                const Job after[3] = {{&next->q, q}, {&next->k, k}, {&next->v, v}};
                prefetch_jobs(after, 3, tid, threads);
            } else {
                const Job after[1] = {{&md->head, logits}};
                prefetch_jobs(after, 1, tid, threads);
            }
            run_jobs(down, 1, &gin, tid, threads);
            #pragma omp barrier
            MARK(7);
        }
        const Job head[1] = {{&md->head, logits}};
        if (tid == 0) {
            add_block(&md->layers[md->num_layers - 1].down, out, h, B, H, bf16);
            RELEASE(&md->layers[md->num_layers - 1], 1); /* the last layer's down */
            normalize(h, md->final_norm, x, xb, B, H, md->eps, bf16);
        } else {
            prefetch_jobs(head, 1, tid, threads);
        }
        #pragma omp barrier
        MARK(8);
        const Input fin = {.f = x, .b = xb, .m = B, .k = H};
        run_jobs(head, 1, &fin, tid, threads);
        MARK(9);
    }
    finish(&md->head, logits, B, bf16);
}

/* ``steps`` greedy decode steps: each runs `memfit_step` for the rows' current tokens (``ids``,
 * updated in place) at the next column and takes each row's most likely next token, the first
 * index of the largest logit (a NaN counts as largest, as NumPy's argmax has it), into
 * out [steps, B]. One call for several tokens keeps Python out of the decode loop. */
void memfit_greedy(const Model *md, int64_t *ids, int64_t column, const int64_t *pad, int64_t steps, int64_t *out,
                   float *logits, float *scratch) {
    const int64_t b = md->batch, vocab = md->head.w.n;
    for (int64_t s = 0; s < steps; s++) {
        memfit_step(md, ids, column + s, pad, logits, scratch);
        for (int64_t r = 0; r < b; r++) {
            const float *row = logits + r * vocab;
            int64_t best = 0;
            float top = row[0];
            if (!isnan(top)) {
                for (int64_t j = 1; j < vocab; j++) {
                    if (isnan(row[j])) {
                        best = j;
                        break;
                    }
                    if (row[j] > top) top = row[j], best = j;
                }
            }
            out[s * b + r] = ids[r] = best;
        }
    }
}
