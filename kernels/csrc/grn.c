/* The two passes over the map of GRN's backward (builder/layers.py `_GRNFunction`), NHWC float32.
 *
 * GRN(x) = x * scale + beta with scale = 1 + gamma * n(x) per (image, channel). Its input gradient
 * is g * scale + x * coef, where coef comes from A = sum over pixels of g * x (and grad_beta from
 * sum g): one pass to reduce, one to write. In PyTorch ops the same backward makes about ten passes
 * over the 4x-wide MLP map (a product, its sum, the sum of g, a scaled copy, an in-place multiply-add).
 *
 * Maps are (B, P, C) in memory: P pixels of C channels (a channels_last map). Each call covers
 * images [b0, b1), so callers can split a batch between threads. Return 0, or -1 if a buffer could
 * not be allocated.
 */
#include "tasks.h"
#include "vectors.h"

/* Pixels summed in float before each partial sum is added to the image's total (two levels keep
 * the rounding of a 3136-pixel sum near that of a pairwise one). */
#define CHUNK 64

/* sum_gx[b, c] = sum_p g[b, p, c] * x[b, p, c],  sum_g[b, c] = sum_p g[b, p, c]  for b in [b0, b1). */
int overlock_grn_backward_sums(const float* restrict g, const float* restrict x, float* restrict sum_gx,
                               float* restrict sum_g, long P, long C, long b0, long b1) {
    long Cp = (C + VW - 1) / VW * VW, whole = C / VW * VW;
    float* part = zeroed((size_t)(4 * Cp)); /* chunk sums of g*x and g, then the image's totals */
    if (!part) return -1;
    float *part_gx = part, *part_g = part + Cp, *total_gx = part + 2 * Cp, *total_g = part + 3 * Cp;
    for (long b = b0; b < b1; b++) {
        memset(total_gx, 0, (size_t)(2 * Cp) * sizeof(float));
        for (long p0 = 0; p0 < P; p0 += CHUNK) {
            memset(part, 0, (size_t)(2 * Cp) * sizeof(float));
            long p1 = p0 + CHUNK < P ? p0 + CHUNK : P;
            for (long p = p0; p < p1; p++) {
                const float* gp = g + (b * P + p) * C;
                const float* xp = x + (b * P + p) * C;
                long c = 0;
                for (; c < whole; c += VW) {
                    vf gv = vload(gp + c);
                    vstore(part_gx + c, vload(part_gx + c) + gv * vload(xp + c));
                    vstore(part_g + c, vload(part_g + c) + gv);
                }
                for (; c < C; c++) {
                    part_gx[c] += gp[c] * xp[c];
                    part_g[c] += gp[c];
                }
            }
            for (long c = 0; c < Cp; c += VW) {
                vstore(total_gx + c, vload(total_gx + c) + vload(part_gx + c));
                vstore(total_g + c, vload(total_g + c) + vload(part_g + c));
            }
        }
        memcpy(sum_gx + b * C, total_gx, (size_t)C * sizeof(float));
        memcpy(sum_g + b * C, total_g, (size_t)C * sizeof(float));
    }
    free(part);
    return 0;
}

/* out[b, p, c] = g[b, p, c] * scale[b, c] + x[b, p, c] * coef[b, c]  for b in [b0, b1).
 * out may be g itself (each element is read before it is written), so g and out are not restrict. */
int overlock_grn_input_grad(const float* g, const float* restrict x, const float* restrict scale,
                            const float* restrict coef, float* out, long P, long C, long b0, long b1) {
    long whole = C / VW * VW;
    for (long b = b0; b < b1; b++) {
        const float* s = scale + b * C;
        const float* k = coef + b * C;
        for (long p = 0; p < P; p++) {
            const float* gp = g + (b * P + p) * C;
            const float* xp = x + (b * P + p) * C;
            float* op = out + (b * P + p) * C;
            long c = 0;
            for (; c < whole; c += VW) vstore(op + c, vload(gp + c) * vload(s + c) + vload(xp + c) * vload(k + c));
            for (; c < C; c++) op[c] = gp[c] * s[c] + xp[c] * k[c];
        }
    }
    return 0;
}

/* Entry points for kernels/native.py `run` (tasks.h). */
OVERLOCK_TASKS(overlock_grn_backward_sums, 3,
               (const float* g, const float* x, float* sum_gx, float* sum_g, long P, long C, const long* tasks,
                long ntasks, long threads),
               overlock_grn_backward_sums(g, x, sum_gx, sum_g, P, C, task[1], task[2]))
OVERLOCK_TASKS(overlock_grn_input_grad, 3,
               (const float* g, const float* x, const float* scale, const float* coef, float* out, long P, long C,
                const long* tasks, long ntasks, long threads),
               overlock_grn_input_grad(g, x, scale, coef, out, P, C, task[1], task[2]))
