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

typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int vi __attribute__((vector_size(VW * sizeof(int))));

static inline vf vload(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vsplat(float a) { return (vf){0} + a; }

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

/* Zeroed, 64-byte aligned floats (vector loads that do not straddle cache lines where C is a
 * multiple of 16), or NULL. */
static inline float* zeroed(size_t count) {
    size_t bytes = (count * sizeof(float) + 63) / 64 * 64;
    float* p = aligned_alloc(64, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

#endif
