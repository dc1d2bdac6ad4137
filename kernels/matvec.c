/* bf16 matrix-vector product (an unquantized lm_head at decode).
 * PyTorch's bf16 matrix-vector product reads ~9 GB/s on this class of CPU; this streams rows with
 * vdpbf16ps, row after row (one sequential stream per thread), split across threads. */
#include "qk.h"

/* qk.h: y [N] (float32) = W [N, K] (bf16, row-major) @ x [K] (bf16), float32 sums */
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
