/* GELU -> 3x3 depthwise convolution (+ bias) -> per-(image, channel) sum of squares, and its backward.
 *
 * The middle of every OverLoCK MLP (builder/layers.py ConvMLP): fc1 -> GELU -> x + dwconv3x3(x) ->
 * GRN -> fc2. PyTorch runs the middle as four passes over the 4x-wide hidden map (GELU, the conv,
 * GRN's sum of squares, and in the backward GELU's recomputation, the conv's input and weight
 * gradients, GELU's backward); here it is one pass forward and one backward. The GELU of each row
 * is computed once into a three-row ring, from which the conv reads its window, and GRN's energy
 * is summed as the outputs are written.
 *
 * Data: NHWC float32, contiguous ((B, H, W, C) in memory, i.e. a channels_last (B, C, H, W) map).
 * Kernel taps are (9, C): tap ky*3+kx, channel innermost. The residual of ResDWConv is folded into
 * the centre tap by the caller. Each call covers images [b0, b1) and rows [y0, y1) of them, so
 * callers can split the work between threads; sums (squares, weight and bias gradients) are ADDED
 * to the caller's buffers, one set per concurrent call. Returns 0, or -1 if a buffer could not be
 * allocated.
 *
 * GELU is the exact one, 0.5 x (1 + erf(x / sqrt 2)), with erf from Abramowitz & Stegun 7.1.26
 * (absolute error < 1.5e-7, the approximation ATen's vectorised CPU erf uses) and exp from
 * vectors.h (`vexp_nonpositive`).
 */
#include <math.h>

#include "tasks.h"
#include "vectors.h"

/* GELU(x) into *act; returns GELU'(x) = Phi(x) + x phi(x) when want_grad, else 0. */
static inline vf vgelu(vf x, vf* act, int want_grad) {
    vf z = x * 0.70710678118654752f;
    vi sign = (vi)z & ((vi){0} + (int)0x80000000);
    vf a = (vf)((vi)z ^ sign);
    vf t = 1.0f / (1.0f + 0.3275911f * a);
    vf gauss = vexp_nonpositive(-a * a); /* exp(-x^2 / 2) */
    vf y = vsplat(1.061405429f);
    y = y * t - 1.453152027f;
    y = y * t + 1.421413741f;
    y = y * t - 0.284496736f;
    y = y * t + 0.254829592f;
    vf cdf = 0.5f + 0.5f * (vf)((vi)(1.0f - y * t * gauss) ^ sign); /* Phi(x) */
    *act = x * cdf;
    return want_grad ? cdf + x * gauss * 0.39894228040143268f : vsplat(0.0f);
}

/* act[i] = GELU(in[i]) and, if grad, grad[i] = GELU'(in[i]), for n floats. */
static void gelu_row(const float* in, float* act, float* grad, long n) {
    long i = 0;
    vf a, d;
    for (; i + VW <= n; i += VW) {
        d = vgelu(vload(in + i), &a, grad != NULL);
        vstore(act + i, a);
        if (grad) vstore(grad + i, d);
    }
    if (i < n) {
        float buf[VW] = {0};
        memcpy(buf, in + i, (size_t)(n - i) * sizeof(float));
        d = vgelu(vload(buf), &a, grad != NULL);
        memcpy(act + i, &a, (size_t)(n - i) * sizeof(float));
        if (grad) memcpy(grad + i, &d, (size_t)(n - i) * sizeof(float));
    }
}

/* Slot of image row r (r >= -1) in a three-row ring of padded rows. */
static inline float* slot(float* ring, long r, long padded_row) { return ring + ((r + 3) % 3) * padded_row; }

/* The rings' pixel stride S: C, but one cache line more where C is a multiple of 1024 floats (XT's
 * third-stage MLPs, T's). A channel block walks a column of ring pixels S floats apart; at a stride of
 * 4 KiB that column falls into one cache set and the taps' loads miss L1 (C = 1024 at 14x14: forward
 * 1.45x, backward 1.22x faster with S = 1040). At 512 and 256 channels the padded stride measured
 * 1.06x / 0.89x and 0.97x / 0.88x (forward / backward): they keep S = C.
 * (benchmarks/results/issue10_speed.md, round 12.) */
static inline long ring_stride(long C) { return C % 1024 == 0 ? C + 16 : C; }

/* Fill a padded ring row (one zero pixel left and right, pixels S floats apart) with GELU of image
 * row r, or zeros outside; GELU' into grad (contiguous, W*C) where grad is not NULL. */
static void load_gelu(float* dst, float* grad, const float* image, long r, long H, long W, long C, long S) {
    if (r < 0 || r >= H) {
        memset(dst, 0, (size_t)(W + 2) * S * sizeof(float));
        return;
    }
    const float* row = image + r * W * C;
    if (S == C) {
        gelu_row(row, dst + C, grad, W * C);
        return;
    }
    for (long x = 0; x < W; x++) gelu_row(row + x * C, dst + (x + 1) * S, grad ? grad + x * C : NULL, C);
}

static void load_copy(float* dst, const float* image, long r, long H, long W, long C, long S) {
    if (r < 0 || r >= H) {
        memset(dst, 0, (size_t)(W + 2) * S * sizeof(float));
        return;
    }
    const float* row = image + r * W * C;
    if (S == C) {
        memcpy(dst + C, row, (size_t)(W * C) * sizeof(float));
        return;
    }
    for (long x = 0; x < W; x++) memcpy(dst + (x + 1) * S, row + x * C, (size_t)C * sizeof(float));
}

/* The taps (9, C) and bias (C) copied with C rounded up to whole vectors (zeros after C), so that
 * every vector load of them stays inside the buffer. */
static float* padded_taps(const float* weight, const float* bias, long C, long Cp) {
    float* taps = zeroed((size_t)(10 * Cp));
    if (!taps) return NULL;
    for (long k = 0; k < 9; k++) memcpy(taps + k * Cp, weight + k * C, (size_t)C * sizeof(float));
    if (bias) memcpy(taps + 9 * Cp, bias, (size_t)C * sizeof(float));
    return taps;
}

/* The nine taps' vectors for channels [c, c + VW) (padded_taps layout: tap k at k * Cp). */
static inline void load_taps(vf w[9], const float* taps, long Cp, long c) {
    for (int k = 0; k < 9; k++) w[k] = vload(taps + k * Cp + c);
}

/* Rings hold padded rows of pixels S = ring_stride(C) floats apart; vector loads of the last,
 * partial channel block read up to VW - 1 floats past a pixel (into the next pixel, or the slack
 * after the last row): those lanes are computed and then dropped, never stored. */
#define RING_FLOATS(padded_row) ((size_t)(3 * (padded_row) + VW))

/* Rows [y0, y1) of one image: out and, added to sq (C floats), each channel's sum of squares. out may
 * be image itself (no `restrict` on either): output row y is stored after input row y + 1 went into
 * the ring, and rows up to y were read before. */
static void forward_image(const float* image, const float* restrict taps, float* out,
                          float* restrict sq, float* restrict ring, long H, long W, long C, long y0, long y1) {
    long S = ring_stride(C), padded_row = (W + 2) * S, Cp = (C + VW - 1) / VW * VW;
    memset(ring, 0, RING_FLOATS(padded_row) * sizeof(float));
    load_gelu(slot(ring, y0 - 1, padded_row), NULL, image, y0 - 1, H, W, C, S);
    load_gelu(slot(ring, y0, padded_row), NULL, image, y0, H, W, C, S);
    for (long y = y0; y < y1; y++) {
        load_gelu(slot(ring, y + 1, padded_row), NULL, image, y + 1, H, W, C, S);
        const float* up = slot(ring, y - 1, padded_row);
        const float* mid = slot(ring, y, padded_row);
        const float* down = slot(ring, y + 1, padded_row);
        float* o = out + y * W * C;
        for (long c = 0; c < C; c += VW) {
            long n = C - c < VW ? C - c : VW;
            vf w[9];
            load_taps(w, taps, Cp, c);
            vf shift = vload(taps + 9 * Cp + c), energy = vsplat(0.0f);
            const float *u = up + c, *m = mid + c, *d = down + c;
            for (long x = 0; x < W; x++, u += S, m += S, d += S) {
                vf s = shift + w[0] * vload(u) + w[1] * vload(u + S) + w[2] * vload(u + 2 * S) + w[3] * vload(m)
                       + w[4] * vload(m + S) + w[5] * vload(m + 2 * S) + w[6] * vload(d) + w[7] * vload(d + S)
                       + w[8] * vload(d + 2 * S);
                vstore_n(o + x * C + c, s, n);
                energy += s * s;
            }
            vadd_n(sq + c, energy, n);
        }
    }
}

int overlock_gelu_dwconv3x3_forward(const float* restrict hidden, const float* restrict weight,
                                     const float* restrict bias, float* restrict out, float* restrict squares,
                                     long H, long W, long C, long b0, long b1, long y0, long y1) {
    long S = ring_stride(C), padded_row = (W + 2) * S, Cp = (C + VW - 1) / VW * VW;
    float* ring = zeroed(RING_FLOATS(padded_row));
    float* taps = padded_taps(weight, bias, C, Cp);
    if (!ring || !taps) {
        free(ring);
        free(taps);
        return -1;
    }
    for (long b = b0; b < b1; b++)
        forward_image(hidden + b * H * W * C, taps, out + b * H * W * C, squares + b * C, ring, H, W, C, y0, y1);
    free(ring);
    free(taps);
    return 0;
}

/* The forward followed by GRN (builder/layers.py `GRN`), for inference: each image's map is rescaled
 * right after it is written, while it is still in cache, instead of in a pass of its own over the
 * whole batch (and a second output buffer):
 *   e[c] = sqrt(max(sum of squares[c], floor)),  scale[c] = 1 + gamma[c] * e[c] / (mean_c e + eps),
 *   out = out * scale + beta.
 * Whole images per call (the scale needs all of an image's rows). out may be hidden itself (in place,
 * `forward_image`). */
int overlock_gelu_dwconv3x3_grn_forward(const float* hidden, const float* restrict weight,
                                         const float* restrict bias, const float* restrict gamma,
                                         const float* restrict beta, float* out, long H, long W, long C,
                                         double floor, double eps, long b0, long b1) {
    long S = ring_stride(C), padded_row = (W + 2) * S, Cp = (C + VW - 1) / VW * VW;
    float* ring = zeroed(RING_FLOATS(padded_row));
    float* taps = padded_taps(weight, bias, C, Cp);
    float* coef = zeroed((size_t)(3 * Cp)); /* sums of squares, then scale; beta */
    if (!ring || !taps || !coef) {
        free(ring);
        free(taps);
        free(coef);
        return -1;
    }
    float *scale = coef, *shift = coef + Cp, *g = coef + 2 * Cp;
    memcpy(shift, beta, (size_t)C * sizeof(float));
    memcpy(g, gamma, (size_t)C * sizeof(float));
    for (long b = b0; b < b1; b++) {
        float* image = out + b * H * W * C;
        memset(scale, 0, (size_t)Cp * sizeof(float));
        forward_image(hidden + b * H * W * C, taps, image, scale, ring, H, W, C, 0, H);
        float total = 0.0f;
        for (long c = 0; c < C; c++) {
            scale[c] = sqrtf(scale[c] > (float)floor ? scale[c] : (float)floor);
            total += scale[c];
        }
        float mean = total / (float)C + (float)eps;
        for (long c = 0; c < C; c++) scale[c] = 1.0f + g[c] * (scale[c] / mean);
        long whole = C / VW * VW;
        for (long p = 0; p < H * W; p++) {
            float* px = image + p * C;
            long c = 0;
            for (; c < whole; c += VW) vstore(px + c, vload(px + c) * vload(scale + c) + vload(shift + c));
            for (; c < C; c++) px[c] = px[c] * scale[c] + shift[c];
        }
    }
    free(ring);
    free(taps);
    free(coef);
    return 0;
}

/* With g = dL/d out (NHWC, like out) and a = GELU(hidden):
 *   grad_hidden[y, x] = GELU'(hidden[y, x]) * sum_{ky, kx} w[ky, kx] g[y - ky + 1, x - kx + 1]
 *   grad_weight[ky, kx] += sum_{b, y, x} g[y, x] a[y + ky - 1, x + kx - 1],  grad_bias += sum g.
 * GELU and its derivative are recomputed row by row from hidden (nothing else is saved). For each
 * row and block of channels the nine weight-gradient sums and the bias's stay in registers.
 * grad_hidden may be hidden itself when each call covers whole images (y0 = 0, y1 = H): row y is
 * written after rows up to y + 1 were read into the rings, and no later row reads row y again. */
int overlock_gelu_dwconv3x3_backward(const float* hidden, const float* restrict grad,
                                      const float* restrict weight, float* grad_hidden,
                                      float* restrict grad_weight, float* restrict grad_bias, long H, long W,
                                      long C, long b0, long b1, long y0, long y1) {
    long S = ring_stride(C), padded_row = (W + 2) * S, Cp = (C + VW - 1) / VW * VW;
    float* act_ring = zeroed(RING_FLOATS(padded_row));
    float* grad_ring = zeroed(RING_FLOATS(padded_row));
    float* slope = zeroed((size_t)(2 * W * C + VW)); /* GELU' of rows y and y + 1 */
    float* taps = padded_taps(weight, NULL, C, Cp);
    int status = 0;
    if (!act_ring || !grad_ring || !slope || !taps) {
        status = -1;
        goto done;
    }
    for (long b = b0; b < b1; b++) {
        const float* image = hidden + b * H * W * C;
        const float* g_image = grad + b * H * W * C;
        memset(act_ring, 0, RING_FLOATS(padded_row) * sizeof(float));
        memset(grad_ring, 0, RING_FLOATS(padded_row) * sizeof(float));
        load_gelu(slot(act_ring, y0 - 1, padded_row), NULL, image, y0 - 1, H, W, C, S);
        load_gelu(slot(act_ring, y0, padded_row), slope + (y0 % 2) * W * C, image, y0, H, W, C, S);
        load_copy(slot(grad_ring, y0 - 1, padded_row), g_image, y0 - 1, H, W, C, S);
        load_copy(slot(grad_ring, y0, padded_row), g_image, y0, H, W, C, S);
        for (long y = y0; y < y1; y++) {
            load_gelu(slot(act_ring, y + 1, padded_row), slope + ((y + 1) % 2) * W * C, image, y + 1, H, W, C, S);
            load_copy(slot(grad_ring, y + 1, padded_row), g_image, y + 1, H, W, C, S);
            const float* a_up = slot(act_ring, y - 1, padded_row);
            const float* a_mid = slot(act_ring, y, padded_row);
            const float* a_down = slot(act_ring, y + 1, padded_row);
            const float* g_up = slot(grad_ring, y - 1, padded_row);
            const float* g_mid = slot(grad_ring, y, padded_row);
            const float* g_down = slot(grad_ring, y + 1, padded_row);
            const float* s_row = slope + (y % 2) * W * C;
            float* gh = grad_hidden + (b * H + y) * W * C;
            for (long c = 0; c < C; c += VW) {
                long n = C - c < VW ? C - c : VW;
                vf w[9];
                load_taps(w, taps, Cp, c);
                vf z = vsplat(0.0f), d0 = z, d1 = z, d2 = z, d3 = z, d4 = z, d5 = z, d6 = z, d7 = z, d8 = z, db = z;
                const float *au = a_up + c, *am = a_mid + c, *ad = a_down + c;
                const float *gu = g_up + c, *gm = g_mid + c, *gd = g_down + c;
                for (long x = 0; x < W; x++, au += S, am += S, ad += S, gu += S, gm += S, gd += S) {
                    /* padded column x + 1 is image column x */
                    vf da = w[0] * vload(gd + 2 * S) + w[1] * vload(gd + S) + w[2] * vload(gd) + w[3] * vload(gm + 2 * S)
                            + w[4] * vload(gm + S) + w[5] * vload(gm) + w[6] * vload(gu + 2 * S) + w[7] * vload(gu + S)
                            + w[8] * vload(gu);
                    vstore_n(gh + x * C + c, da * vload(s_row + x * C + c), n);
                    vf gy = vload(gm + S);
                    d0 += gy * vload(au);
                    d1 += gy * vload(au + S);
                    d2 += gy * vload(au + 2 * S);
                    d3 += gy * vload(am);
                    d4 += gy * vload(am + S);
                    d5 += gy * vload(am + 2 * S);
                    d6 += gy * vload(ad);
                    d7 += gy * vload(ad + S);
                    d8 += gy * vload(ad + 2 * S);
                    db += gy;
                }
                vadd_n(grad_weight + c, d0, n);
                vadd_n(grad_weight + C + c, d1, n);
                vadd_n(grad_weight + 2 * C + c, d2, n);
                vadd_n(grad_weight + 3 * C + c, d3, n);
                vadd_n(grad_weight + 4 * C + c, d4, n);
                vadd_n(grad_weight + 5 * C + c, d5, n);
                vadd_n(grad_weight + 6 * C + c, d6, n);
                vadd_n(grad_weight + 7 * C + c, d7, n);
                vadd_n(grad_weight + 8 * C + c, d8, n);
                vadd_n(grad_bias + c, db, n);
            }
        }
    }
done:
    free(act_ring);
    free(grad_ring);
    free(slope);
    free(taps);
    return status;
}

/* Entry points for kernels/native.py `run` (tasks.h). Per-task partial sums go to row task[0] of
 * their buffers. */
OVERLOCK_TASKS(overlock_gelu_dwconv3x3_forward, 5,
               (const float* hidden, const float* weight, const float* bias, float* out, float* squares,
                long squares_stride, long H, long W, long C, const long* tasks, long ntasks, long threads),
               overlock_gelu_dwconv3x3_forward(hidden, weight, bias, out, squares + task[0] * squares_stride, H, W,
                                               C, task[1], task[2], task[3], task[4]))
OVERLOCK_TASKS(overlock_gelu_dwconv3x3_grn_forward, 3,
               (const float* hidden, const float* weight, const float* bias, const float* gamma,
                const float* beta, float* out, long H, long W, long C, double floor, double eps,
                const long* tasks, long ntasks, long threads),
               overlock_gelu_dwconv3x3_grn_forward(hidden, weight, bias, gamma, beta, out, H, W, C, floor, eps,
                                                   task[1], task[2]))
OVERLOCK_TASKS(overlock_gelu_dwconv3x3_backward, 5,
               (const float* hidden, const float* grad, const float* weight, float* grad_hidden,
                float* grad_weight, long weight_stride, float* grad_bias, long bias_stride, long H, long W,
                long C, const long* tasks, long ntasks, long threads),
               overlock_gelu_dwconv3x3_backward(hidden, grad, weight, grad_hidden, grad_weight + task[0] * weight_stride,
                                                grad_bias + task[0] * bias_stride, H, W, C, task[1], task[2],
                                                task[3], task[4]))
