/* One decode step of Llama-style blocks, every linear on qk_int4_mm (int4_gemm.c).
 *
 * quantkit.runtime.lean's per-token forward written out in C for one sequence and one position,
 * so a step costs its weight traffic and little else (no Python or ATen op per norm, RoPE, softmax):
 *   h = rms(x) * w1;  q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv);  rope(q), rope(k);  cache[pos] = k, v
 *   x += softmax(q k^T * scale) v  Wo;   h = rms(x) * w2;   x += T(silu(h Wg) * (h Wu)) Wd
 * with T the rotation's online Hadamard transform where the layer has one (else the identity).
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
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    float s = _mm512_reduce_add_ps(acc);
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

/* g [n] = silu(g) * u */
static void silu_mul(float *g, const float *u, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* att [nh, hd] = softmax(q k^T * scale) v over the len = pos + 1 cached positions of L's cache,
 * grouped-query heads reading kv head h / (nh / nkv); sc: float32 [nh, len] scratch */
static void attention(const qk_layer *L, const qk_decode_dims *D, const float *q, float *att, float *sc, int64_t len,
                      int threads) {
    int64_t nh = D->nh, hd = D->hd, max_len = D->max_len, group = D->nh / D->nkv;
    int at = (threads > 1 && nh * len * hd >= (1 << 15)) ? threads : 1;
#pragma omp parallel for num_threads(at) schedule(static)
    for (int64_t hh = 0; hh < nh; hh++) {
        const float *qh = q + hh * hd, *K = L->k_cache + (hh / group) * max_len * hd, *V = L->v_cache + (hh / group) * max_len * hd;
        float *s = sc + hh * len, m = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < len; j++) {
            s[j] = dot(qh, K + j * hd, hd) * D->scale;
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
}

/* Every intermediate of one step, float32, carved from one allocation. */
typedef struct {
    float *h, *q, *k, *v, *att, *g, *u, *y, *sc, *t;  /* [d], [nh hd], [nkv hd] x 2, [nh hd], [inter] x 2, [d], [nh len], [max(hd, inter)] */
} step_buffers;

static float *step_buffers_alloc(step_buffers *b, const qk_decode_dims *D, int64_t len) {
    int64_t nq = D->nh * D->hd, nk = D->nkv * D->hd;
    int64_t nt = D->hd > D->inter ? D->hd : D->inter;
    float *buf = (float *)malloc(sizeof(float) * (D->d + nq + 2 * nk + nq + 2 * D->inter + D->d + D->nh * len + nt));
    if (!buf) return NULL;
    b->h = buf, b->q = b->h + D->d, b->k = b->q + nq, b->v = b->k + nk, b->att = b->v + nk, b->g = b->att + nq;
    b->u = b->g + D->inter, b->y = b->u + D->inter, b->sc = b->y + D->d, b->t = b->sc + D->nh * len;
    return buf;
}

/* One block at position pos: x [d] updated in place.  Returns 0, or -1 when out of memory. */
static int decode_layer(const qk_layer *L, const qk_decode_dims *D, float *x, int64_t pos, const float *cos,
                        const float *sin, const step_buffers *b, int threads) {
    int64_t d = D->d, hd = D->hd;
    rms_norm(x, L->norm1, L->eps1, d, b->h);
    if (qk_int4_mm(L->q, b->h, 0, b->q, 1, L->bq, threads) || qk_int4_mm(L->k, b->h, 0, b->k, 1, L->bk, threads) ||
        qk_int4_mm(L->v, b->h, 0, b->v, 1, L->bv, threads))
        return -1;
    rope(b->q, D->nh, hd, cos, sin, b->t);
    rope(b->k, D->nkv, hd, cos, sin, b->t);
    for (int64_t j = 0; j < D->nkv; j++) {
        memcpy(L->k_cache + (j * D->max_len + pos) * hd, b->k + j * hd, hd * sizeof(float));
        memcpy(L->v_cache + (j * D->max_len + pos) * hd, b->v + j * hd, hd * sizeof(float));
    }
    attention(L, D, b->q, b->att, b->sc, pos + 1, threads);
    if (qk_int4_mm(L->o, b->att, 0, b->y, 1, NULL, threads)) return -1;
    for (int64_t i = 0; i < d; i++) x[i] += b->y[i];
    rms_norm(x, L->norm2, L->eps2, d, b->h);
    if (qk_int4_mm(L->gate, b->h, 0, b->g, 1, NULL, threads) || qk_int4_mm(L->up, b->h, 0, b->u, 1, NULL, threads))
        return -1;
    silu_mul(b->g, b->u, D->inter);
    if (L->had) qk_hadamard_row(b->g, D->inter, L->had, L->had_k, b->t);
    if (qk_int4_mm(L->down, b->g, 0, b->y, 1, NULL, threads)) return -1;
    for (int64_t i = 0; i < d; i++) x[i] += b->y[i];
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
