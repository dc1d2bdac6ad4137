/* The int4 GEMM of quantkit's native CPU kernels: bf16 dot products over 4-bit codes (layout in qk.h).
 *
 * The product: bf16 holds 128 + q exactly with bits 0x4300 | q, so one ternary-logic op turns a
 * nibble into a bf16 weight (unpack_chunk) and vdpbf16ps multiplies 2 columns x 16 rows per instruction:
 *   y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] * (128 + q[n, k]) - (128 + z[n, g]) * sum_{k in g} x[m, k])
 * with x rounded to bf16 (as PyTorch's int4 op does) and every sum in float32.
 *
 * Without AVX-512 (AVX2 + FMA + F16C): one AND isolates nibble t of a 32-bit lane (row r, words 2r and
 * 2r + 1) in place, as the integer q 2^e (e = 4t, or 16 + 4t for the high word); it converts to a
 * float exactly, and the activation it meets was scaled by 2^-e once per call, so each FMA adds
 * x[m, k] q[n, k] exactly as a product (powers of two):
 *   y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] q[n, k] - z[n, g] sum_{k in g} x[m, k])
 */
#include "qk.h"

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
#ifdef QK_AVX512
            for (; k + 16 <= K; k += 16)
                _mm256_storeu_si256((__m256i *)(row + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xf + k)));
#endif
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

#ifdef QK_AVX512
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

/* What every tile of one product shares: the weight, the prepared activations, the output. */
typedef struct {
    const qk_int4_weight *d;
    const bf16_t *xb;   /* [M, K8] bf16, perm order, zero padded */
    const float *xg;    /* [M, G] float32 sum of each group of xb */
    int64_t G;
    const float *bias;  /* float32 [N] or NULL */
    void *y;            /* [M, N] float32 or bf16 */
    int y_bf16;
} gemm_args;

/* Block nb of W (its 16 rows): chunks [K8/8, 64], scales [G, 16], zeros [G, 16] (NULL: every zero is zconst). */
typedef struct {
    const uint8_t *w;
    const uint16_t *s;
    const uint8_t *z;
} row_block;

INLINE row_block block_at(const gemm_args *a, int64_t nb) {
    const qk_int4_weight *d = a->d;
    row_block b = {d->w + nb * (d->K8 / 8) * 64, d->s16 + nb * a->G * 16, d->z ? d->z + nb * a->G * 16 : NULL};
    return b;
}

/* One tile: 16 output columns (the rows of block nb) x MB activation rows from row m, the whole K. */
INLINE void tile(const int MB, const gemm_args *a, int64_t m, int64_t nb) {
    const int64_t K8 = a->d->K8, G = a->G, gs = a->d->gs, N = a->d->N;
    const row_block b = block_at(a, nb);
    const uint8_t *wb = b.w, *zb = b.z;
    const uint16_t *sb = b.s;
    const float zconst = a->d->zconst;
    const bf16_t *xb = a->xb + m * K8;
    const float *xg = a->xg + m * G;
    const int y_bf16 = a->y_bf16;
    char *y = (char *)a->y + m * N * (y_bf16 ? 2 : 4);
    __m512 yv[4];
    for (int i = 0; i < MB; i++) yv[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 acc[4][4];
        for (int i = 0; i < MB; i++)
            for (int t = 0; t < 4; t++) acc[i][t] = _mm512_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) {
            _mm_prefetch((const char *)(wb + (k / 8 + 8) * 64), _MM_HINT_T0); /* 512 B ahead: +5-8% at 2 threads (A/B) */
            __m512i v[4];
            unpack_chunk(_mm512_loadu_si512((const void *)(wb + (k / 8) * 64)), v);
            for (int i = 0; i < MB; i++) dot_chunk(acc[i], v, (const int32_t *)(xb + i * K8 + k)); /* bf16 pairs (k, k+1), ... */
        }
        for (int i = 0; i < MB; i++) yv[i] = group_update(yv[i], acc[i], sb, zb, zconst, g, xg[i * G + g]);
    }
    for (int i = 0; i < MB; i++) store_tile(y + i * N * (y_bf16 ? 2 : 4), y_bf16, nb * 16, N, yv[i], a->bias);
}

/* tile() for a constant M, so the compiler unrolls its row loops */
#define TILE_M(M) \
    static void tile##M(const gemm_args *a, int64_t m, int64_t nb) { tile(M, a, m, nb); }
TILE_M(1)
TILE_M(2)
TILE_M(3)
TILE_M(4)

/* M = 1, two tiles at once (blocks na and nb, two weight streams per thread): the same sums as tile1 for each */
static void tile1x2(const gemm_args *args, int64_t na, int64_t nb) {
    const int64_t G = args->G, gs = args->d->gs;
    const row_block A = block_at(args, na), B = block_at(args, nb);
    const uint8_t *wa = A.w, *za = A.z, *wb2 = B.w, *zb2 = B.z;
    const uint16_t *sa = A.s, *sb2 = B.s;
    const float zconst = args->d->zconst;
    const bf16_t *xb = args->xb;
    const float *xg = args->xg;
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
    store_tile(args->y, args->y_bf16, na * 16, args->d->N, ya, args->bias);
    store_tile(args->y, args->y_bf16, nb * 16, args->d->N, yb, args->bias);
}

/* qk.h: y [M, N] = x [M, K] @ W^T (+ bias); 0, or -1 when out of memory */
int qk_int4_mm(const qk_int4_weight *d, const void *x, int x_bf16, void *y, int64_t M, const float *bias, int threads) {
    int64_t N = d->N, K8 = d->K8, G = K8 / d->gs, NB = (N + 15) / 16;
    char *buf = (char *)get_scratch(M * K8 * sizeof(bf16_t) + M * G * sizeof(float) + 64);
    if (!buf) return -1;
    bf16_t *xb = (bf16_t *)buf;
    float *xg = (float *)(buf + (M * K8 * sizeof(bf16_t) + 63) / 64 * 64);
    prepare_x(x, x_bf16, d->perm, M, d->K, K8, d->gs, xb, xg);
    gemm_args a = {d, xb, xg, G, bias, y, x_bf16};
    /* a small matrix is not worth waking the other threads for */
    int nt = (threads > 1 && N * K8 * (M < 4 ? M : 4) >= (1 << 17)) ? threads : 1;
    if (M == 1 && NB >= 2) {
        int64_t half = NB / 2;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t i = 0; i < half; i++) tile1x2(&a, i, i + half);
        if (NB % 2) tile1(&a, 0, NB - 1);
        return 0;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t nb = 0; nb < NB; nb++) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) tile4(&a, m, nb);
        switch (M - m) {
            case 3: tile3(&a, m, nb); break;
            case 2: tile2(&a, m, nb); break;
            case 1: tile1(&a, m, nb); break;
            default: break;
        }
    }
    return 0;
}

#else /* AVX2 + FMA + F16C */

/* What every tile of one product shares (the AVX2 path). */
typedef struct {
    const qk_int4_weight *d;
    const float *xs;    /* [M, K8] the bf16-rounded activations, column k0 + 2t + j scaled by 2^-e(t, j) */
    const float *xg;    /* [M, G] float32 sum of each group (unscaled) */
    int64_t G;
    const float *bias;  /* float32 [N] or NULL */
    void *y;            /* [M, N] float32 or bf16 */
    int y_bf16;
} gemm_args;

/* 2^-e for column c = 2t + j of a chunk: nibble t of word j sits at bit e = 16 j + 4 t of its lane,
 * except the top nibble (t = 3, j = 1), shifted down to bit 0 (an AND would leave it signed) */
static const float CHUNK_SCALE[8] = {1.f, 0x1p-16f, 0x1p-4f, 0x1p-20f, 0x1p-8f, 0x1p-24f, 0x1p-12f, 1.f};

/* a[0..3] += the 8 rows' weights of one 32-byte half chunk p times the 8 scaled activations x8 */
INLINE void dot_half(__m256 a[4], __m256i p, const float *x8) {
    for (int t = 0; t < 4; t++) {
        __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(p, _mm256_set1_epi32(0xF << (4 * t))));
        __m256 hi = _mm256_cvtepi32_ps(t < 3 ? _mm256_and_si256(p, _mm256_set1_epi32(0xF << (16 + 4 * t)))
                                             : _mm256_srli_epi32(p, 28));
        a[t] = _mm256_fmadd_ps(lo, _mm256_broadcast_ss(x8 + 2 * t), a[t]);
        a[t] = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(x8 + 2 * t + 1), a[t]);
    }
}

/* y += s * (sum a - z * sum x) for one group of 8 rows (s16, zb: this half's 8 scales and zeros) */
INLINE __m256 group_update8(__m256 y, const __m256 a[4], const uint16_t *s16, const uint8_t *zb, float zconst,
                            float xsum) {
    __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s16));
    __m256 z = zb ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)zb))) : _mm256_set1_ps(zconst);
    __m256 acc = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(z, _mm256_set1_ps(xsum), acc), s, y);
}

/* One tile: the 16 rows of block nb for activation row m, the whole K. */
static void tile_avx2(const gemm_args *a, int64_t m, int64_t nb) {
    const qk_int4_weight *d = a->d;
    const int64_t K8 = d->K8, G = a->G, gs = d->gs, N = d->N;
    const uint8_t *wb = d->w + nb * (K8 / 8) * 64, *zb = d->z ? d->z + nb * G * 16 : NULL;
    const uint16_t *sb = d->s16 + nb * G * 16;
    const float *xs = a->xs + m * K8, *xg = a->xg + m * G;
    __m256 y0 = _mm256_setzero_ps(), y1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 a0[4], a1[4];
        for (int t = 0; t < 4; t++) a0[t] = a1[t] = _mm256_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) {
            const uint8_t *c = wb + (k / 8) * 64;
            _mm_prefetch((const char *)(c + 512), _MM_HINT_T0);
            dot_half(a0, _mm256_loadu_si256((const __m256i *)c), xs + k);        /* rows 0..7 */
            dot_half(a1, _mm256_loadu_si256((const __m256i *)(c + 32)), xs + k); /* rows 8..15 */
        }
        y0 = group_update8(y0, a0, sb + g * 16, zb ? zb + g * 16 : NULL, d->zconst, xg[g]);
        y1 = group_update8(y1, a1, sb + g * 16 + 8, zb ? zb + g * 16 + 8 : NULL, d->zconst, xg[g]);
    }
    float out[16];
    _mm256_storeu_ps(out, y0);
    _mm256_storeu_ps(out + 8, y1);
    for (int r = 0; r < 16 && nb * 16 + r < N; r++) {
        int64_t n = nb * 16 + r;
        float v = out[r] + (a->bias ? a->bias[n] : 0.f);
        if (a->y_bf16)
            ((bf16_t *)a->y)[m * N + n] = f32_to_bf16(v);
        else
            ((float *)a->y)[m * N + n] = v;
    }
}

/* qk.h: y [M, N] = x [M, K] @ W^T (+ bias); 0, or -1 when out of memory */
int qk_int4_mm(const qk_int4_weight *d, const void *x, int x_bf16, void *y, int64_t M, const float *bias, int threads) {
    int64_t N = d->N, K8 = d->K8, G = K8 / d->gs, NB = (N + 15) / 16;
    size_t xb_bytes = (M * K8 * sizeof(bf16_t) + 63) / 64 * 64, xg_bytes = (M * G * sizeof(float) + 63) / 64 * 64;
    char *buf = (char *)get_scratch(xb_bytes + xg_bytes + M * K8 * sizeof(float));
    if (!buf) return -1;
    bf16_t *xb = (bf16_t *)buf;
    float *xg = (float *)(buf + xb_bytes), *xs = (float *)(buf + xb_bytes + xg_bytes);
    prepare_x(x, x_bf16, d->perm, M, d->K, K8, d->gs, xb, xg);
    for (int64_t i = 0; i < M * K8; i++) xs[i] = bf16_to_f32(xb[i]) * CHUNK_SCALE[i % 8];
    gemm_args a = {d, xs, xg, G, bias, y, x_bf16};
    int nt = (threads > 1 && N * K8 * (M < 4 ? M : 4) >= (1 << 17)) ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t nb = 0; nb < NB; nb++)
        for (int64_t m = 0; m < M; m++) tile_avx2(&a, m, nb);
    return 0;
}
#endif

/* qk.h: rows n0 <= n < n1 of W dequantized, (q - z) * s rounded once */
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
