/* quantkit's native CPU kernels: what the three translation units share, and what Python calls.
 *
 *   int4_gemm.c    y = x W^T over 4-bit codes (qk_int4_mm) and their exact dequantization (qk_int4_dequant)
 *   decode_step.c  one decode step of Llama-style blocks, every linear on qk_int4_mm (qk_decode_layers)
 *   matvec.c       a bf16 matrix-vector product, for an unquantized lm_head at decode (qk_bf16_matvec)
 *
 * Two instruction sets, chosen at run time by quantkit.kernels.native.build from the CPU's flags:
 * AVX-512 (F, BW, VL) + AVX512-BF16 (QK_AVX512: bf16 dot products), else AVX2 + FMA + F16C (float32
 * FMAs over nibbles converted to floats).  Both round the activations to bf16 and sum in float32,
 * so a model decodes to the same numbers up to float32 summation order.  The build compiles the
 * sources into one shared object per instruction set (cc -O3 -fopenmp, cached under a hash of every
 * source and the flags) and quantkit.kernels.native calls it through ctypes.
 *
 * The int4 layout, made at load (quantkit.kernels.native.int4) from codes q [N, K] (0..15), fp16
 * scales s and integer zeros z [N, G]:
 *
 *   w   uint8  [N16/16, K8/8, 64]  one 64-byte chunk = 16 rows x 8 columns; its 16-bit word
 *                                  2r + j holds, in nibble t (bits 4t..4t+3), q[r][k0 + 2t + j]
 *   s16 fp16   [N16/16, G, 16]     scales, 16 rows of a group side by side
 *   z   uint8  [N16/16, G, 16]     zero points (NULL: every zero is zconst)
 *
 * N16 = N rounded up to 16 (padded rows have scale 0), K8 = K rounded up to 8 (only when the
 * whole row is one group; padded codes meet zero activations).
 */
#ifndef QK_H
#define QK_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16_t;

#define INLINE static inline __attribute__((always_inline))

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

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define QK_AVX512 1
#endif

#ifdef QK_AVX512
/* The four bf16 weight vectors of one 64-byte chunk: nibble t of every 16-bit word as 128 + q
 * (bf16 holds 128 + q exactly with bits 0x4300 | q). */
INLINE void unpack_chunk(__m512i p, __m512i v[4]) {
    const __m512i magic = _mm512_set1_epi16(0x4300), nib = _mm512_set1_epi16(0x000F);
    v[0] = _mm512_ternarylogic_epi32(p, nib, magic, 0xEA); /* (p & 0xF) | 0x4300 */
    v[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(p, 4), nib, magic, 0xEA);
    v[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(p, 8), nib, magic, 0xEA);
    v[3] = _mm512_or_si512(_mm512_srli_epi16(p, 12), magic);
}
#endif

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
int qk_int4_mm(const qk_int4_weight *d, const void *x, int x_bf16, void *y, int64_t M, const float *bias, int threads);

/* The dequantized rows n0 <= n < n1 (n0 a multiple of 16) of W, in the layout's column order:
 * out [n1 - n0, K] float32 or bf16, out[n, k] = (q - z) * s rounded once (as the reference computes it). */
void qk_int4_dequant(const uint8_t *w, const uint16_t *s16, const uint8_t *z, float zconst, int64_t K, int64_t K8,
                     int64_t gs, int64_t n0, int64_t n1, void *out, int out_bf16, int threads);

/* One block for qk_decode_layers. */
typedef struct {
    const qk_int4_weight *q, *k, *v, *o, *gate, *up, *down;  /* gate/up/down: NULL in a mixture-of-experts block;
                                                             * k, v NULL: q is q|k|v fused; up NULL: gate is gate|up (Phi-3) */
    const float *bq, *bk, *bv;     /* q/k/v biases or NULL (Qwen2 has them) */
    const float *norm1, *norm2;    /* RMSNorm weights, float32 [d] (Gemma's 1 + w folded in by the caller) */
    float eps1, eps2;
    float *k_cache, *v_cache;      /* float32 [nkv, max_len, hd] */
    const float *had;              /* NULL, or the online Hadamard before down: float32 [had_k, had_k] factor A */
    int64_t had_k;                 /* down's input x -> x kron(A, H_p), p = inter / had_k a power of two */
    /* what other families add (NULL or 0: absent) */
    const float *q_norm, *k_norm;  /* per-head RMSNorm of q and k before RoPE, float32 [hd] (Qwen3, Gemma 3) */
    float eps_q, eps_k;
    const float *post_attn_norm, *post_mlp_norm;  /* sandwich norms on attention's and the MLP's outputs, [d] (Gemma 2/3) */
    float eps3, eps4;
    const float *rope_cos, *rope_sin;  /* this layer's RoPE tables float32 [max_len, hd]; NULL: the call's row */
    int64_t window;                /* attend the last `window` positions only (sliding layers); 0: every one */
    int64_t act;                   /* QK_ACT_SILU, QK_ACT_GELU_TANH */
    /* a mixture of experts in place of gate/up/down: softmax(router h) picks top_k of n_experts */
    int64_t n_experts, top_k, norm_topk;  /* norm_topk: the chosen weights renormalised to sum 1 */
    const float *router;           /* float32 [n_experts, d] */
    const qk_int4_weight *const *experts;  /* [n_experts * 3]: gate, up, down of each */
    const qk_int4_weight *const *shared;   /* NULL, or a shared expert's gate, up, down (Qwen2-MoE): every token runs it */
    const float *shared_gate;              /* float32 [d]: the shared expert weighed by sigmoid(shared_gate . h); NULL: 1 */
} qk_layer;

#define QK_ACT_SILU 0
#define QK_ACT_GELU_TANH 1 /* x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)): transformers' gelu_pytorch_tanh */

/* The sizes every block of one model shares (nh a multiple of nkv). */
typedef struct {
    int64_t d, nh, nkv, hd, inter, max_len;  /* hidden, heads, kv heads, head dim, widest MLP, cache positions */
    float scale;                             /* attention's softmax scale */
    float attn_cap;                          /* scores soft-capped as tanh(s / cap) cap (Gemma 2); 0: none */
    int64_t max_experts;                     /* the most experts of one block (0: no mixture of experts) */
} qk_decode_dims;

/* Decode one position pos of one sequence through n_layers blocks.  x: float32 [d], updated in place.
 * cos, sin: float32 [hd], this position's RoPE tables (for the layers without their own).  Returns 0, or -1 when out of memory. */
int qk_decode_layers(const qk_layer *layers, int n_layers, const qk_decode_dims *dims, float *x, int64_t pos,
                     const float *cos, const float *sin, int threads);

/* y [N] (float32) = W [N, K] (bf16, row-major) @ x [K] (bf16), float32 sums. */
void qk_bf16_matvec(const bf16_t *w, const bf16_t *x, float *y, int64_t N, int64_t K, int threads);

#endif
