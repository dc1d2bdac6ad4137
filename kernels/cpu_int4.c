/* quantkit's native CPU int4 kernel: bf16 dot products over 4-bit codes, AVX-512 + AVX512-BF16.
 *
 * Built once by quantkit.kernels.cpu_native (cc -O3 -fopenmp, cached) and called through ctypes.
 * Layout, made at load from codes q [N, K] (0..15), fp16 scales s and integer zeros z [N, G]:
 *
 *   w   uint8  [N16/16, K8/8, 64]  one 64-byte chunk = 16 rows x 8 columns; its 16-bit word
 *                                  2r + j holds, in nibble t (bits 4t..4t+3), q[r][k0 + 2t + j]
 *   s16 fp16   [N16/16, G, 16]     scales, 16 rows of a group side by side
 *   z   uint8  [N16/16, G, 16]     zero points (NULL: every zero is zconst)
 *
 * N16 = N rounded up to 16 (padded rows have scale 0), K8 = K rounded up to 8 (only when the
 * whole row is one group; padded codes meet zero activations).
 *
 * The product: bf16 holds 128 + q exactly with bits 0x4300 | q, so one ternary-logic op turns a
 * nibble into a bf16 weight and vdpbf16ps multiplies 2 columns x 16 rows per instruction:
 *   y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] * (128 + q[n, k]) - (128 + z[n, g]) * sum_{k in g} x[m, k])
 * with x rounded to bf16 (as PyTorch's int4 op does) and every sum in float32.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16_t;

static inline float bf16_to_f32(bf16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16_t f32_to_bf16(float f) { /* round to nearest even, as torch does (inputs are finite) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (bf16_t)(u >> 16);
}

static __thread void *scratch = NULL;
static __thread size_t scratch_bytes = 0;

static void *get_scratch(size_t n) {
    if (n > scratch_bytes) {
        free(scratch);
        scratch = aligned_alloc(64, (n + 63) / 64 * 64);
        scratch_bytes = scratch ? n : 0;
    }
    return scratch;
}

/* x [M, K] (float32 or bf16) -> xb [M, K8] bf16, columns gathered by perm (act-order) if given, zero
 * padded; xg [M, G] the float32 sum of each group of xb (the zero-point term). */
static void prepare_x(const void *x, int x_bf16, const int64_t *perm, int64_t M, int64_t K, int64_t K8, int64_t gs,
                      bf16_t *xb, float *xg) {
    int64_t G = K8 / gs;
    for (int64_t m = 0; m < M; m++) {
        bf16_t *row = xb + m * K8;
        if (perm) {
            for (int64_t k = 0; k < K; k++) {
                int64_t src = m * K + perm[k];
                row[k] = x_bf16 ? ((const bf16_t *)x)[src] : f32_to_bf16(((const float *)x)[src]);
            }
        } else if (x_bf16) {
            memcpy(row, (const bf16_t *)x + m * K, K * sizeof(bf16_t));
        } else {
            const float *xf = (const float *)x + m * K;
            int64_t k = 0;
            for (; k + 16 <= K; k += 16)
                _mm256_storeu_si256((__m256i *)(row + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xf + k)));
            for (; k < K; k++) row[k] = f32_to_bf16(xf[k]);
        }
        for (int64_t k = K; k < K8; k++) row[k] = 0;
        for (int64_t g = 0; g < G; g++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) {
                __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + k)));
                acc = _mm256_add_ps(acc, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
            }
            float t[8];
            _mm256_storeu_ps(t, acc);
            xg[m * G + g] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
        }
    }
}

#define INLINE static inline __attribute__((always_inline))

/* The four bf16 weight vectors of one 64-byte chunk: nibble t of every 16-bit word as 128 + q. */
INLINE void unpack_chunk(__m512i p, __m512i v[4]) {
    const __m512i magic = _mm512_set1_epi16(0x4300), nib = _mm512_set1_epi16(0x000F);
    v[0] = _mm512_ternarylogic_epi32(p, nib, magic, 0xEA); /* (p & 0xF) | 0x4300 */
    v[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(p, 4), nib, magic, 0xEA);
    v[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(p, 8), nib, magic, 0xEA);
    v[3] = _mm512_or_si512(_mm512_srli_epi16(p, 12), magic);
}

/* a[0..3] += the chunk's weights times activation pairs xp[0..3] */
INLINE void dot_chunk(__m512 a[4], const __m512i v[4], const int32_t *xp) {
    for (int t = 0; t < 4; t++) a[t] = _mm512_dpbf16_ps(a[t], (__m512bh)v[t], (__m512bh)_mm512_set1_epi32(xp[t]));
}

/* y += s * (sum a - (128 + z) * sum x) for one group of 16 rows */
INLINE __m512 group_update(__m512 y, const __m512 a[4], const uint16_t *sb, const uint8_t *zb, float zconst, int64_t g,
                           float xsum) {
    __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sb + g * 16)));
    __m512 zc = zb ? _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zb + g * 16)))),
                                   _mm512_set1_ps(128.f))
                   : _mm512_set1_ps(128.f + zconst);
    __m512 acc = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(zc, _mm512_set1_ps(xsum), acc), s, y);
}

/* out[n0 .. n0 + 16) (clipped to N) = v + bias, as float32 or bf16 */
INLINE void store_tile(void *out, int y_bf16, int64_t n0, int64_t N, __m512 v, const float *bias) {
    int64_t left = N - n0;
    __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    __m512 r = _mm512_add_ps(v, bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps());
    if (y_bf16)
        _mm256_mask_storeu_epi16((bf16_t *)out + n0, mask, (__m256i)_mm512_cvtneps_pbh(r));
    else
        _mm512_mask_storeu_ps((float *)out + n0, mask, r);
}

/* One tile: 16 output columns (rows of W) x MB activation rows, the whole K. */
INLINE void tile(const int MB, const bf16_t *xb, const float *xg, int64_t K8, int64_t G, int64_t gs, const uint8_t *wb,
                 const uint16_t *sb, const uint8_t *zb, float zconst, const float *bias, void *y, int y_bf16, int64_t ldy,
                 int64_t n0, int64_t N) {
    __m512 yv[4];
    for (int i = 0; i < MB; i++) yv[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 a[4][4];
        for (int i = 0; i < MB; i++)
            for (int t = 0; t < 4; t++) a[i][t] = _mm512_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) {
            _mm_prefetch((const char *)(wb + (k / 8 + 8) * 64), _MM_HINT_T0); /* 512 B ahead: +5-8% at 2 threads (A/B) */
            __m512i v[4];
            unpack_chunk(_mm512_loadu_si512((const void *)(wb + (k / 8) * 64)), v);
            for (int i = 0; i < MB; i++) dot_chunk(a[i], v, (const int32_t *)(xb + i * K8 + k)); /* bf16 pairs (k, k+1), ... */
        }
        for (int i = 0; i < MB; i++) yv[i] = group_update(yv[i], a[i], sb, zb, zconst, g, xg[i * G + g]);
    }
    for (int i = 0; i < MB; i++) store_tile((char *)y + i * ldy * (y_bf16 ? 2 : 4), y_bf16, n0, N, yv[i], bias);
}

/* tile() for a constant M, so the compiler unrolls its row loops */
#define TILE_M(M)                                                                                                       \
    static void tile##M(const bf16_t *xb, const float *xg, int64_t K8, int64_t G, int64_t gs, const uint8_t *wb,         \
                        const uint16_t *sb, const uint8_t *zb, float zc, const float *bias, void *y, int yb, int64_t ldy, \
                        int64_t n0, int64_t N) {                                                                         \
        tile(M, xb, xg, K8, G, gs, wb, sb, zb, zc, bias, y, yb, ldy, n0, N);                                            \
    }
TILE_M(1)
TILE_M(2)
TILE_M(3)
TILE_M(4)

/* M = 1, two tiles at once (two weight streams per thread): the same sums as tile1 for each */
static void tile1x2(const bf16_t *xb, const float *xg, int64_t G, int64_t gs, const uint8_t *wa, const uint16_t *sa,
                    const uint8_t *za, const uint8_t *wb2, const uint16_t *sb2, const uint8_t *zb2, float zconst,
                    const float *bias, void *y, int y_bf16, int64_t na, int64_t nb2, int64_t N) {
    __m512 ya = _mm512_setzero_ps(), yb = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 a[4], b[4];
        for (int t = 0; t < 4; t++) a[t] = b[t] = _mm512_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) {
            _mm_prefetch((const char *)(wa + (k / 8 + 8) * 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(wb2 + (k / 8 + 8) * 64), _MM_HINT_T0);
            __m512i va[4], vb[4];
            unpack_chunk(_mm512_loadu_si512((const void *)(wa + (k / 8) * 64)), va);
            unpack_chunk(_mm512_loadu_si512((const void *)(wb2 + (k / 8) * 64)), vb);
            dot_chunk(a, va, (const int32_t *)(xb + k));
            dot_chunk(b, vb, (const int32_t *)(xb + k));
        }
        ya = group_update(ya, a, sa, za, zconst, g, xg[g]);
        yb = group_update(yb, b, sb2, zb2, zconst, g, xg[g]);
    }
    store_tile(y, y_bf16, na, N, ya, bias);
    store_tile(y, y_bf16, nb2, N, yb, bias);
}

/* One packed weight, filled once by the caller (fewer arguments to convert per call). */
typedef struct {
    const uint8_t *w;
    const uint16_t *s16;
    const uint8_t *z;     /* NULL: every zero is zconst */
    const int64_t *perm;  /* NULL: no act-order */
    int64_t N, K, K8, gs;
    float zconst;
} qk_int4_weight;

/* y [M, N] (float32 or bf16, like x) = x [M, K] @ W^T (+ bias float32 [N]).  Returns 0, or -1 when out of memory. */
int qk_int4_mm(const qk_int4_weight *d, const void *x, int x_bf16, void *y, int64_t M, const float *bias, int threads) {
    const uint8_t *w = d->w, *z = d->z;
    const uint16_t *s16 = d->s16;
    const int64_t *perm = d->perm;
    int64_t N = d->N, K = d->K, K8 = d->K8, gs = d->gs;
    float zconst = d->zconst;
    int64_t G = K8 / gs, NB = (N + 15) / 16;
    char *buf = (char *)get_scratch(M * K8 * sizeof(bf16_t) + M * G * sizeof(float) + 64);
    if (!buf) return -1;
    bf16_t *xb = (bf16_t *)buf;
    float *xg = (float *)(buf + (M * K8 * sizeof(bf16_t) + 63) / 64 * 64);
    prepare_x(x, x_bf16, perm, M, K, K8, gs, xb, xg);
    size_t ysize = x_bf16 ? 2 : 4;
    /* a small matrix is not worth waking the other threads for */
    int nt = (threads > 1 && N * K8 * (M < 4 ? M : 4) >= (1 << 17)) ? threads : 1;
    if (M == 1 && NB >= 2) {
        int64_t half = NB / 2;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t i = 0; i < half; i++) {
            int64_t A = i, B = i + half;
            tile1x2(xb, xg, G, gs, w + A * (K8 / 8) * 64, s16 + A * G * 16, z ? z + A * G * 16 : NULL,
                    w + B * (K8 / 8) * 64, s16 + B * G * 16, z ? z + B * G * 16 : NULL, zconst, bias, y, x_bf16, A * 16, B * 16, N);
        }
        if (NB % 2)
            tile1(xb, xg, K8, G, gs, w + (NB - 1) * (K8 / 8) * 64, s16 + (NB - 1) * G * 16, z ? z + (NB - 1) * G * 16 : NULL,
                  zconst, bias, y, x_bf16, N, (NB - 1) * 16, N);
        return 0;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t nb = 0; nb < NB; nb++) {
        const uint8_t *wb = w + nb * (K8 / 8) * 64;
        const uint16_t *sb = s16 + nb * G * 16;
        const uint8_t *zb = z ? z + nb * G * 16 : NULL;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            tile4(xb + m * K8, xg + m * G, K8, G, gs, wb, sb, zb, zconst, bias, (char *)y + m * N * ysize, x_bf16, N, nb * 16, N);
        switch (M - m) {
            case 3: tile3(xb + m * K8, xg + m * G, K8, G, gs, wb, sb, zb, zconst, bias, (char *)y + m * N * ysize, x_bf16, N, nb * 16, N); break;
            case 2: tile2(xb + m * K8, xg + m * G, K8, G, gs, wb, sb, zb, zconst, bias, (char *)y + m * N * ysize, x_bf16, N, nb * 16, N); break;
            case 1: tile1(xb + m * K8, xg + m * G, K8, G, gs, wb, sb, zb, zconst, bias, (char *)y + m * N * ysize, x_bf16, N, nb * 16, N); break;
            default: break;
        }
    }
    return 0;
}

/* The dequantized rows n0 <= n < n1 (n0 a multiple of 16) of W, in the layout's column order:
 * out [n1 - n0, K] float32 or bf16, out[n, k] = (q - z) * s rounded once (as the reference computes it). */
void qk_int4_dequant(const uint8_t *w, const uint16_t *s16, const uint8_t *z, float zconst, int64_t K, int64_t K8,
                     int64_t gs, int64_t n0, int64_t n1, void *out, int out_bf16, int threads) {
    int64_t G = K8 / gs;
    int64_t NB0 = n0 / 16, NB1 = (n1 + 15) / 16;
    int nt = (threads > 1 && (n1 - n0) * K >= (1 << 16)) ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t nb = NB0; nb < NB1; nb++) {
        for (int r = 0; r < 16; r++) {
            int64_t n = nb * 16 + r;
            if (n >= n1) break;
            char *orow = (char *)out + (n - n0) * K * (out_bf16 ? 2 : 4);
            for (int64_t g = 0; g < G; g++) {
                uint16_t h = s16[(nb * G + g) * 16 + r];
                float s = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
                float zz = z ? (float)z[(nb * G + g) * 16 + r] : zconst;
                float table[16];
                for (int q = 0; q < 16; q++) table[q] = ((float)q - zz) * s;
                for (int64_t k0 = g * gs; k0 < (g + 1) * gs; k0 += 8) {
                    const uint8_t *c = w + (nb * (K8 / 8) + k0 / 8) * 64 + 4 * r; /* words 2r, 2r + 1 of the chunk */
                    uint8_t qs[8] = {(uint8_t)(c[0] & 15), (uint8_t)(c[2] & 15), (uint8_t)(c[0] >> 4), (uint8_t)(c[2] >> 4),
                                     (uint8_t)(c[1] & 15), (uint8_t)(c[3] & 15), (uint8_t)(c[1] >> 4), (uint8_t)(c[3] >> 4)};
                    for (int i = 0; i < 8 && k0 + i < K; i++) {
                        if (out_bf16)
                            ((bf16_t *)orow)[k0 + i] = f32_to_bf16(table[qs[i]]);
                        else
                            ((float *)orow)[k0 + i] = table[qs[i]];
                    }
                }
            }
        }
    }
}

/* ---- one decode step of Llama-style blocks, every linear on this kernel ------------------------
 *
 * quantkit.runtime.lean's per-token forward written out in C for one sequence and one position,
 * so a step costs its weight traffic and little else (no Python or ATen op per norm, RoPE, softmax):
 *   h = rms(x) * w1;  q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv);  rope(q), rope(k);  cache[pos] = k, v
 *   x += softmax(q k^T * scale) v  Wo;   h = rms(x) * w2;   x += (silu(h Wg) * (h Wu)) Wd
 * x (the residual stream), the cache and every intermediate are float32; the matmuls round their
 * input to bf16 as qk_int4_mm always does.  The pure-torch reference is LeanLM's own forward. */
#include <math.h>

typedef struct {
    const qk_int4_weight *q, *k, *v, *o, *gate, *up, *down;
    const float *bq, *bk, *bv;     /* q/k/v biases or NULL (Qwen2 has them) */
    const float *norm1, *norm2;    /* RMSNorm weights, float32 [d] */
    float eps1, eps2;
    float *k_cache, *v_cache;      /* float32 [nkv, max_len, hd] */
} qk_layer;

static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

static void rms_norm(const float *x, const float *w, float eps, int64_t d, float *out) {
    double ss = 0.0; /* float32 statistics as torch computes them: a float sum is enough, double is safer */
    for (int64_t i = 0; i < d; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / d) + eps);
    for (int64_t i = 0; i < d; i++) out[i] = x[i] * r * w[i];
}

static float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    float s = hsum512(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* x * cos + roll(x, hd/2) * sin, sin carrying rotate_half's sign (as LeanLM's tables do) */
static void rope(float *x, int64_t heads, int64_t hd, const float *cos, const float *sin) {
    int64_t half = hd / 2;
    float t[1024];
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * hd;
        for (int64_t i = 0; i < hd; i++) t[i] = v[i] * cos[i] + v[(i + half) % hd] * sin[i];
        memcpy(v, t, hd * sizeof(float));
    }
}

/* e^x for 16 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor (relative error < 2e-7) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static void silu_mul(float *g, const float *u, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* Decode one position of one sequence through n_layers blocks.  x: float32 [d], updated in place.
 * cos, sin: float32 [hd], this position's RoPE tables.  Returns 0, or -1 when out of memory. */
int qk_decode_layers(const qk_layer *layers, int n_layers, float *x, int64_t d, int64_t nh, int64_t nkv, int64_t hd,
                     int64_t inter, int64_t pos, int64_t max_len, const float *cos, const float *sin, float scale,
                     int threads) {
    if (hd > 1024) return -2;
    int64_t nq = nh * hd, nk = nkv * hd, group = nh / nkv, len = pos + 1;
    float *buf = (float *)malloc(sizeof(float) * (d + nq + 2 * nk + nq + 2 * inter + d + nh * len));
    if (!buf) return -1;
    float *h = buf, *q = h + d, *k = q + nq, *v = k + nk, *att = v + nk, *g = att + nq, *u = g + inter, *y = u + inter,
          *sc = y + d;
    for (int l = 0; l < n_layers; l++) {
        const qk_layer *L = layers + l;
        rms_norm(x, L->norm1, L->eps1, d, h);
        if (qk_int4_mm(L->q, h, 0, q, 1, L->bq, threads) || qk_int4_mm(L->k, h, 0, k, 1, L->bk, threads) ||
            qk_int4_mm(L->v, h, 0, v, 1, L->bv, threads)) {
            free(buf);
            return -1;
        }
        rope(q, nh, hd, cos, sin);
        rope(k, nkv, hd, cos, sin);
        for (int64_t j = 0; j < nkv; j++) {
            memcpy(L->k_cache + (j * max_len + pos) * hd, k + j * hd, hd * sizeof(float));
            memcpy(L->v_cache + (j * max_len + pos) * hd, v + j * hd, hd * sizeof(float));
        }
        int at = (threads > 1 && nh * len * hd >= (1 << 15)) ? threads : 1;
#pragma omp parallel for num_threads(at) schedule(static)
        for (int64_t hh = 0; hh < nh; hh++) {
            const float *qh = q + hh * hd, *K = L->k_cache + (hh / group) * max_len * hd, *V = L->v_cache + (hh / group) * max_len * hd;
            float *s = sc + hh * len, m = -INFINITY, sum = 0.f;
            for (int64_t j = 0; j < len; j++) {
                s[j] = dot(qh, K + j * hd, hd) * scale;
                m = s[j] > m ? s[j] : m;
            }
            for (int64_t j = 0; j < len; j++) sum += (s[j] = expf(s[j] - m));
            float *o = att + hh * hd;
            for (int64_t i = 0; i < hd; i++) o[i] = 0.f;
            for (int64_t j = 0; j < len; j++) {
                float p = s[j] / sum;
                const float *vj = V + j * hd;
                for (int64_t i = 0; i < hd; i++) o[i] += p * vj[i];
            }
        }
        if (qk_int4_mm(L->o, att, 0, y, 1, NULL, threads)) {
            free(buf);
            return -1;
        }
        for (int64_t i = 0; i < d; i++) x[i] += y[i];
        rms_norm(x, L->norm2, L->eps2, d, h);
        if (qk_int4_mm(L->gate, h, 0, g, 1, NULL, threads) || qk_int4_mm(L->up, h, 0, u, 1, NULL, threads)) {
            free(buf);
            return -1;
        }
        silu_mul(g, u, inter);
        if (qk_int4_mm(L->down, g, 0, y, 1, NULL, threads)) {
            free(buf);
            return -1;
        }
        for (int64_t i = 0; i < d; i++) x[i] += y[i];
    }
    free(buf);
    return 0;
}

/* ---- bf16 matrix-vector product (an unquantized lm_head at decode) ------------------------------
 * y [N] (float32) = W [N, K] (bf16, row-major) @ x [K] (bf16), float32 sums; K a multiple of 2.
 * PyTorch's bf16 matrix-vector product reads ~9 GB/s on this class of CPU; this streams rows with
 * vdpbf16ps, row after row (one sequential stream per thread), split across threads. */
void qk_bf16_matvec(const bf16_t *w, const bf16_t *x, float *y, int64_t N, int64_t K, int threads) {
    int64_t K64 = K / 64 * 64, K32 = K / 32 * 32;
    int nt = (threads > 1 && N * K >= (1 << 17)) ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const bf16_t *row = w + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k < K64; k += 64) {
            _mm_prefetch((const char *)(row + k + 512), _MM_HINT_T0); /* 1 KiB ahead: the next rows */
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(row + k)), (__m512bh)_mm512_loadu_si512((const void *)(x + k)));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512((const void *)(row + k + 32)), (__m512bh)_mm512_loadu_si512((const void *)(x + k + 32)));
        }
        if (k < K32)
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(row + k)), (__m512bh)_mm512_loadu_si512((const void *)(x + k)));
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        for (k = K32; k < K; k++) s += bf16_to_f32(row[k]) * bf16_to_f32(x[k]);
        y[n] = s;
    }
}
