/* One decode step of Llama-style blocks, every linear on qk_int4_mm (int4_gemm.c).
 *
 * quantkit.runtime.lean's per-token forward written out in C for one sequence and one position,
 * so a step costs its weight traffic and little else (no Python or ATen op per norm, RoPE, softmax):
 *   h = rms(x) * w1;  q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv);  [q, k = rms(q) * wq, rms(k) * wk per head]
 *   rope(q), rope(k);  cache[pos] = k, v;  a = softmax(cap(q k^T * scale)) v Wo over the layer's window
 *   x += [rms(a) * w3];   h = rms(x) * w2;   m = T(act(h Wg) * (h Wu)) Wd;   x += [rms(m) * w4]
 * with T the rotation's online Hadamard transform where the layer has one (else the identity), and
 * the bracketed parts only where the family has them (Qwen3's and Gemma 3's q/k norms, Gemma 2/3's
 * sandwich norms, Gemma 2's soft-cap, sliding windows, Gemma 3's RoPE table per layer type).  In a
 * mixture-of-experts block m = sum over the top_k experts e of softmax(h R)[e] (renormalised over
 * the chosen ones where norm_topk) * expert e's MLP(h), the experts chosen here in C, plus a shared
 * expert's MLP(h) weighed by sigmoid(h g) where the block has one (Qwen2-MoE).
 * x (the residual stream), the cache and every intermediate are float32; the matmuls round their
 * input to bf16 as qk_int4_mm always does.  The pure-torch reference is LeanLM's own forward;
 * the plan that fills qk_layer is quantkit.runtime.native_decode.
 */
#include <math.h>

#include "hadamard.h"
#include "qk.h"

static void rms_norm(const float *x, const float *w, float eps, int64_t d, float *out) {
    double ss = 0.0; /* float32 statistics as torch computes them: a float sum is enough, double is safer */
    for (int64_t i = 0; i < d; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / d) + eps);
    for (int64_t i = 0; i < d; i++) out[i] = x[i] * r * w[i];
}

static float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
#ifdef QK_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    float s = _mm512_reduce_add_ps(acc);
#else
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float t[8], s = 0.f;
    _mm256_storeu_ps(t, acc);
    for (int j = 0; j < 8; j++) s += t[j];
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* x [heads, hd] = x * cos + roll(x, hd/2) * sin, sin carrying rotate_half's sign (as LeanLM's tables do);
 * t: float32 [hd] scratch */
static void rope(float *x, int64_t heads, int64_t hd, const float *cos, const float *sin, float *t) {
    int64_t half = hd / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * hd;
        for (int64_t i = 0; i < hd; i++) t[i] = v[i] * cos[i] + v[(i + half) % hd] * sin[i];
        memcpy(v, t, hd * sizeof(float));
    }
}

/* e^x for one vector: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor (relative error < 2e-7) */
#ifdef QK_AVX512
#define VW 16
typedef __m512 vf;
#define V_LOAD _mm512_loadu_ps
#define V_STORE _mm512_storeu_ps
#define V_SET1 _mm512_set1_ps
#define V_ADD _mm512_add_ps
#define V_SUB _mm512_sub_ps
#define V_MUL _mm512_mul_ps
#define V_DIV _mm512_div_ps
#define V_FMA _mm512_fmadd_ps
#define V_FNMA _mm512_fnmadd_ps
#define V_MIN _mm512_min_ps
#define V_MAX _mm512_max_ps
#define V_ROUND(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define V_POW2(p, n) _mm512_scalef_ps(p, n)
#else
#define VW 8
typedef __m256 vf;
#define V_LOAD _mm256_loadu_ps
#define V_STORE _mm256_storeu_ps
#define V_SET1 _mm256_set1_ps
#define V_ADD _mm256_add_ps
#define V_SUB _mm256_sub_ps
#define V_MUL _mm256_mul_ps
#define V_DIV _mm256_div_ps
#define V_FMA _mm256_fmadd_ps
#define V_FNMA _mm256_fnmadd_ps
#define V_MIN _mm256_min_ps
#define V_MAX _mm256_max_ps
#define V_ROUND(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
/* p 2^n for integral n in [-126, 127]: n added to p's exponent field */
#define V_POW2(p, n) _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)))
#endif

static inline vf vexp(vf x) {
    x = V_MAX(V_MIN(x, V_SET1(88.0f)), V_SET1(-87.0f));
    vf n = V_ROUND(V_MUL(x, V_SET1(1.44269504f)));
    vf r = V_FNMA(n, V_SET1(0.693145752f), x);
    r = V_FNMA(n, V_SET1(1.42860677e-6f), r);
    vf p = V_SET1(1.0f / 720);
    p = V_FMA(p, r, V_SET1(1.0f / 120));
    p = V_FMA(p, r, V_SET1(1.0f / 24));
    p = V_FMA(p, r, V_SET1(1.0f / 6));
    p = V_FMA(p, r, V_SET1(0.5f));
    p = V_FMA(p, r, V_SET1(1.0f));
    p = V_FMA(p, r, V_SET1(1.0f));
    return V_POW2(p, n);
}

/* att [nh, hd] = softmax(q k^T * scale) v over the len = pos + 1 cached positions of L's cache,
 * grouped-query heads reading kv head h / (nh / nkv); sc: float32 [nh, len] scratch */
static void attention(const qk_layer *L, const qk_decode_dims *D, const float *q, float *att, float *sc, int64_t len,
                      int threads) {
    int64_t nh = D->nh, hd = D->hd, max_len = D->max_len, group = D->nh / D->nkv;
    int64_t lo = L->window && len > L->window ? len - L->window : 0; /* a sliding layer's first key */
    float cap = D->attn_cap;
    int at = (threads > 1 && nh * len * hd >= (1 << 15)) ? threads : 1;
#pragma omp parallel for num_threads(at) schedule(static)
    for (int64_t hh = 0; hh < nh; hh++) {
        const float *qh = q + hh * hd, *K = L->k_cache + (hh / group) * max_len * hd, *V = L->v_cache + (hh / group) * max_len * hd;
        float *s = sc + hh * len, m = -INFINITY, sum = 0.f;
        for (int64_t j = lo; j < len; j++) {
            s[j] = dot(qh, K + j * hd, hd) * D->scale;
            if (cap > 0.f) s[j] = tanhf(s[j] / cap) * cap;
            m = s[j] > m ? s[j] : m;
        }
        for (int64_t j = lo; j < len; j++) sum += (s[j] = expf(s[j] - m));
        float *o = att + hh * hd;
        for (int64_t i = 0; i < hd; i++) o[i] = 0.f;
        for (int64_t j = lo; j < len; j++) {
            float p = s[j] / sum;
            const float *vj = V + j * hd;
            for (int64_t i = 0; i < hd; i++) o[i] += p * vj[i];
        }
    }
}

/* Every intermediate of one step, float32, carved from one allocation. */
typedef struct {
    float *h, *q, *k, *v, *att, *g, *u, *y, *sc, *t, *m, *logits;
    /* [d], [nh hd], [nkv hd] x 2, [nh hd], [inter] x 2, [d], [nh len], [max(hd, inter)], [d], [max_experts] */
} step_buffers;

static float *step_buffers_alloc(step_buffers *b, const qk_decode_dims *D, int64_t len) {
    int64_t nq = D->nh * D->hd, nk = D->nkv * D->hd;
    int64_t nt = D->hd > D->inter ? D->hd : D->inter;
    float *buf = (float *)malloc(sizeof(float) * (D->d + nq + 2 * nk + nq + 2 * D->inter + D->d + D->nh * len + nt + D->d
                                                   + D->max_experts));
    if (!buf) return NULL;
    b->h = buf, b->q = b->h + D->d, b->k = b->q + nq, b->v = b->k + nk, b->att = b->v + nk, b->g = b->att + nq;
    b->u = b->g + D->inter, b->y = b->u + D->inter, b->sc = b->y + D->d, b->t = b->sc + D->nh * len;
    b->m = b->t + nt, b->logits = b->m + D->d;
    return buf;
}

/* g [n] = act(g) * u, both activations as x sigmoid(a(x)) = x / (1 + e^-a(x)): SiLU a(x) = x,
 * tanh-GELU a(x) = 2 sqrt(2/pi) (x + 0.044715 x^3) (0.5 x (1 + tanh(u)) = x sigmoid(2u)) */
static void act_mul(int64_t act, float *g, const float *u, int64_t n) {
    const float c = act == QK_ACT_SILU ? 1.0f : 1.5957691216057308f, k3 = act == QK_ACT_SILU ? 0.0f : 0.044715f;
    int64_t i = 0;
    for (; i + VW <= n; i += VW) {
        vf x = V_LOAD(g + i);
        vf z = V_MUL(V_SET1(-c), V_FMA(V_MUL(V_MUL(x, x), x), V_SET1(k3), x));
        V_STORE(g + i, V_MUL(V_DIV(x, V_ADD(V_SET1(1.0f), vexp(z))), V_LOAD(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-c * (g[i] + k3 * g[i] * g[i] * g[i]))) * u[i];
}

/* y [d] = T(act(h Wg) * (h Wu)) Wd, one MLP (the dense block's or an expert's, of down's K inputs) */
static int mlp(const qk_layer *L, const qk_int4_weight *gate, const qk_int4_weight *up, const qk_int4_weight *down,
               const float *h, float *y, const step_buffers *b, int threads) {
    int64_t inter = down->K;
    if (!up) { /* fused gate|up (Phi-3): one product writes gate to g and up past it, into u's room */
        if (qk_int4_mm(gate, h, 0, b->g, 1, NULL, threads)) return -1;
        if (b->g + inter != b->u) memmove(b->u, b->g + inter, inter * sizeof(float));
    } else if (qk_int4_mm(gate, h, 0, b->g, 1, NULL, threads) || qk_int4_mm(up, h, 0, b->u, 1, NULL, threads))
        return -1;
    act_mul(L->act, b->g, b->u, inter);
    if (L->had) qk_hadamard_row(b->g, inter, L->had, L->had_k, b->t);
    return qk_int4_mm(down, b->g, 0, y, 1, NULL, threads);
}

/* y [d] = the mixture of experts on h: the router's softmax in float32, its top_k experts (the
 * first of equal probabilities, as torch.topk on these sizes), each weighed by its probability */
static int experts(const qk_layer *L, const qk_decode_dims *D, const float *h, float *y, const step_buffers *b,
                   int threads) {
    int64_t E = L->n_experts, d = D->d;
    float *p = b->logits, mx = -INFINITY, sum = 0.f;
    for (int64_t e = 0; e < E; e++) {
        p[e] = dot(L->router + e * d, h, d);
        mx = p[e] > mx ? p[e] : mx;
    }
    for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(p[e] - mx));
    int64_t chosen[64];
    float w[64], wsum = 0.f;
    for (int64_t j = 0; j < L->top_k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= chosen[i] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e; /* NaN probabilities: the first untaken */
        }
        chosen[j] = best, w[j] = p[best] / sum, wsum += w[j];
    }
    for (int64_t i = 0; i < d; i++) y[i] = 0.f;
    for (int64_t j = 0; j < L->top_k; j++) {
        const qk_int4_weight *const *ex = L->experts + 3 * chosen[j];
        if (mlp(L, ex[0], ex[1], ex[2], h, b->m, b, threads)) return -1;
        float wj = L->norm_topk ? w[j] / wsum : w[j];
        for (int64_t i = 0; i < d; i++) y[i] += b->m[i] * wj;
    }
    if (L->shared) { /* Qwen2-MoE's shared expert, weighed by its sigmoid gate */
        if (mlp(L, L->shared[0], L->shared[1], L->shared[2], h, b->m, b, threads)) return -1;
        float ws = L->shared_gate ? 1.0f / (1.0f + expf(-dot(L->shared_gate, h, d))) : 1.0f;
        for (int64_t i = 0; i < d; i++) y[i] += b->m[i] * ws;
    }
    return 0;
}

/* x [d] += out, through the sandwich norm where the layer has one */
static void residual(float *x, float *out, const float *norm, float eps, int64_t d) {
    if (norm) rms_norm(out, norm, eps, d, out);
    for (int64_t i = 0; i < d; i++) x[i] += out[i];
}

/* One block at position pos: x [d] updated in place.  Returns 0, or -1 when out of memory. */
static int decode_layer(const qk_layer *L, const qk_decode_dims *D, float *x, int64_t pos, const float *cos,
                        const float *sin, const step_buffers *b, int threads) {
    int64_t d = D->d, hd = D->hd;
    if (L->rope_cos) cos = L->rope_cos + pos * hd, sin = L->rope_sin + pos * hd;
    rms_norm(x, L->norm1, L->eps1, d, b->h);
    if (!L->k) { /* fused q|k|v (Phi-3): one product fills the contiguous buffers q, k, v */
        if (qk_int4_mm(L->q, b->h, 0, b->q, 1, L->bq, threads)) return -1;
    } else if (qk_int4_mm(L->q, b->h, 0, b->q, 1, L->bq, threads) || qk_int4_mm(L->k, b->h, 0, b->k, 1, L->bk, threads) ||
               qk_int4_mm(L->v, b->h, 0, b->v, 1, L->bv, threads))
        return -1;
    if (L->q_norm)
        for (int64_t j = 0; j < D->nh; j++) rms_norm(b->q + j * hd, L->q_norm, L->eps_q, hd, b->q + j * hd);
    if (L->k_norm)
        for (int64_t j = 0; j < D->nkv; j++) rms_norm(b->k + j * hd, L->k_norm, L->eps_k, hd, b->k + j * hd);
    rope(b->q, D->nh, hd, cos, sin, b->t);
    rope(b->k, D->nkv, hd, cos, sin, b->t);
    for (int64_t j = 0; j < D->nkv; j++) {
        memcpy(L->k_cache + (j * D->max_len + pos) * hd, b->k + j * hd, hd * sizeof(float));
        memcpy(L->v_cache + (j * D->max_len + pos) * hd, b->v + j * hd, hd * sizeof(float));
    }
    attention(L, D, b->q, b->att, b->sc, pos + 1, threads);
    if (qk_int4_mm(L->o, b->att, 0, b->y, 1, NULL, threads)) return -1;
    residual(x, b->y, L->post_attn_norm, L->eps3, d);
    rms_norm(x, L->norm2, L->eps2, d, b->h);
    if (L->n_experts ? experts(L, D, b->h, b->y, b, threads) : mlp(L, L->gate, L->up, L->down, b->h, b->y, b, threads))
        return -1;
    residual(x, b->y, L->post_mlp_norm, L->eps4, d);
    return 0;
}

/* qk.h: one position of one sequence through n_layers blocks; 0, or -1 when out of memory */
int qk_decode_layers(const qk_layer *layers, int n_layers, const qk_decode_dims *dims, float *x, int64_t pos,
                     const float *cos, const float *sin, int threads) {
    step_buffers b;
    float *buf = step_buffers_alloc(&b, dims, pos + 1);
    if (!buf) return -1;
    int rc = 0;
    for (int l = 0; l < n_layers && rc == 0; l++) rc = decode_layer(layers + l, dims, x, pos, cos, sin, &b, threads);
    free(buf);
    return rc;
}
