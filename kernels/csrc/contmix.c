/* ContMix's mixing step on the CPU, forward and backward (kernels/cpu.py `contmix_forward`,
 * `contmix_backward`):
 *
 *   p[k]    = softmax over the K x K window of (logits[pos, k] + rpb[head, offset of slot k])
 *   out[pos] = sum_k p[k] * value[neighbour k of pos]
 *
 * with neighbourhood attention's clamped windows (a window slides inwards at a border instead of
 * being padded, so it always holds K*K real neighbours) and the bias of a slot looked up by the
 * offset between the neighbour and the position (ARCHITECTURE.md section 4; kernels/reference.py
 * is the definition).
 * The forward writes each position's softmax peak and the sum of exp(w - peak), from which the
 * caller forms the log-sum-exp the backward rebuilds the probabilities from.
 *
 * Why C. The work per position is tiny (K*K weights, then K*K multiply-adds of a head's c <= 64
 * channels) and irregular at the borders; PyTorch ops (kernels/cpu.py) have to move the K*K slots
 * into dense tile matrices and make several passes over the (HW, K*K) weights. Here each position
 * is one pass: its weights stay in a small buffer, and each neighbour's channels are one or a few
 * vectors.
 *
 * Layout: logits and value are addressed through element strides, so the callers' views need no
 * copy (the forward packs one (batch, head) row of values at a time into a small buffer of its
 * own): logits (B, heads, H, W, K*K) and value (B, heads, H, W, c), each with a unit innermost
 * stride, value's channels readable in whole vectors (a multiple of 16, or padded to one by the
 * caller); bias (heads, H*W, K*K), the relative position bias of every window slot, contiguous;
 * out (B*heads, H*W, c), peak and total (B*heads, H*W), contiguous. A call covers rows [r0, r1) of
 * the B*heads (batch, head) rows. Returns 0, or -1 if its buffer could not be allocated.
 *
 * Logits from queries (logits NULL; kernels/cpu.py `ContMixFromQueries`): a position's logits are
 * then formed where they are used, logits[pos, k] = query[pos] . keys[:, k] (ContMix's queries
 * against its projected region centres, c_q channels), and never written to memory: the (B, heads,
 * H, W, K*K) map was the widest thing ContMix moved (9.7 MiB per XT call: a product wrote it, this
 * kernel read it, the backward formed it again and wrote its gradient for two more products to
 * read). query is addressed through element strides (qb, qh, qy, qx, qj); keys come
 * packed per row, (B*heads, c_q, KP) with KP = K*K rounded up to a multiple of 16, zero padded.
 */
#include "tasks.h"
#include "vectors.h"

/* The packed keys' slot count, K*K rounded up to a multiple of 16 floats whatever this CPU's vector
 * width (16 divides by every VW): kernels/cpu.py packs them so (NATIVE_CHANNEL_MULTIPLE). Rounding to
 * VW instead read every row's keys at the wrong stride where VW < 16 and K*K is not a multiple of
 * 16 (AVX2's 8 floats, K = 7: 56 slots against the 64 packed). */
static inline long packed_slots(long KK) { return (KK + 15) / 16 * 16; }

/* sum_i s[i] * v[i * stride .. + VW) for i < n, in four chains (a multiply-add waits for the one
 * before it): the forward's window row of values weighted, the backward's dp of a window row and
 * (logits from queries) d query from the slot-major keys. */
static inline vf weighted_sum(const float* restrict s, const float* restrict v, long stride, long n) {
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    long i = 0;
    for (; i + 4 <= n; i += 4) {
        a0 += vsplat(s[i]) * vload(v + i * stride);
        a1 += vsplat(s[i + 1]) * vload(v + (i + 1) * stride);
        a2 += vsplat(s[i + 2]) * vload(v + (i + 2) * stride);
        a3 += vsplat(s[i + 3]) * vload(v + (i + 3) * stride);
    }
    for (; i < n; i++) a0 += vsplat(s[i]) * vload(v + i * stride);
    return (a0 + a1) + (a2 + a3);
}

/* The first row (column) of the clamped window of position i on an axis of n >= K. */
static inline long window_start(long i, long K, long n) {
    long s = i - K / 2;
    return s < 0 ? 0 : (s > n - K ? n - K : s);
}

/* z[0 .. KP) = sum_j q[j * qj] * keys[j * KP ..]: one position's logits from its query and the row's
 * packed keys (the padding slots come out 0). Up to four vectors of slots at a time, each its own
 * chain of multiply-adds (one chain waits for each multiply-add before it). */
static void query_logits(const float* restrict q, long qj, const float* restrict keys, long cq, long KP,
                         float* restrict z) {
    for (long v = 0; v < KP; v += 4 * VW) {
        long n = (KP - v) / VW < 4 ? (KP - v) / VW : 4;
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        const float* k = keys + v;
        for (long j = 0; j < cq; j++, k += KP) {
            vf s = vsplat(q[j * qj]);
            a0 += s * vload(k);
            if (n > 1) a1 += s * vload(k + VW);
            if (n > 2) a2 += s * vload(k + 2 * VW);
            if (n > 3) a3 += s * vload(k + 3 * VW);
        }
        vstore(z + v, a0);
        if (n > 1) vstore(z + v + VW, a1);
        if (n > 2) vstore(z + v + 2 * VW, a2);
        if (n > 3) vstore(z + v + 3 * VW, a3);
    }
}

int overlock_contmix_forward(const float* restrict logits, const float* restrict query, const float* restrict keys,
                             const float* restrict bias, const float* restrict value, float* restrict out,
                             float* restrict peak_out, float* restrict total_out, long heads, long H, long W, long c,
                             long K, long cq, long zb, long zh, long zy, long zx, long qb, long qh, long qy, long qx,
                             long qj, long vb, long vh, long vy, long vx, long r0, long r1) {
    long KK = K * K, HW = H * W, full = KK / VW, vectors = (KK + VW - 1) / VW, KP = packed_slots(KK);
    float* weights = zeroed((size_t)KP);
    float* plane = zeroed((size_t)(HW * c));
    float* formed = zeroed((size_t)KP); /* a position's logits formed from its query (logits NULL) */
    if (!weights || !plane || !formed) {
        free(weights);
        free(plane);
        free(formed);
        return -1;
    }
    for (long r = r0; r < r1; r++) {
        long b = r / heads, h = r % heads;
        /* This row's values, packed (H, W, c): the callers' values are usually channel slices of
         * a wider map, whose pixel stride (often a power of two) maps a window's pixels onto few
         * cache sets, so that the window's loads missed L1 (2.5x slower aggregation at XT's shapes). */
        for (long y = 0; y < H; y++)
            for (long x = 0; x < W; x++)
                memcpy(plane + (y * W + x) * c, value + b * vb + h * vh + y * vy + x * vx, (size_t)c * sizeof(float));
        for (long y = 0; y < H; y++) {
            long sy = window_start(y, K, H);
            for (long x = 0; x < W; x++) {
                long sx = window_start(x, K, W), pos = y * W + x;
                const float* z = formed;
                if (logits)
                    z = logits + b * zb + h * zh + y * zy + x * zx;
                else
                    query_logits(query + b * qb + h * qh + y * qy + x * qx, qj, keys + r * cq * KP, cq, KP, formed);
                const float* slot_bias = bias + (h * HW + pos) * KK;
                /* w = logits + bias, and its peak; the last, partial vector's slots past K*K hold w[0] */
                vf top = vsplat(z[0] + slot_bias[0]);
                for (long v = 0; v < full; v++) {
                    vf w = vload(z + v * VW) + vload(slot_bias + v * VW);
                    vstore(weights + v * VW, w);
                    vi above = w > top;
                    top = (vf)((above & (vi)w) | (~above & (vi)top));
                }
                float peak = vmax(top);
                for (long k = full * VW; k < KK; k++) {
                    weights[k] = z[k] + slot_bias[k];
                    peak = weights[k] > peak ? weights[k] : peak;
                }
                for (long k = KK; k < vectors * VW; k++) weights[k] = peak;
                /* exp(w - peak), the slots past K*K zeroed, and their sum */
                vf sums = {0};
                for (long v = 0; v < vectors; v++) {
                    vf e = vexp_nonpositive(vload(weights + v * VW) - peak);
                    vstore(weights + v * VW, e);
                    if (v == vectors - 1) {
                        for (long k = KK; k < vectors * VW; k++) weights[k] = 0.0f;
                        e = vload(weights + v * VW);
                    }
                    sums += e;
                }
                float total = vsum(sums);
                /* the weighted sum of the window's values, whole vectors of channels (value's channels
                 * are padded to a multiple of the vector width by the caller where they are not one) */
                float scale = 1.0f / total;
                const float* window = plane + (sy * W + sx) * c;
                float* o = out + (r * HW + pos) * c;
                for (long c0 = 0; c0 < c; c0 += VW) {
                    vf sum = {0};
                    for (long ky = 0; ky < K; ky++)
                        sum += weighted_sum(weights + ky * K, window + ky * W * c + c0, c, K);
                    vstore_n(o + c0, sum * scale, c - c0 < VW ? c - c0 : VW);
                }
                peak_out[r * HW + pos] = peak;
                total_out[r * HW + pos] = total;
            }
        }
    }
    free(weights);
    free(plane);
    free(formed);
    return 0;
}

/* The backward, for rows [r0, r1) of the B*heads (batch, head) rows:
 *
 *   p[k] = exp(logits[pos, k] + bias[pos, k] - lse[pos])        (the forward's probabilities)
 *   dp[k] = grad[pos] . value[neighbour k]
 *   dlogits[pos, k] = p[k] (dp[k] - D[pos]),  D[pos] = grad[pos] . out[pos]  (given)
 *   dvalue[neighbour k] += p[k] grad[pos]
 *
 * (the bias gradient is the caller's: dlogits summed per head and slot offset). A position is
 * done one window row at a time, as vectors over the row's K neighbours: the values come
 * channel-major, (B*heads, c, P) planes of P >= H*W + VW floats (the caller transposes them), so
 * that the K neighbours of a row and channel are consecutive and dp of a window row is c
 * multiply-adds, not K dot products. grad (unit channel stride) and dvalue ((B*heads, H*W, cv),
 * zeroed) have their channels in whole vectors, cv of them (c rounded up to a multiple of 16; the
 * caller pads grad where c is not one). The bias (heads, H*W, K*K) has a vector of slack at its end.
 * The value gradient is updated one neighbour's channel vector at a time, so that each load reads
 * exactly what an earlier store wrote (a load that overlaps part of an earlier store waits for it
 * to retire: updating it one window row at a time did, 15% slower). Rows belong to one call each.
 *
 * Logits from queries (logits NULL, as in the forward): a position's logits are formed again from
 * its query, and its d logits stay in a buffer, from which the kernel adds
 *   dquery[pos] = keys . dlogits[pos]         ((B*heads, H*W, c_q), written)
 *   dkeys[:, k] += query[pos] dlogits[pos, k]  ((B*heads, c_q, KP), zeroed)
 *   dslots[k] += dlogits[pos, k]              ((B*heads, KP), zeroed: a bias on every slot)
 *   drpb[offset of slot k] += dlogits[pos, k]  ((B*heads, (2K-1)^2 + 16): a vector of slack per row, zeroed)
 * instead of writing dlogits. Returns 0, or -1 if a buffer could not be allocated.
 */
int overlock_contmix_backward(const float* restrict grad, const float* restrict logits, const float* restrict query,
                              const float* restrict keys, const float* restrict bias, const float* restrict lse,
                              const float* restrict dot, const float* restrict value_t, float* restrict dlogits,
                              float* restrict dvalue, float* restrict dquery, float* restrict dkeys,
                              float* restrict dslots, float* restrict drpb, long heads, long H, long W, long c, long cv,
                              long K, long cq, long P, long gb, long gh, long gy, long gx, long zb, long zh, long zy,
                              long zx, long qb, long qh, long qy, long qx, long qj, long r0, long r1) {
    long KK = K * K, HW = H * W, KP = packed_slots(KK), span = 2 * K - 1, cqv = (cq + VW - 1) / VW * VW;
    float* row = zeroed(2 * VW); /* one window row's logits (the map's last ones), then its probabilities */
    float* formed = zeroed((size_t)(KP + VW)); /* a position's logits from its query (logits NULL) */
    float* dformed = zeroed((size_t)(KP + VW)); /* and their gradient; the slots past K*K stay 0 */
    float* keys_t = zeroed((size_t)(KK * cqv + VW)); /* the row's keys slot-major, (K*K, cqv), zero padded
                                                        (never empty: without a query cqv is 0) */
    if (!row || !formed || !dformed || !keys_t) {
        free(row);
        free(formed);
        free(dformed);
        free(keys_t);
        return -1;
    }
    vf lanes; /* 0, 1, 2, ... */
    for (int lane = 0; lane < VW; lane++) lanes[lane] = (float)lane;
    for (long r = r0; r < r1; r++) {
        long b = r / heads, h = r % heads;
        const float* vplane = value_t + r * c * P;
        const float* row_keys = logits ? NULL : keys + r * cq * KP;
        if (row_keys)
            for (long j = 0; j < cq; j++)
                for (long k = 0; k < KK; k++) keys_t[k * cqv + j] = row_keys[j * KP + k];
        for (long y = 0; y < H; y++) {
            long sy = window_start(y, K, H);
            for (long x = 0; x < W; x++) {
                long sx = window_start(x, K, W), pos = y * W + x;
                const float* q = logits ? NULL : query + b * qb + h * qh + y * qy + x * qx;
                const float* z = formed;
                float* dz = dformed;
                if (logits) {
                    z = logits + b * zb + h * zh + y * zy + x * zx;
                    dz = dlogits + (r * HW + pos) * KK;
                } else {
                    query_logits(q, qj, row_keys, cq, KP, formed);
                }
                const float* slot_bias = bias + (h * HW + pos) * KK;
                const float* g = grad + b * gb + h * gh + y * gy + x * gx;
                float top = lse[r * HW + pos], d = dot[r * HW + pos];
                long offset = sy * W + sx;
                for (long ky = 0; ky < K; ky++, offset += W) {
                    for (long kx0 = 0; kx0 < K; kx0 += VW) {
                        long k = ky * K + kx0, n = K - kx0 < VW ? K - kx0 : VW;
                        vi live = lanes < (float)n;
                        vf w;
                        if (k + VW <= KK || !logits) {
                            w = vload(z + k);
                        } else { /* a full load could read past the logits' end */
                            for (long i = 0; i < n; i++) row[VW + i] = z[k + i];
                            w = vload(row + VW);
                        }
                        vf p = (vf)((vi)vexp_nonpositive(w + vload(slot_bias + k) - top) & live);
                        vstore(row, p);
                        vf dp = weighted_sum(g, vplane + offset + kx0, P, c); /* the row's dp, channel by channel */
                        vf dlogit = p * (dp - d);
                        /* lanes past the row land on the next row's slots, written after these */
                        if (k + VW <= KK)
                            vstore(dz + k, dlogit);
                        else
                            vstore_n(dz + k, dlogit, n);
                        /* dvalue[neighbour] += p grad[pos], a neighbour's channels at a time: the same
                         * addresses the neighbouring positions update */
                        float* dv = dvalue + (r * HW + offset + kx0) * cv;
                        for (long kx = 0; kx < n; kx++)
                            for (long c0 = 0; c0 < cv; c0 += VW)
                                vstore(dv + kx * cv + c0, vload(dv + kx * cv + c0) + vsplat(row[kx]) * vload(g + c0));
                    }
                }
                if (logits) continue;
                /* the position's d logits into the query's, the keys', the slot biases' and the table's gradients */
                float* dq = dquery + (r * HW + pos) * cq;
                for (long c0 = 0; c0 < cq; c0 += VW) /* dq = keys . dz, query channels as vectors */
                    vstore_n(dq + c0, weighted_sum(dz, keys_t + c0, cqv, KK), cq - c0 < VW ? cq - c0 : VW);
                float* dk = dkeys + r * cq * KP;
                for (long j = 0; j < cq; j++) {
                    vf s = vsplat(q[j * qj]);
                    for (long v = 0; v < KP; v += VW) vstore(dk + j * KP + v, vload(dk + j * KP + v) + s * vload(dz + v));
                }
                float* ds = dslots + r * KP;
                for (long v = 0; v < KP; v += VW) vstore(ds + v, vload(ds + v) + vload(dz + v));
                /* a window row's slots are consecutive in the table too; lanes past the row add 0
                 * (each row's table has a vector of slack after it: no lane reaches another row's) */
                float* table = drpb + r * (span * span + 16) + (sy - y + K - 1) * span + (sx - x + K - 1);
                for (long ky = 0; ky < K; ky++)
                    for (long kx0 = 0; kx0 < K; kx0 += VW) {
                        vi live = lanes < (float)(K - kx0);
                        float* t = table + ky * span + kx0;
                        vstore(t, vload(t) + (vf)((vi)vload(dz + ky * K + kx0) & live));
                    }
            }
        }
    }
    free(row);
    free(formed);
    free(dformed);
    free(keys_t);
    return 0;
}

/* Entry points for kernels/native.py `run` (tasks.h). */
OVERLOCK_TASKS(overlock_contmix_forward, 3,
               (const float* logits, const float* query, const float* keys, const float* bias, const float* value,
                float* out, float* peak_out, float* total_out, long heads, long H, long W, long c, long K,
                long cq, long zb, long zh, long zy, long zx, long qb, long qh, long qy, long qx, long qj, long vb,
                long vh, long vy, long vx, const long* tasks, long ntasks, long threads),
               overlock_contmix_forward(logits, query, keys, bias, value, out, peak_out, total_out, heads, H, W, c, K,
                                        cq, zb, zh, zy, zx, qb, qh, qy, qx, qj, vb, vh, vy, vx, task[1], task[2]))
OVERLOCK_TASKS(overlock_contmix_backward, 3,
               (const float* grad, const float* logits, const float* query, const float* keys, const float* bias,
                const float* lse, const float* dot, const float* value_t, float* dlogits, float* dvalue,
                float* dquery, float* dkeys, float* dslots, float* drpb, long heads, long H, long W, long c,
                long cv, long K, long cq, long P, long gb, long gh, long gy, long gx, long zb, long zh, long zy,
                long zx, long qb, long qh, long qy, long qx, long qj, const long* tasks, long ntasks, long threads),
               overlock_contmix_backward(grad, logits, query, keys, bias, lse, dot, value_t, dlogits, dvalue, dquery,
                                         dkeys, dslots, drpb, heads, H, W, c, cv, K, cq, P, gb, gh, gy, gx, zb, zh,
                                         zy, zx, qb, qh, qy, qx, qj, task[1], task[2]))
