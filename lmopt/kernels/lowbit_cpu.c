/* lmopt low-bit optimizer step for CPUs: one pass over memory per parameter tensor.
 *
 * Per block of `block` elements: read the gradient, the parameter and the old codes, dequantize the moments
 * (value[code] * block scale), update them in fp32, update the parameter, keep the new moments in an L1 buffer
 * while tracking their absmax, then quantize the buffer with the new scale and write the codes.
 * Memory traffic per element: param read + write, gradient read, codes read + write (8-bit: 16 bytes with
 * fp32 params; 4-bit: 14).
 *
 * The arithmetic is exactly that of lmopt's PyTorch reference path (lmopt/optim/lowbit.py): same operations in
 * the same order, no fused multiply-add (compiled with -ffp-contract=off), IEEE sqrt and division, the same
 * nearest-code rule (code = number of midpoints < x, found with a lookup table: see lmopt/quant/maps.py) and the
 * same counter-based hash for stochastic rounding. The AVX2 path and the scalar path compute identical bits.
 *
 * Threads: the blocks of all tensors are split into `nthreads` contiguous ranges, one pthread each.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_BLOCK 4096

typedef struct {
    const int32_t *lut; /* 2 * nk entries: (c0 << 24) | threshold bits (lmopt/quant/maps.py) */
    const float *mid;   /* ncodes thresholds, last = +inf (unused by the kernel; kept for checks) */
    const float *val;   /* ncodes values */
    int32_t shift;      /* 23 - M */
    int32_t base;       /* (127 - E) << M */
    int32_t nk;         /* (E << M) + 1 */
    int32_t bits;       /* 8 or 4 */
} qmap_t;

typedef struct {
    void *p;
    const void *g;
    uint8_t *m_codes;
    float *m_scales;
    uint8_t *v_codes;
    float *v_scales;
    uint16_t *comp; /* Kahan compensation (bf16) or NULL */
    int64_t n;
    float step_size; /* Adam: lr / (1 - beta1^t) */
    float inv_bc2;   /* Adam: 1 / sqrt(1 - beta2^t) */
    uint32_t key;    /* stochastic rounding key */
    uint32_t pad;
} job_t;

typedef struct {
    int32_t algo; /* 0 Adam(W), 1 Lion */
    int32_t p_bf16, g_bf16;
    int32_t block;
    int32_t decoupled, maximize, rounding; /* rounding: 0 nearest, 1 stochastic, 2 kahan */
    int32_t has_wd;
    float beta1, beta2, omb1, omb2, eps, wd, lrwd, lr;
    qmap_t qm, qv;
} config_t;

/* ---------------------------------------------------------------------------------------------- scalar */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline uint16_t f32_to_bf16_rne(float f) {
    uint32_t u = f32_bits(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}
static inline uint16_t f32_to_bf16_sr(float f, uint32_t key, int64_t idx) {
    uint32_t u = f32_bits(f) + (hash32((uint32_t)idx ^ key) & 0xFFFFu);
    return (uint16_t)(u >> 16);
}
static inline int code_of(const qmap_t *q, float x) {
    x = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
    uint32_t bits = f32_bits(x);
    int32_t s = (int32_t)(bits >> 31);
    int32_t mag = (int32_t)(bits & 0x7FFFFFFFu);
    int32_t k = (mag >> q->shift) - q->base;
    if (k < 0) k = 0;
    uint32_t entry = (uint32_t)q->lut[k + s * q->nk];
    int32_t low_mask = (1 << q->shift) - 1;
    int32_t key = (mag & low_mask) ^ (s ? low_mask : 0);
    return (int)(entry >> 24) + (key > (int32_t)(entry & (uint32_t)low_mask) ? 1 : 0);
}
static inline int read_code(const uint8_t *codes, int bits, int64_t i) {
    if (bits == 8) return codes[i];
    uint8_t b = codes[i >> 1];
    return (i & 1) ? (b >> 4) : (b & 15);
}
static inline void write_code(uint8_t *codes, int bits, int64_t i, int c) {
    if (bits == 8) {
        codes[i] = (uint8_t)c;
    } else if (i & 1) {
        codes[i >> 1] = (uint8_t)((codes[i >> 1] & 15) | (c << 4));
    } else {
        codes[i >> 1] = (uint8_t)((codes[i >> 1] & 0xF0) | c);
    }
}

/* update one element: returns nothing, writes param (and comp); m_new / v_new go to the buffers */
static inline void store_param(const config_t *cfg, const job_t *job, int64_t i, float p, float delta) {
    if (!cfg->p_bf16) {
        ((float *)job->p)[i] = p + delta;
        return;
    }
    uint16_t *pp = (uint16_t *)job->p;
    if (cfg->rounding == 0) {
        pp[i] = f32_to_bf16_rne(p + delta);
    } else if (cfg->rounding == 1) {
        pp[i] = f32_to_bf16_sr(p + delta, job->key, i);
    } else {
        float s = bf16_to_f32(job->comp[i]) + delta;
        uint16_t r = f32_to_bf16_rne(p + s);
        job->comp[i] = f32_to_bf16_rne(s - (bf16_to_f32(r) - p));
        pp[i] = r;
    }
}

static inline float load_p(const config_t *cfg, const job_t *job, int64_t i) {
    return cfg->p_bf16 ? bf16_to_f32(((const uint16_t *)job->p)[i]) : ((const float *)job->p)[i];
}
static inline float load_g(const config_t *cfg, const job_t *job, int64_t i) {
    return cfg->g_bf16 ? bf16_to_f32(((const uint16_t *)job->g)[i]) : ((const float *)job->g)[i];
}

/* elements [lo, hi) of one block, scalar; returns running absmax through pointers */
static void scalar_elems(const config_t *cfg, const job_t *job, int64_t lo, int64_t hi, float sm, float sv,
                         float *mbuf, float *vbuf, int64_t start, float *am, float *av) {
    for (int64_t i = lo; i < hi; i++) {
        float g = load_g(cfg, job, i);
        if (cfg->maximize) g = -g;
        float p = load_p(cfg, job, i);
        float m = cfg->qm.val[read_code(job->m_codes, cfg->qm.bits, i)] * sm;
        float delta;
        if (cfg->algo == 0) {
            if (!cfg->decoupled && cfg->has_wd) g = g + p * cfg->wd;
            float v = cfg->qv.val[read_code(job->v_codes, cfg->qv.bits, i)] * sv;
            m = m * cfg->beta1 + g * cfg->omb1;
            v = v * cfg->beta2 + (g * g) * cfg->omb2;
            float denom = sqrtf(v) * job->inv_bc2 + cfg->eps;
            float upd = (m / denom) * job->step_size;
            delta = -upd;
            if (cfg->decoupled && cfg->has_wd) delta = delta - p * cfg->lrwd;
            vbuf[i - start] = v;
            float a = fabsf(v);
            if (a > *av) *av = a;
        } else {
            float c = m * cfg->beta1 + g * cfg->omb1;
            float sg = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
            delta = -(sg * cfg->lr);
            if (cfg->has_wd) delta = delta - p * cfg->lrwd;
            m = m * cfg->beta2 + g * cfg->omb2;
        }
        mbuf[i - start] = m;
        float a = fabsf(m);
        if (a > *am) *am = a;
        store_param(cfg, job, i, p, delta);
    }
}

static void scalar_quantize(const qmap_t *q, const float *buf, int64_t lo, int64_t hi, int64_t start, float inv,
                            uint8_t *codes) {
    for (int64_t i = lo; i < hi; i++) write_code(codes, q->bits, i, code_of(q, buf[i - start] * inv));
}

#ifdef __AVX2__
/* ------------------------------------------------------------------------------------------------ AVX2 */
static inline __m256 load8_bf16(const uint16_t *src) {
    __m128i h = _mm_loadu_si128((const __m128i *)src);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline __m256 load8_p(const config_t *cfg, const job_t *job, int64_t i) {
    return cfg->p_bf16 ? load8_bf16((const uint16_t *)job->p + i) : _mm256_loadu_ps((const float *)job->p + i);
}
static inline __m256 load8_g(const config_t *cfg, const job_t *job, int64_t i) {
    return cfg->g_bf16 ? load8_bf16((const uint16_t *)job->g + i) : _mm256_loadu_ps((const float *)job->g + i);
}
/* table lookups: 8 scalar loads beat vpgatherdd on AMD Zen 2/3 (a gather there is ~20 uops) */
static inline __m256 lookup_ps(const float *table, __m256i idx) {
#ifdef LMOPT_USE_GATHER
    return _mm256_i32gather_ps(table, idx, 4);
#else
    int32_t ii[8] __attribute__((aligned(32)));
    _mm256_store_si256((__m256i *)ii, idx);
    return _mm256_setr_ps(table[ii[0]], table[ii[1]], table[ii[2]], table[ii[3]], table[ii[4]], table[ii[5]],
                          table[ii[6]], table[ii[7]]);
#endif
}
static inline __m256i lookup_epi32(const int32_t *table, __m256i idx) {
#ifdef LMOPT_USE_GATHER
    return _mm256_i32gather_epi32((const int *)table, idx, 4);
#else
    int32_t ii[8] __attribute__((aligned(32)));
    _mm256_store_si256((__m256i *)ii, idx);
    return _mm256_setr_epi32(table[ii[0]], table[ii[1]], table[ii[2]], table[ii[3]], table[ii[4]], table[ii[5]],
                             table[ii[6]], table[ii[7]]);
#endif
}
static inline __m256i codes8_load(const uint8_t *codes, int bits, int64_t i) {
    if (bits == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i)));
    uint32_t w;
    memcpy(&w, codes + (i >> 1), 4);
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), _mm256_set1_epi32(15));
}
static inline __m256 dequant8(const qmap_t *q, __m256i c, __m256 scale) {
    __m256 v;
    if (q->bits == 8) {
        v = lookup_ps(q->val, c);
    } else {
        __m256 lo = _mm256_loadu_ps(q->val), hi = _mm256_loadu_ps(q->val + 8);
        __m256 a = _mm256_permutevar8x32_ps(lo, c), b = _mm256_permutevar8x32_ps(hi, c);
        __m256i use_hi = _mm256_cmpgt_epi32(c, _mm256_set1_epi32(7));
        v = _mm256_blendv_ps(a, b, _mm256_castsi256_ps(use_hi));
    }
    return _mm256_mul_ps(v, scale);
}
static inline __m256i code8_of(const qmap_t *q, __m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_castps_si256(x);
    __m256i s = _mm256_srli_epi32(bits, 31);
    __m256i mag = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
    __m256i k = _mm256_sub_epi32(_mm256_srlv_epi32(mag, _mm256_set1_epi32(q->shift)), _mm256_set1_epi32(q->base));
    k = _mm256_max_epi32(k, _mm256_setzero_si256());
    __m256i neg = _mm256_sub_epi32(_mm256_setzero_si256(), s); /* all ones where negative */
    __m256i idx = _mm256_add_epi32(k, _mm256_and_si256(neg, _mm256_set1_epi32(q->nk)));
    __m256i entry = lookup_epi32(q->lut, idx);
    __m256i low_mask = _mm256_set1_epi32((1 << q->shift) - 1);
    __m256i key = _mm256_xor_si256(_mm256_and_si256(mag, low_mask), _mm256_and_si256(neg, low_mask));
    __m256i gt = _mm256_cmpgt_epi32(key, _mm256_and_si256(entry, low_mask));
    return _mm256_sub_epi32(_mm256_srli_epi32(entry, 24), gt); /* gt is -1 where true */
}
static inline void codes8_store(uint8_t *codes, int bits, int64_t i, __m256i c) {
    __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
    if (bits == 8) {
        __m128i w = _mm_packus_epi32(lo, hi);
        _mm_storel_epi64((__m128i *)(codes + i), _mm_packus_epi16(w, w));
        return;
    }
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    c = _mm256_sllv_epi32(c, sh);
    lo = _mm256_castsi256_si128(c);
    hi = _mm256_extracti128_si256(c, 1);
    __m128i a = _mm_or_si128(lo, hi);
    a = _mm_or_si128(a, _mm_shuffle_epi32(a, 0x4E));
    a = _mm_or_si128(a, _mm_shuffle_epi32(a, 0xB1));
    uint32_t w = (uint32_t)_mm_cvtsi128_si32(a);
    memcpy(codes + (i >> 1), &w, 4);
}
static inline __m256i hash8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x7FEB352Du));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846CA68Bu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
static inline __m128i bf16_rne8(__m256 f) {
    __m256i u = _mm256_castps_si256(f);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    u = _mm256_srli_epi32(u, 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}
static inline __m128i bf16_trunc8(__m256i u) {
    u = _mm256_srli_epi32(u, 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}
static inline __m256 bf16x8_to_f32(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline void store8_param(const config_t *cfg, const job_t *job, int64_t i, __m256 p, __m256 delta) {
    if (!cfg->p_bf16) {
        _mm256_storeu_ps((float *)job->p + i, _mm256_add_ps(p, delta));
        return;
    }
    uint16_t *pp = (uint16_t *)job->p + i;
    if (cfg->rounding == 0) {
        _mm_storeu_si128((__m128i *)pp, bf16_rne8(_mm256_add_ps(p, delta)));
    } else if (cfg->rounding == 1) {
        __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)i), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256i r = _mm256_and_si256(hash8(_mm256_xor_si256(idx, _mm256_set1_epi32((int)job->key))),
                                     _mm256_set1_epi32(0xFFFF));
        __m256i u = _mm256_add_epi32(_mm256_castps_si256(_mm256_add_ps(p, delta)), r);
        _mm_storeu_si128((__m128i *)pp, bf16_trunc8(u));
    } else {
        uint16_t *cp = job->comp + i;
        __m256 s = _mm256_add_ps(bf16x8_to_f32(_mm_loadu_si128((const __m128i *)cp)), delta);
        __m128i r = bf16_rne8(_mm256_add_ps(p, s));
        __m256 diff = _mm256_sub_ps(bf16x8_to_f32(r), p);
        _mm_storeu_si128((__m128i *)cp, bf16_rne8(_mm256_sub_ps(s, diff)));
        _mm_storeu_si128((__m128i *)pp, r);
    }
}
static inline float hmax8(__m256 v) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}
#endif

/* ------------------------------------------------------------------------------------------------ block */
static void process_block(const config_t *cfg, const job_t *job, int64_t b, float *mbuf, float *vbuf) {
    const int64_t B = cfg->block;
    const int64_t start = b * B;
    const int64_t end = start + B < job->n ? start + B : job->n;
    const float sm = job->m_scales[b];
    const float sv = cfg->algo == 0 ? job->v_scales[b] : 0.0f;
    float am = 0.0f, av = 0.0f;
    int64_t i = start;
#ifdef __AVX2__
    {
        const __m256 vsm = _mm256_set1_ps(sm), vsv = _mm256_set1_ps(sv);
        const __m256 b1 = _mm256_set1_ps(cfg->beta1), b2 = _mm256_set1_ps(cfg->beta2);
        const __m256 o1 = _mm256_set1_ps(cfg->omb1), o2 = _mm256_set1_ps(cfg->omb2);
        const __m256 eps = _mm256_set1_ps(cfg->eps), wd = _mm256_set1_ps(cfg->wd), lrwd = _mm256_set1_ps(cfg->lrwd);
        const __m256 bc2 = _mm256_set1_ps(job->inv_bc2), ss = _mm256_set1_ps(job->step_size);
        const __m256 lr = _mm256_set1_ps(cfg->lr), zero = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
        __m256 vam = zero, vav = zero;
        for (; i + 8 <= end; i += 8) {
            __m256 g = load8_g(cfg, job, i);
            if (cfg->maximize) g = _mm256_xor_ps(g, sign);
            __m256 p = load8_p(cfg, job, i);
            __m256 m = dequant8(&cfg->qm, codes8_load(job->m_codes, cfg->qm.bits, i), vsm);
            __m256 delta;
            if (cfg->algo == 0) {
                if (!cfg->decoupled && cfg->has_wd) g = _mm256_add_ps(g, _mm256_mul_ps(p, wd));
                __m256 v = dequant8(&cfg->qv, codes8_load(job->v_codes, cfg->qv.bits, i), vsv);
                m = _mm256_add_ps(_mm256_mul_ps(m, b1), _mm256_mul_ps(g, o1));
                v = _mm256_add_ps(_mm256_mul_ps(v, b2), _mm256_mul_ps(_mm256_mul_ps(g, g), o2));
                __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), bc2), eps);
                __m256 upd = _mm256_mul_ps(_mm256_div_ps(m, denom), ss);
                delta = _mm256_xor_ps(upd, sign);
                if (cfg->decoupled && cfg->has_wd) delta = _mm256_sub_ps(delta, _mm256_mul_ps(p, lrwd));
                _mm256_storeu_ps(vbuf + (i - start), v);
                vav = _mm256_max_ps(vav, _mm256_andnot_ps(sign, v));
            } else {
                __m256 c = _mm256_add_ps(_mm256_mul_ps(m, b1), _mm256_mul_ps(g, o1));
                __m256 pos = _mm256_and_ps(_mm256_cmp_ps(c, zero, _CMP_GT_OQ), one);
                __m256 neg = _mm256_and_ps(_mm256_cmp_ps(c, zero, _CMP_LT_OQ), one);
                __m256 sg = _mm256_sub_ps(pos, neg);
                delta = _mm256_xor_ps(_mm256_mul_ps(sg, lr), sign);
                if (cfg->has_wd) delta = _mm256_sub_ps(delta, _mm256_mul_ps(p, lrwd));
                m = _mm256_add_ps(_mm256_mul_ps(m, b2), _mm256_mul_ps(g, o2));
            }
            _mm256_storeu_ps(mbuf + (i - start), m);
            vam = _mm256_max_ps(vam, _mm256_andnot_ps(sign, m));
            store8_param(cfg, job, i, p, delta);
        }
        am = hmax8(vam);
        av = hmax8(vav);
    }
#endif
    scalar_elems(cfg, job, i, end, sm, sv, mbuf, vbuf, start, &am, &av);

    /* quantize the new moments with the new scales */
    const float im = am > 0.0f ? 1.0f / am : 0.0f;
    job->m_scales[b] = am;
    int64_t j = start;
#ifdef __AVX2__
    {
        const __m256 vim = _mm256_set1_ps(im);
        for (; j + 8 <= end; j += 8)
            codes8_store(job->m_codes, cfg->qm.bits, j, code8_of(&cfg->qm, _mm256_mul_ps(_mm256_loadu_ps(mbuf + (j - start)), vim)));
    }
#endif
    scalar_quantize(&cfg->qm, mbuf, j, end, start, im, job->m_codes);
    if (cfg->algo == 0) {
        const float iv = av > 0.0f ? 1.0f / av : 0.0f;
        job->v_scales[b] = av;
        j = start;
#ifdef __AVX2__
        {
            const __m256 viv = _mm256_set1_ps(iv);
            for (; j + 8 <= end; j += 8)
                codes8_store(job->v_codes, cfg->qv.bits, j, code8_of(&cfg->qv, _mm256_mul_ps(_mm256_loadu_ps(vbuf + (j - start)), viv)));
        }
#endif
        scalar_quantize(&cfg->qv, vbuf, j, end, start, iv, job->v_codes);
    }
}

/* ---------------------------------------------------------------------------------------------- threads */
typedef struct {
    const config_t *cfg;
    const job_t *jobs;
    int njobs;
    int64_t first, last; /* global block range [first, last) */
} range_t;

static void *run_range(void *arg) {
    const range_t *r = (const range_t *)arg;
    float mbuf[MAX_BLOCK], vbuf[MAX_BLOCK];
    int64_t offset = 0;
    for (int j = 0; j < r->njobs && offset < r->last; j++) {
        const job_t *job = &r->jobs[j];
        int64_t nb = (job->n + r->cfg->block - 1) / r->cfg->block;
        int64_t lo = r->first > offset ? r->first - offset : 0;
        int64_t hi = r->last - offset < nb ? r->last - offset : nb;
        for (int64_t b = lo; b < hi; b++) process_block(r->cfg, job, b, mbuf, vbuf);
        offset += nb;
    }
    return NULL;
}

int lmopt_lowbit_step(const config_t *cfg, const job_t *jobs, int njobs, int nthreads) {
    if (cfg->block <= 0 || cfg->block > MAX_BLOCK || cfg->block % 16) return 1;
    int64_t total = 0;
    for (int j = 0; j < njobs; j++) total += (jobs[j].n + cfg->block - 1) / cfg->block;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    if (total < 64 * nthreads) nthreads = 1;
    range_t ranges[64];
    pthread_t tids[64];
    for (int t = 0; t < nthreads; t++) {
        ranges[t].cfg = cfg;
        ranges[t].jobs = jobs;
        ranges[t].njobs = njobs;
        ranges[t].first = total * t / nthreads;
        ranges[t].last = total * (t + 1) / nthreads;
    }
    int started = 0;
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&tids[t], NULL, run_range, &ranges[t]) != 0) break;
        started = t;
    }
    run_range(&ranges[0]);
    for (int t = started + 1; t < nthreads; t++) run_range(&ranges[t]); /* threads that failed to start */
    for (int t = 1; t <= started; t++) pthread_join(tids[t], NULL);
    return 0;
}

int lmopt_lowbit_abi(void) { return (int)(sizeof(config_t) * 1000 + sizeof(job_t)); }

/* ------------------------------------------------------------------------------------ finiteness check */
/* index of the first tensor holding inf or NaN, or -1: one read of the gradients at memory bandwidth */
typedef struct {
    const void *const *ptrs;
    const int64_t *ns;
    const int32_t *bf16;
    int count;
    int64_t first, last; /* element range over the concatenation */
    int bad;
} finite_range_t;

static int64_t count_nonfinite(const void *ptr, int is_bf16, int64_t lo, int64_t hi) {
    int64_t bad = 0;
    int64_t i = lo;
    if (is_bf16) {
        const uint16_t *x = (const uint16_t *)ptr;
        for (; i < hi; i++) bad |= ((x[i] & 0x7F80) == 0x7F80);
        return bad;
    }
    const uint32_t *x = (const uint32_t *)ptr;
#ifdef __AVX2__
    const __m256i mask = _mm256_set1_epi32(0x7F800000);
    __m256i acc = _mm256_setzero_si256();
    for (; i + 8 <= hi; i += 8) {
        __m256i v = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), mask);
        acc = _mm256_or_si256(acc, _mm256_cmpeq_epi32(v, mask));
    }
    bad |= !_mm256_testz_si256(acc, acc);
#endif
    for (; i < hi; i++) bad |= ((x[i] & 0x7F800000u) == 0x7F800000u);
    return bad;
}

static void *finite_range(void *arg) {
    finite_range_t *r = (finite_range_t *)arg;
    int64_t offset = 0;
    r->bad = -1;
    for (int j = 0; j < r->count && offset < r->last; j++) {
        int64_t n = r->ns[j];
        int64_t lo = r->first > offset ? r->first - offset : 0;
        int64_t hi = r->last - offset < n ? r->last - offset : n;
        if (lo < hi && count_nonfinite(r->ptrs[j], r->bf16[j], lo, hi)) {
            r->bad = j;
            return NULL;
        }
        offset += n;
    }
    return NULL;
}

int lmopt_first_nonfinite(const void *const *ptrs, const int64_t *ns, const int32_t *bf16, int count, int nthreads) {
    int64_t total = 0;
    for (int j = 0; j < count; j++) total += ns[j];
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    if (total < 65536 * (int64_t)nthreads) nthreads = 1;
    finite_range_t ranges[64];
    pthread_t tids[64];
    for (int t = 0; t < nthreads; t++) {
        ranges[t].ptrs = ptrs;
        ranges[t].ns = ns;
        ranges[t].bf16 = bf16;
        ranges[t].count = count;
        ranges[t].first = total * t / nthreads;
        ranges[t].last = total * (t + 1) / nthreads;
    }
    int started = 0;
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&tids[t], NULL, finite_range, &ranges[t]) != 0) break;
        started = t;
    }
    finite_range(&ranges[0]);
    for (int t = started + 1; t < nthreads; t++) finite_range(&ranges[t]);
    for (int t = 1; t <= started; t++) pthread_join(tids[t], NULL);
    int bad = -1;
    for (int t = 0; t < nthreads; t++)
        if (ranges[t].bad >= 0 && (bad < 0 || ranges[t].bad < bad)) bad = ranges[t].bad;
    return bad;
}
