/* What overlock's C kernels share: GCC/Clang vector types of the widest float vector the target
 * has (VW floats: 16 with AVX-512, 8 with AVX, else 4), unaligned loads and stores, stores of a
 * partial vector, and zeroed cache-line-aligned buffers. Explicit vector types keep the kernels
 * vectorised whatever the compiler's cost model decides. */
#ifndef OVERLOCK_VECTORS_H
#define OVERLOCK_VECTORS_H

#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif

/* The width this library was built with (each csrc/<name>.c is its own library): what tests check when
 * they build for narrower vectors (kernels/native.py `OVERLOCK_NATIVE_FLAGS`). */
int overlock_vector_width(void) { return VW; }

typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int vi __attribute__((vector_size(VW * sizeof(int))));

static inline vf vload(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, vf v) { memcpy(p, &v, sizeof v); }
/* a in every lane. (Not (vf){0} + a: that adds 0 to a first, -0 + 0 being +0, then broadcasts;
 * a - 0 is a, so a - (vf){0} is the broadcast alone.) */
static inline vf vsplat(float a) { return a - (vf){0}; }

/* The sum and the maximum of a vector's lanes (lane by lane on a copy: reducing the vector in place
 * would keep it in memory for the whole loop around the call). */
static inline float vsum(vf v) {
    float total = 0.0f;
    for (int i = 0; i < VW; i++) total += v[i];
    return total;
}

static inline float vmax(vf v) {
    float top = v[0];
    for (int i = 1; i < VW; i++) top = v[i] > top ? v[i] : top;
    return top;
}

/* Store the first n lanes of v (n = VW but for the channels' last, partial vector). */
static inline void vstore_n(float* p, vf v, long n) {
    if (n == VW)
        vstore(p, v);
    else
        memcpy(p, &v, (size_t)n * sizeof(float));
}

/* Add the first n lanes of v to p[0 .. n). */
static inline void vadd_n(float* p, vf v, long n) {
    float lanes[VW];
    memcpy(lanes, &v, sizeof v);
    for (long i = 0; i < n; i++) p[i] += lanes[i];
}

/* e^x for x <= 0, from a Cephes-style range reduction (relative error ~1e-7; e^x for x < -87 is
 * e^-87, ~1.6e-38, not 0). */
static inline vf vexp_nonpositive(vf x) {
    vi low = x < vsplat(-87.0f);
    x = (vf)(((vi)vsplat(-87.0f) & low) | ((vi)x & ~low));
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    vf r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    vf p = vsplat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi two_n = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)two_n;
}

/* Zeroed, 64-byte aligned floats (vector loads that do not straddle cache lines where C is a
 * multiple of 16), or NULL. */
static inline float* zeroed(size_t count) {
    size_t bytes = (count * sizeof(float) + 63) / 64 * 64;
    float* p = aligned_alloc(64, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

#endif
