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

/* One tile: 16 output columns (rows of W) x MB activation rows, the whole K. */
static inline __attribute__((always_inline)) void tile(const int MB, const bf16_t *xb, const float *xg, int64_t K8,
                                                       int64_t G, int64_t gs, const uint8_t *wb, const uint16_t *sb,
                                                       const uint8_t *zb, float zconst, const float *bias, void *y,
                                                       int y_bf16, int64_t ldy, int64_t n0, int64_t N) {
    const __m512i magic = _mm512_set1_epi16(0x4300), nib = _mm512_set1_epi16(0x000F);
    __m512 yv[4];
    for (int i = 0; i < MB; i++) yv[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 a[4][4];
        for (int i = 0; i < MB; i++)
            for (int t = 0; t < 4; t++) a[i][t] = _mm512_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) {
            _mm_prefetch((const char *)(wb + (k / 8 + 8) * 64), _MM_HINT_T0); /* 512 B ahead: +5-8% at 2 threads (A/B) */
            __m512i p = _mm512_loadu_si512((const void *)(wb + (k / 8) * 64));
            __m512i v0 = _mm512_ternarylogic_epi32(p, nib, magic, 0xEA); /* (p & 0xF) | 0x4300 */
            __m512i v1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(p, 4), nib, magic, 0xEA);
            __m512i v2 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(p, 8), nib, magic, 0xEA);
            __m512i v3 = _mm512_or_si512(_mm512_srli_epi16(p, 12), magic);
            for (int i = 0; i < MB; i++) {
                const int32_t *xp = (const int32_t *)(xb + i * K8 + k); /* bf16 pairs (k, k+1), (k+2, k+3), ... */
                a[i][0] = _mm512_dpbf16_ps(a[i][0], (__m512bh)v0, (__m512bh)_mm512_set1_epi32(xp[0]));
                a[i][1] = _mm512_dpbf16_ps(a[i][1], (__m512bh)v1, (__m512bh)_mm512_set1_epi32(xp[1]));
                a[i][2] = _mm512_dpbf16_ps(a[i][2], (__m512bh)v2, (__m512bh)_mm512_set1_epi32(xp[2]));
                a[i][3] = _mm512_dpbf16_ps(a[i][3], (__m512bh)v3, (__m512bh)_mm512_set1_epi32(xp[3]));
            }
        }
        __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sb + g * 16)));
        __m512 zc = zb ? _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zb + g * 16)))),
                                       _mm512_set1_ps(128.f))
                       : _mm512_set1_ps(128.f + zconst);
        for (int i = 0; i < MB; i++) {
            __m512 acc = _mm512_add_ps(_mm512_add_ps(a[i][0], a[i][1]), _mm512_add_ps(a[i][2], a[i][3]));
            acc = _mm512_fnmadd_ps(zc, _mm512_set1_ps(xg[i * G + g]), acc);
            yv[i] = _mm512_fmadd_ps(acc, s, yv[i]);
        }
    }
    int64_t left = N - n0;
    __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int i = 0; i < MB; i++) {
        __m512 out = _mm512_add_ps(yv[i], b);
        if (y_bf16)
            _mm256_mask_storeu_epi16((bf16_t *)y + i * ldy + n0, mask, (__m256i)_mm512_cvtneps_pbh(out));
        else
            _mm512_mask_storeu_ps((float *)y + i * ldy + n0, mask, out);
    }
}

static void tile1(const bf16_t *xb, const float *xg, int64_t K8, int64_t G, int64_t gs, const uint8_t *wb, const uint16_t *sb,
                  const uint8_t *zb, float zc, const float *bias, void *y, int yb, int64_t ldy, int64_t n0, int64_t N) {
    tile(1, xb, xg, K8, G, gs, wb, sb, zb, zc, bias, y, yb, ldy, n0, N);
}
static void tile2(const bf16_t *xb, const float *xg, int64_t K8, int64_t G, int64_t gs, const uint8_t *wb, const uint16_t *sb,
                  const uint8_t *zb, float zc, const float *bias, void *y, int yb, int64_t ldy, int64_t n0, int64_t N) {
    tile(2, xb, xg, K8, G, gs, wb, sb, zb, zc, bias, y, yb, ldy, n0, N);
}
static void tile3(const bf16_t *xb, const float *xg, int64_t K8, int64_t G, int64_t gs, const uint8_t *wb, const uint16_t *sb,
                  const uint8_t *zb, float zc, const float *bias, void *y, int yb, int64_t ldy, int64_t n0, int64_t N) {
    tile(3, xb, xg, K8, G, gs, wb, sb, zb, zc, bias, y, yb, ldy, n0, N);
}
static void tile4(const bf16_t *xb, const float *xg, int64_t K8, int64_t G, int64_t gs, const uint8_t *wb, const uint16_t *sb,
                  const uint8_t *zb, float zc, const float *bias, void *y, int yb, int64_t ldy, int64_t n0, int64_t N) {
    tile(4, xb, xg, K8, G, gs, wb, sb, zb, zc, bias, y, yb, ldy, n0, N);
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
