/* Forward of a same-padded, stride-1 depthwise convolution with bias, NHWC float32:
 *
 *   out[b, y, x, c] = bias[c] + sum_{ky, kx} weight[ky, kx, c] * input[b, y + d*ky - p, x + d*kx - p, c]
 *
 * (p = d*(K-1)/2, zero outside the map). For the 7x7 and 14x14 maps of the Focus-Net and the
 * Base-Net's last stage, oneDNN's depthwise forward spends more time around the arithmetic than in
 * it: a 3x3 kernel on 256 x 14x14 maps runs at 3-7 GMAC/s, a 13x13 one at 10-17 (batch 8, one
 * thread, channels_last). Here a block of up to 14 outputs of one row and 16 channels (one AVX-512
 * vector each) stays in registers while the kernel's taps stream past, so every multiply-add costs
 * one load of the input; kernel rows that fall wholly into the zero border are skipped. Each image
 * is first copied into a zero-bordered buffer, so the loops have no bounds tests.
 *
 * Weight is (K*K, C), tap-major; bias is (C) or NULL. Each call covers images [b0, b1), so callers
 * can split a batch between threads. Returns 0, or -1 if a buffer could not be allocated.
 */
#include "tasks.h"
#include "vectors.h"

/* Outputs x0 .. x0 + XB - 1 of row y, channels [c, c + n): kernel rows ky0 .. ky1 - 1 (those that
 * read inside the map), every kernel column (the border columns read the buffer's zeros). */
#define ROW_BLOCK(XB)                                                                                       \
    static void row_block_##XB(const float* restrict pad, const float* restrict taps, float* restrict out,  \
                               long C, long Cp, long Wp, long K, long d, long y, long x0, long ky0,         \
                               long ky1, long c, long n) {                                                  \
        vf acc[XB];                                                                                         \
        vf shift = vload(taps + K * K * Cp + c);                                                            \
        for (int j = 0; j < XB; j++) acc[j] = shift;                                                        \
        for (long ky = ky0; ky < ky1; ky++) {                                                               \
            const float* row = pad + ((y + d * ky) * Wp + x0) * VW;                                         \
            const float* w = taps + ky * K * Cp + c;                                                        \
            for (long kx = 0; kx < K; kx++) {                                                               \
                vf wv = vload(w + kx * Cp);                                                                 \
                const float* px = row + d * kx * VW;                                                        \
                for (int j = 0; j < XB; j++) acc[j] += wv * vload(px + j * VW);                             \
            }                                                                                               \
        }                                                                                                   \
        for (int j = 0; j < XB; j++) vstore_n(out + (x0 + j) * C + c, acc[j], n);                           \
    }

ROW_BLOCK(1)
ROW_BLOCK(2)
ROW_BLOCK(4)
ROW_BLOCK(7)
ROW_BLOCK(8)
ROW_BLOCK(14)

/* Outputs per register block for the `rest` columns left of a row: 14, then 8, 7, 4, 2, 1. */
static long block_width(long rest) {
    if (rest >= 14) return 14;
    if (rest >= 8) return 8;
    if (rest == 7) return 7;
    if (rest >= 4) return 4;
    return rest >= 2 ? 2 : 1;
}

int overlock_depthwise_conv_forward(const float* restrict input, const float* restrict weight,
                                    const float* restrict bias, float* restrict out, long H, long W, long C,
                                    long K, long d, long b0, long b1) {
    long p = d * (K - 1) / 2, Hp = H + 2 * p, Wp = W + 2 * p, Cp = (C + VW - 1) / VW * VW;
    /* slack: vector loads of the last, partial channel block read up to VW - 1 floats past a pixel */
    float* pad = zeroed((size_t)(Cp * Hp * Wp)); /* one zero-bordered (Hp, Wp, VW) plane per channel block */
    float* taps = zeroed((size_t)((K * K + 1) * Cp)); /* weight, then bias, each tap padded to Cp */
    if (!pad || !taps) {
        free(pad);
        free(taps);
        return -1;
    }
    for (long k = 0; k < K * K; k++) memcpy(taps + k * Cp, weight + k * C, (size_t)C * sizeof(float));
    if (bias) memcpy(taps + K * K * Cp, bias, (size_t)C * sizeof(float));
    for (long b = b0; b < b1; b++) {
        for (long y = 0; y < H; y++)
            for (long x = 0; x < W; x++) {
                const float* pixel = input + ((b * H + y) * W + x) * C;
                for (long c = 0; c < C; c += VW)
                    memcpy(pad + ((c / VW * Hp + y + p) * Wp + x + p) * VW, pixel + c,
                           (size_t)(C - c < VW ? C - c : VW) * sizeof(float));
            }
        float* image = out + b * H * W * C;
        for (long c = 0; c < C; c += VW) {
            long n = C - c < VW ? C - c : VW;
            const float* plane = pad + c / VW * Hp * Wp * VW;
            /* a strip of columns at a time, down all rows: the strip's K input rows stay in L1 */
            for (long x0 = 0, xb; x0 < W; x0 += xb) {
                xb = block_width(W - x0);
                for (long y = 0; y < H; y++) {
                    /* kernel rows whose input row y + d*ky - p lies in [0, H) */
                    long ky0 = y < p ? (p - y + d - 1) / d : 0;
                    long last = H - 1 - y + p; /* d*ky <= last */
                    long ky1 = last / d + 1 < K ? last / d + 1 : K;
                    float* orow = image + y * W * C;
                    switch (xb) {
                        case 14: row_block_14(plane, taps, orow, C, Cp, Wp, K, d, y, x0, ky0, ky1, c, n); break;
                        case 8: row_block_8(plane, taps, orow, C, Cp, Wp, K, d, y, x0, ky0, ky1, c, n); break;
                        case 7: row_block_7(plane, taps, orow, C, Cp, Wp, K, d, y, x0, ky0, ky1, c, n); break;
                        case 4: row_block_4(plane, taps, orow, C, Cp, Wp, K, d, y, x0, ky0, ky1, c, n); break;
                        case 2: row_block_2(plane, taps, orow, C, Cp, Wp, K, d, y, x0, ky0, ky1, c, n); break;
                        default: row_block_1(plane, taps, orow, C, Cp, Wp, K, d, y, x0, ky0, ky1, c, n);
                    }
                }
            }
        }
    }
    free(pad);
    free(taps);
    return 0;
}

/* Entry point for kernels/native.py `run` (tasks.h). */
OVERLOCK_TASKS(overlock_depthwise_conv_forward, 3,
               (const float* input, const float* weight, const float* bias, float* out, long H, long W, long C,
                long K, long d, const long* tasks, long ntasks, long threads),
               overlock_depthwise_conv_forward(input, weight, bias, out, H, W, C, K, d, task[1], task[2]))
