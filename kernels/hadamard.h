/* The online Hadamard transform in portable C (hadamard.c): no intrinsics, so it builds on any
 * CPU with a C compiler, alone (quantkit.kernels.native.build.portable_library) or inside the
 * AVX-512 library, whose decode step (decode_step.c) calls qk_hadamard_row. */
#ifndef QK_HADAMARD_H
#define QK_HADAMARD_H

#include <stdint.h>

/* x [n] <- x kron(A, H_p), n = k p (p a power of two); A: float32 [k, k]; t: float32 [n] scratch */
void qk_hadamard_row(float *x, int64_t n, const float *A, int64_t k, float *t);

/* every row of x [rows, n] as qk_hadamard_row, rows split over `threads` OpenMP threads;
 * 0, or -1 when out of memory */
int qk_hadamard_rows(float *x, int64_t rows, int64_t n, const float *A, int64_t k, int threads);

#endif
