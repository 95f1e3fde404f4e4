/* Weight gradient of a same-padded, stride-1 depthwise convolution, NHWC float32:
 *
 *   grad_weight[ky, kx, c] += sum_{b, y, x} grad[b, y, x, c] * input[b, y + d*ky - p, x + d*kx - p, c]
 *
 * (p = d*(K-1)/2, zero outside the map). PyTorch's CPU weight gradient of depthwise convolutions
 * runs at well under 1 GFLOP/s for large or dilated kernels, which is why kernels/depthwise.py
 * went through FFTs and reshuffled batches; this is the direct sum, vectorised over channels
 * (channels innermost) with a block of kernel columns' sums held in registers while a row of the
 * gradient streams past. Each image is first copied into a zero-bordered buffer, so the loops
 * have no bounds tests.
 *
 * Each call covers images [b0, b1) and ADDS to grad_weight ((K*K, C), tap-major): callers give
 * each concurrent call its own buffer. Returns 0, or -1 if the padded buffer could not be allocated.
 */
#include "tasks.h"
#include "vectors.h"

/* The sums of KB consecutive kernel columns kx0 .. kx0 + KB - 1 of kernel row ky, channels [c, c + VW),
 * over all rows of one image; columns past K are computed on the buffer's zero slack and dropped. */
#define COLUMN_BLOCK(KB)                                                                                      \
    static void column_block_##KB(const float* restrict g, const float* restrict pad, float* restrict out,    \
                                  long H, long W, long C, long Wp, long K, long d, long ky, long kx0, long c,  \
                                  long n) {                                                                   \
        vf acc[KB];                                                                                           \
        for (int j = 0; j < KB; j++) acc[j] = (vf){0};                                                        \
        for (long y = 0; y < H; y++) {                                                                        \
            const float* grow = g + y * W * C + c;                                                            \
            const float* prow = pad + ((y + d * ky) * Wp + d * kx0) * C + c;                                  \
            for (long x = 0; x < W; x++) {                                                                    \
                vf gv = vload(grow + x * C);                                                                  \
                const float* px = prow + x * C;                                                               \
                for (int j = 0; j < KB; j++) acc[j] += gv * vload(px + j * d * C);                            \
            }                                                                                                 \
        }                                                                                                     \
        for (int j = 0; j < KB && kx0 + j < K; j++) vadd_n(out + (ky * K + kx0 + j) * C + c, acc[j], n);     \
    }

COLUMN_BLOCK(2)
COLUMN_BLOCK(4)
COLUMN_BLOCK(6)
COLUMN_BLOCK(8)

int overlock_depthwise_weight_grad(const float* restrict input, const float* restrict grad,
                                   float* restrict grad_weight, long H, long W, long C, long K, long d, long b0,
                                   long b1) {
    long p = d * (K - 1) / 2, Hp = H + 2 * p, Wp = W + 2 * p;
    /* slack: the last column block may read 8 columns of d pixels past the last row */
    float* pad = zeroed((size_t)(Hp * Wp * C + 8 * d * C + VW));
    if (!pad) return -1;
    for (long b = b0; b < b1; b++) {
        for (long y = 0; y < H; y++)
            memcpy(pad + ((y + p) * Wp + p) * C, input + (b * H + y) * W * C, (size_t)(W * C) * sizeof(float));
        const float* g = grad + b * H * W * C;
        for (long c = 0; c < C; c += VW) {
            long n = C - c < VW ? C - c : VW;
            for (long ky = 0; ky < K; ky++) {
                /* blocks of 8 columns, the rest in the narrowest block that holds it (at most one
                 * column computed in vain: 13 = 8 + 6, 17 = 8 + 8 + 2, 5 -> 6, 3 -> 4) */
                for (long kx0 = 0; kx0 < K;) {
                    long rest = K - kx0;
                    if (rest >= 7) {
                        column_block_8(g, pad, grad_weight, H, W, C, Wp, K, d, ky, kx0, c, n);
                        kx0 += 8;
                    } else if (rest >= 5) {
                        column_block_6(g, pad, grad_weight, H, W, C, Wp, K, d, ky, kx0, c, n);
                        kx0 += 6;
                    } else if (rest >= 3) {
                        column_block_4(g, pad, grad_weight, H, W, C, Wp, K, d, ky, kx0, c, n);
                        kx0 += 4;
                    } else {
                        column_block_2(g, pad, grad_weight, H, W, C, Wp, K, d, ky, kx0, c, n);
                        kx0 += 2;
                    }
                }
            }
        }
    }
    free(pad);
    return 0;
}

/* Entry point for kernels/native.py `run` (tasks.h): each task's sums go to row task[0] of grad_weight. */
OVERLOCK_TASKS(overlock_depthwise_weight_grad, 3,
               (const float* input, const float* grad, float* grad_weight, long weight_stride, long H, long W,
                long C, long K, long d, const long* tasks, long ntasks, long threads),
               overlock_depthwise_weight_grad(input, grad, grad_weight + task[0] * weight_stride, H, W, C, K, d,
                                              task[1], task[2]))
