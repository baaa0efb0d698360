/* lmopt low-bit optimizer step for CPUs: one pass over memory per parameter tensor.
 *
 * Per block of `block` elements: read the gradient, the parameter and the old codes, dequantize the moments
 * (value[code] * block scale), update them in fp32, update the parameter, keep the new moments in an L1 buffer
 * while tracking their absmax, then quantize the buffer with the new scale and write the codes.
 * Memory traffic per element: param read + write, gradient read, codes read + write (8-bit: 16 bytes with
 * fp32 params; 4-bit: 14).
 *
 * The arithmetic is exactly that of lmopt's per-tensor rules (lmopt.optim.adamw.adam_delta,
 * lmopt.optim.lion.lion_delta): same operations in the same order, no fused multiply-add (compiled with -ffp-contract=off), IEEE sqrt and division, the same
 * nearest-code rule (code = number of midpoints < x) and the same counter-based hash for stochastic rounding.
 * The AVX2 path and the scalar path compute identical bits.
 *
 * How codes are found (AVX2):
 *  - 8-bit maps: decoding is a table read per element (scalar loads indexed by the code bytes; on AMD Zen they
 *    beat vgatherdps); encoding reads one entry of a bucket table indexed by the sign, exponent and top mantissa
 *    bits of x (see lmopt/quant/maps.py) and compares with the one midpoint that can fall in the bucket.
 *  - 4-bit maps: encoding reads no table: a branchless binary search over the 15 sorted midpoints, held in
 *    three registers and indexed with vpermps; decoding reads a 256-entry table of value pairs, one 8-byte
 *    load per code byte (two elements).
 * The common configurations (fp32 parameters and gradients, decoupled or no weight decay, Adam 8/4-bit,
 * Lion 8-bit) are compiled as separate specializations so no flag is tested inside the element loops.
 *
 * Where the time goes (benchmarks/lowbit_kernel_breakdown.py): the Adam arithmetic of the first pass alone
 * costs about what torch's fused fp32 AdamW step costs on a 2-core AVX2 machine, so the quantization pass is
 * the price of the 4-6x smaller state.
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
    const float *mid;   /* ncodes thresholds, last = +inf (the 4-bit search reads the first 15) */
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
    uint32_t offset; /* index of the tensor's first element in the whole parameter (a shard's offset), mod 2^32 */
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
        pp[i] = f32_to_bf16_sr(p + delta, job->key, i + (int64_t)job->offset);
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
/* table lookups: 8 scalar loads beat vpgatherdd on AMD Zen (a gather there is ~20 uops) */
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
static inline __m256i code8_of(const qmap_t *q, __m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_castps_si256(x);
    __m256i s = _mm256_srli_epi32(bits, 31);
    __m256i mag = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
    __m256i k = _mm256_sub_epi32(_mm256_srl_epi32(mag, _mm_cvtsi32_si128(q->shift)), _mm256_set1_epi32(q->base));
    k = _mm256_max_epi32(k, _mm256_setzero_si256());
    __m256i neg = _mm256_sub_epi32(_mm256_setzero_si256(), s); /* all ones where negative */
    __m256i idx = _mm256_add_epi32(k, _mm256_and_si256(neg, _mm256_set1_epi32(q->nk)));
    __m256i entry = lookup_epi32(q->lut, idx);
    __m256i low_mask = _mm256_set1_epi32((1 << q->shift) - 1);
    __m256i key = _mm256_xor_si256(_mm256_and_si256(mag, low_mask), _mm256_and_si256(neg, low_mask));
    __m256i gt = _mm256_cmpgt_epi32(key, _mm256_and_si256(entry, low_mask));
    return _mm256_sub_epi32(_mm256_srli_epi32(entry, 24), gt); /* gt is -1 where true */
}
/* the same for x >= +0 (second moments: v and its scale are never negative, nor -0): no sign handling */
static inline __m256i code8_of_nonneg(const qmap_t *q, __m256 x) {
    __m256i bits = _mm256_castps_si256(_mm256_min_ps(x, _mm256_set1_ps(1.0f)));
    __m256i k = _mm256_sub_epi32(_mm256_srl_epi32(bits, _mm_cvtsi32_si128(q->shift)), _mm256_set1_epi32(q->base));
    __m256i entry = lookup_epi32(q->lut, _mm256_max_epi32(k, _mm256_setzero_si256()));
    __m256i low_mask = _mm256_set1_epi32((1 << q->shift) - 1);
    __m256i gt = _mm256_cmpgt_epi32(_mm256_and_si256(bits, low_mask), _mm256_and_si256(entry, low_mask));
    return _mm256_sub_epi32(_mm256_srli_epi32(entry, 24), gt);
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
        __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)((uint32_t)i + job->offset)),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
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
#define AINLINE static inline __attribute__((always_inline))

/* what one call derives once from the config: the 4-bit search and decode tables */
typedef struct {
#ifdef __AVX2__
    __m256 m7[2], t1[2], t2[2], t3[2]; /* [0] first moment, [1] second moment */
#endif
    /* 4-bit maps: for each byte value B, the two values it codes (value[B & 15], value[B >> 4]): one 8-byte
     * load decodes two elements */
    float pair[2][512] __attribute__((aligned(64)));
} derived_t;

static void derive(const config_t *cfg, derived_t *d) {
    const qmap_t *qs[2] = {&cfg->qm, &cfg->qv};
    for (int k = 0; k < 2; k++) {
        const qmap_t *q = qs[k];
        if (q->bits == 4)
            for (int byte = 0; byte < 256; byte++) {
                d->pair[k][2 * byte] = q->val[byte & 15];
                d->pair[k][2 * byte + 1] = q->val[byte >> 4];
            }
#ifdef __AVX2__
        if (q->bits == 4) {
            const float *mid = q->mid;
            d->m7[k] = _mm256_set1_ps(mid[7]);
            /* t1, t2: four entries or fewer, repeated in both 128-bit lanes for the in-lane vpermilps */
            d->t1[k] = _mm256_setr_ps(mid[3], mid[11], 0, 0, mid[3], mid[11], 0, 0);
            d->t2[k] = _mm256_setr_ps(mid[1], mid[5], mid[9], mid[13], mid[1], mid[5], mid[9], mid[13]);
            d->t3[k] = _mm256_setr_ps(mid[0], mid[2], mid[4], mid[6], mid[8], mid[10], mid[12], mid[14]);
        }
#endif
    }
}

#ifdef __AVX2__
/* 8 table values at 8 byte codes: scalar loads straight from the codes (no index vector round trip) */
AINLINE __m256 lookup_codes8(const float *table, const uint8_t *c) {
    return _mm256_setr_ps(table[c[0]], table[c[1]], table[c[2]], table[c[3]], table[c[4]], table[c[5]],
                          table[c[6]], table[c[7]]);
}
/* nearest 4-bit code: branchless binary search over the 15 sorted midpoints with in-register permutes.
 * Each level compares x with the midpoint chosen by the bits found so far; the final count of midpoints < x
 * is the code: exactly the bucketize rule, for any sorted map, with no table reads. */
AINLINE __m256i bsearch4(const derived_t *d, int k, __m256 x) {
    const __m256i one = _mm256_set1_epi32(1);
    __m256i j = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(d->m7[k], x, _CMP_LT_OQ)), one);
    __m256 c = _mm256_permutevar_ps(d->t1[k], j); /* in-lane: cheaper than vpermps on AMD */
    j = _mm256_sub_epi32(_mm256_add_epi32(j, j), _mm256_castps_si256(_mm256_cmp_ps(c, x, _CMP_LT_OQ)));
    c = _mm256_permutevar_ps(d->t2[k], j);
    j = _mm256_sub_epi32(_mm256_add_epi32(j, j), _mm256_castps_si256(_mm256_cmp_ps(c, x, _CMP_LT_OQ)));
    c = _mm256_permutevar8x32_ps(d->t3[k], j);
    return _mm256_sub_epi32(_mm256_add_epi32(j, j), _mm256_castps_si256(_mm256_cmp_ps(c, x, _CMP_LT_OQ)));
}
/* 8 elements' 4-bit codes (4 bytes) -> their map values, two per 8-byte load from the pair table */
AINLINE __m256 lookup_pairs8(const float *pair, const uint8_t *c) {
    __m128d a = _mm_loadl_pd(_mm_setzero_pd(), (const double *)(pair + 2 * c[0]));
    a = _mm_loadh_pd(a, (const double *)(pair + 2 * c[1]));
    __m128d b = _mm_loadl_pd(_mm_setzero_pd(), (const double *)(pair + 2 * c[2]));
    b = _mm_loadh_pd(b, (const double *)(pair + 2 * c[3]));
    return _mm256_castpd_ps(_mm256_insertf128_pd(_mm256_castpd128_pd256(a), b, 1));
}
/* 16 codes (two vectors of 8 int32) -> 16 bytes (8-bit) or 8 bytes of nibble pairs (4-bit) */
AINLINE void codes16_store(uint8_t *codes, const int BITS, int64_t i, __m256i c0, __m256i c1) {
    __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(c0, c1), 0xD8);
    __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    if (BITS == 8) {
        _mm_storeu_si128((__m128i *)(codes + i), bytes);
    } else { /* even element in the low nibble: byte = c[2k] + 16 c[2k + 1] */
        __m128i pairs = _mm_maddubs_epi16(bytes, _mm_set1_epi16(0x1001));
        _mm_storel_epi64((__m128i *)(codes + (i >> 1)), _mm_packus_epi16(pairs, pairs));
    }
}
AINLINE __m256i encode8(const qmap_t *q, const derived_t *d, int k, const int BITS, __m256 x) {
    if (BITS == 4) /* clamp to [-1, 1] like the table path (x is finite) */
        return bsearch4(d, k, _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f)));
    return k == 1 ? code8_of_nonneg(q, x) : code8_of(q, x); /* k == 1: Adam's second moment */
}
#endif

/* quantize buf[0 .. end - start) (elements start .. end of the tensor) with 1 / scale `inv` */
AINLINE void quantize_range(const qmap_t *q, const derived_t *d, int k, const int BITS, const float *buf,
                            int64_t start, int64_t end, float inv, uint8_t *codes) {
    int64_t j = start;
#ifdef __AVX2__
    const __m256 vinv = _mm256_set1_ps(inv);
    for (; j + 16 <= end; j += 16) {
        __m256i c0 = encode8(q, d, k, BITS, _mm256_mul_ps(_mm256_loadu_ps(buf + (j - start)), vinv));
        __m256i c1 = encode8(q, d, k, BITS, _mm256_mul_ps(_mm256_loadu_ps(buf + (j - start) + 8), vinv));
        codes16_store(codes, BITS, j, c0, c1);
    }
    for (; j + 8 <= end; j += 8)
        codes8_store(codes, BITS, j, encode8(q, d, k, BITS, _mm256_mul_ps(_mm256_loadu_ps(buf + (j - start)), vinv)));
#endif
    scalar_quantize(q, buf, j, end, start, inv, codes);
}

AINLINE void block_impl(const config_t *cfg, const derived_t *d, const job_t *job, int64_t b,
                        float *restrict mbuf, float *restrict vbuf, const int ALGO, const int PB, const int GB,
                        const int BM, const int BV, const int RND, const int DEC, const int WD, const int MAX) {
    config_t c = *cfg; /* a local copy: code stores (uint8) may alias anything, locals they cannot */
    c.algo = ALGO;
    c.p_bf16 = PB;
    c.g_bf16 = GB;
    c.qm.bits = BM;
    c.qv.bits = BV;
    c.rounding = RND;
    c.decoupled = DEC;
    c.has_wd = WD;
    c.maximize = MAX;
    job_t jb = *job;
    const int64_t B = c.block;
    const int64_t start = b * B;
    const int64_t end = start + B < jb.n ? start + B : jb.n;
    const float sm = jb.m_scales[b];
    const float sv = ALGO == 0 ? jb.v_scales[b] : 0.0f;
    float am = 0.0f, av = 0.0f;
    int64_t i = start;
#ifdef __AVX2__
    {
        const __m256 vsm = _mm256_set1_ps(sm), vsv = _mm256_set1_ps(sv);
        const __m256 b1 = _mm256_set1_ps(c.beta1), b2 = _mm256_set1_ps(c.beta2);
        const __m256 o1 = _mm256_set1_ps(c.omb1), o2 = _mm256_set1_ps(c.omb2);
        const __m256 eps = _mm256_set1_ps(c.eps), wd = _mm256_set1_ps(c.wd), lrwd = _mm256_set1_ps(c.lrwd);
        const __m256 bc2 = _mm256_set1_ps(jb.inv_bc2), ss = _mm256_set1_ps(jb.step_size);
        const __m256 lr = _mm256_set1_ps(c.lr), zero = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
        __m256 vam = zero, vav = zero;
        for (; i + 8 <= end; i += 8) {
            __m256 g = load8_g(&c, &jb, i);
            if (MAX) g = _mm256_xor_ps(g, sign);
            __m256 p = load8_p(&c, &jb, i);
            __m256 m = BM == 8 ? _mm256_mul_ps(lookup_codes8(c.qm.val, jb.m_codes + i), vsm)
                               : _mm256_mul_ps(lookup_pairs8(d->pair[0], jb.m_codes + (i >> 1)), vsm);
            __m256 delta;
            if (ALGO == 0) {
                if (!DEC && WD) g = _mm256_add_ps(g, _mm256_mul_ps(p, wd));
                __m256 v = BV == 8 ? _mm256_mul_ps(lookup_codes8(c.qv.val, jb.v_codes + i), vsv)
                                   : _mm256_mul_ps(lookup_pairs8(d->pair[1], jb.v_codes + (i >> 1)), vsv);
                m = _mm256_add_ps(_mm256_mul_ps(m, b1), _mm256_mul_ps(g, o1));
                v = _mm256_add_ps(_mm256_mul_ps(v, b2), _mm256_mul_ps(_mm256_mul_ps(g, g), o2));
                __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), bc2), eps);
                __m256 upd = _mm256_mul_ps(_mm256_div_ps(m, denom), ss);
                delta = _mm256_xor_ps(upd, sign);
                if (DEC && WD) delta = _mm256_sub_ps(delta, _mm256_mul_ps(p, lrwd));
                _mm256_storeu_ps(vbuf + (i - start), v);
                vav = _mm256_max_ps(vav, v); /* v >= 0 */
            } else {
                __m256 cc = _mm256_add_ps(_mm256_mul_ps(m, b1), _mm256_mul_ps(g, o1));
                __m256 pos = _mm256_and_ps(_mm256_cmp_ps(cc, zero, _CMP_GT_OQ), one);
                __m256 neg = _mm256_and_ps(_mm256_cmp_ps(cc, zero, _CMP_LT_OQ), one);
                __m256 sg = _mm256_sub_ps(pos, neg);
                delta = _mm256_xor_ps(_mm256_mul_ps(sg, lr), sign);
                if (WD) delta = _mm256_sub_ps(delta, _mm256_mul_ps(p, lrwd));
                m = _mm256_add_ps(_mm256_mul_ps(m, b2), _mm256_mul_ps(g, o2));
            }
            _mm256_storeu_ps(mbuf + (i - start), m);
            vam = _mm256_max_ps(vam, _mm256_andnot_ps(sign, m));
            store8_param(&c, &jb, i, p, delta);
        }
        am = hmax8(vam);
        av = hmax8(vav);
    }
#endif
    scalar_elems(&c, &jb, i, end, sm, sv, mbuf, vbuf, start, &am, &av);

#ifdef LMOPT_BENCH_SKIP_QUANTIZE /* a measurement build only (benchmarks/lowbit_kernel_breakdown.py) */
    return;
#endif
    /* quantize the new moments with the new scales */
    jb.m_scales[b] = am;
    quantize_range(&c.qm, d, 0, BM, mbuf, start, end, am > 0.0f ? 1.0f / am : 0.0f, jb.m_codes);
    if (ALGO == 0) {
        jb.v_scales[b] = av;
        quantize_range(&c.qv, d, 1, BV, vbuf, start, end, av > 0.0f ? 1.0f / av : 0.0f, jb.v_codes);
    }
}

typedef void (*block_fn)(const config_t *, const derived_t *, const job_t *, int64_t, float *, float *);
static void block_generic(const config_t *c, const derived_t *d, const job_t *j, int64_t b, float *mb, float *vb) {
    block_impl(c, d, j, b, mb, vb, c->algo, c->p_bf16, c->g_bf16, c->qm.bits, c->qv.bits, c->rounding, c->decoupled,
               c->has_wd, c->maximize);
}
/* the common cases, specialized at compile time: fp32 parameters and gradients, decoupled weight decay (or
 * none), not maximizing */
#define SPECIALIZE(name, algo, bits, wd)                                                                  \
    static void name(const config_t *c, const derived_t *d, const job_t *j, int64_t b, float *mb, float *vb) { \
        block_impl(c, d, j, b, mb, vb, algo, 0, 0, bits, bits, 0, 1, wd, 0);                             \
    }
SPECIALIZE(block_adam8_wd, 0, 8, 1)
SPECIALIZE(block_adam8, 0, 8, 0)
SPECIALIZE(block_adam4_wd, 0, 4, 1)
SPECIALIZE(block_adam4, 0, 4, 0)
SPECIALIZE(block_lion8_wd, 1, 8, 1)
SPECIALIZE(block_lion8, 1, 8, 0)

static block_fn choose_block_fn(const config_t *c) {
    if (c->p_bf16 || c->g_bf16 || c->rounding || c->maximize || (c->has_wd && !c->decoupled)) return block_generic;
    if (c->algo == 0 && c->qm.bits == 8 && c->qv.bits == 8) return c->has_wd ? block_adam8_wd : block_adam8;
    if (c->algo == 0 && c->qm.bits == 4 && c->qv.bits == 4) return c->has_wd ? block_adam4_wd : block_adam4;
    if (c->algo == 1 && c->qm.bits == 8) return c->has_wd ? block_lion8_wd : block_lion8;
    return block_generic;
}

/* ---------------------------------------------------------------------------------------------- threads */
typedef struct {
    const config_t *cfg;
    const derived_t *derived;
    const job_t *jobs;
    int njobs;
    int64_t first, last; /* global block range [first, last) */
} range_t;

static void *run_range(void *arg) {
    const range_t *r = (const range_t *)arg;
    float mbuf[MAX_BLOCK] __attribute__((aligned(64))), vbuf[MAX_BLOCK] __attribute__((aligned(64)));
    const block_fn fn = choose_block_fn(r->cfg);
    int64_t offset = 0;
    for (int j = 0; j < r->njobs && offset < r->last; j++) {
        const job_t *job = &r->jobs[j];
        int64_t nb = (job->n + r->cfg->block - 1) / r->cfg->block;
        int64_t lo = r->first > offset ? r->first - offset : 0;
        int64_t hi = r->last - offset < nb ? r->last - offset : nb;
        for (int64_t b = lo; b < hi; b++) fn(r->cfg, r->derived, job, b, mbuf, vbuf);
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
    derived_t derived;
    derive(cfg, &derived);
    for (int t = 0; t < nthreads; t++) {
        ranges[t].cfg = cfg;
        ranges[t].derived = &derived;
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
