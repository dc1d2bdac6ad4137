/* The online Hadamard transform x -> x kron(A, H_p) of quantkit.core.hadamard.HadamardTransform,
 * one row at a time: the orthonormal Walsh-Hadamard butterflies over each of the k segments of
 * length p, then x [k, p] <- A^T x.  A row's result never depends on the other rows (a row gives
 * the same bits alone or in a batch).  Pure-torch reference: HadamardTransform's own products
 * (tests/kernels/test_native_hadamard.py compares them).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "hadamard.h"

void qk_hadamard_row(float *x, int64_t n, const float *A, int64_t k, float *t) {
    int64_t p = n / k;  /* callers check n = k p */
    float norm = 1.0f / sqrtf((float)p);
    for (int64_t r = 0; r < k; r++) {
        float *v = x + r * p;
        for (int64_t h = 1; h < p; h *= 2)
            for (int64_t i = 0; i < p; i += 2 * h)
                for (int64_t j = i; j < i + h; j++) {
                    float a = v[j], b = v[j + h];
                    v[j] = a + b, v[j + h] = a - b;
                }
        for (int64_t i = 0; i < p; i++) v[i] *= norm;
    }
    if (k == 1) return;
    for (int64_t c = 0; c < k; c++) {
        float *o = t + c * p;
        for (int64_t i = 0; i < p; i++) o[i] = 0.f;
        for (int64_t a = 0; a < k; a++) {
            float w = A[a * k + c];
            const float *v = x + a * p;
            for (int64_t i = 0; i < p; i++) o[i] += w * v[i];
        }
    }
    memcpy(x, t, n * sizeof(float));
}

int qk_hadamard_rows(float *x, int64_t rows, int64_t n, const float *A, int64_t k, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && rows > 1)
    {
        float *t = malloc(n * sizeof(float));
        if (!t) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (t) qk_hadamard_row(x + r * n, n, A, k, t);
        free(t);
    }
    return failed ? -1 : 0;
}
