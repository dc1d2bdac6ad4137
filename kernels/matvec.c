/* bf16 matrix-vector product (an unquantized lm_head at decode).
 * PyTorch's bf16 matrix-vector product reads ~9 GB/s on this class of CPU; this streams rows with
 * vdpbf16ps (AVX2: FMAs on the bf16 halves shifted to float32), row after row (one sequential stream per thread), split across threads. */
#include "qk.h"

/* qk.h: y [N] (float32) = W [N, K] (bf16, row-major) @ x [K] (bf16), float32 sums */
void qk_bf16_matvec(const bf16_t *w, const bf16_t *x, float *y, int64_t N, int64_t K, int threads) {
    int64_t K32 = K / 32 * 32;
    int nt = (threads > 1 && N * K >= (1 << 17)) ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const bf16_t *row = w + n * K;
#ifdef QK_AVX512
        int64_t K64 = K / 64 * 64;
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
#else /* bf16 -> float32 by a 16-bit shift, then FMAs */
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K32; k += 16) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(row + k)), v = _mm256_loadu_si256((const __m256i *)(x + k));
            __m256 wl = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), vl = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            __m256 wh = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000)));
            __m256 vh = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)));
            a0 = _mm256_fmadd_ps(wl, vl, a0); /* even columns */
            a1 = _mm256_fmadd_ps(wh, vh, a1); /* odd columns */
        }
        float t[8], s = 0.f;
        _mm256_storeu_ps(t, _mm256_add_ps(a0, a1));
        for (int j = 0; j < 8; j++) s += t[j];
#endif
        for (k = K32; k < K; k++) s += bf16_to_f32(row[k]) * bf16_to_f32(x[k]);
        y[n] = s;
    }
}
