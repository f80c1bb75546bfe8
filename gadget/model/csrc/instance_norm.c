/* Instance norm (no affine parameters, biased variance) followed by a leaky ReLU, in place, for float32
 * activations in channels-last memory: for each image and channel c,
 *     y = (x - mean_c) / sqrt(var_c + eps),   out = y > 0 ? y : slope * y.
 * Loaded by gadget/model/fused_norm.py (built by gadget/mri/native.py, ctypes); PyTorch's eager passes compute
 * the same function.
 *
 * Memory layout of one image: pixels × channels floats, channel fastest. A run of g pixels, g the smallest
 * count with g * channels a multiple of 8, is one "row" of `period` = g * channels floats: every row holds
 * each channel at the same offsets, so per-offset sums over rows vectorise, and folding the `period` offsets
 * onto their channel (offset % channels) gives the channel sums. The statistics take two reading passes
 * (the mean, then the squares of the centred values: no cancellation); a third pass writes the result.
 * Sums run in float within blocks of BLOCK_ROWS rows and in double across blocks. */
#include <math.h>
#include <stddef.h>
#include <string.h>

typedef float vfloat __attribute__((vector_size(32), aligned(4), may_alias));
typedef int vint __attribute__((vector_size(32), aligned(4), may_alias));

#define LANES 8
#define MAX_VECTORS 256 /* rows of at most 2048 floats */
#define BLOCK_ROWS 64

/* out[k] = sum over rows of (x[k] - shift[k]) (squared when `square`), k < LANES * vectors. */
static void offset_sums(const vfloat *rows, size_t count, int vectors, const vfloat *shift, int square,
                        double *out) {
    vfloat partial[MAX_VECTORS];
    for (int k = 0; k < LANES * vectors; k++) out[k] = 0.0;
    for (size_t start = 0; start < count; start += BLOCK_ROWS) {
        size_t end = start + BLOCK_ROWS < count ? start + BLOCK_ROWS : count;
        for (int v = 0; v < vectors; v++) partial[v] = (vfloat){0};
        for (size_t i = start; i < end; i++) {
            const vfloat *row = rows + i * (size_t)vectors;
            if (square) {
                for (int v = 0; v < vectors; v++) {
                    vfloat d = row[v] - shift[v];
                    partial[v] += d * d;
                }
            } else {
                for (int v = 0; v < vectors; v++) partial[v] += row[v];
            }
        }
        for (int v = 0; v < vectors; v++)
            for (int lane = 0; lane < LANES; lane++) out[LANES * v + lane] += partial[v][lane];
    }
}

/* Per-channel means of `per_offset` sums over `pixels` pixels, spread back onto the offsets of a row. */
static void channel_means(const double *per_offset, int period, long channels, long pixels, double *channel,
                          double *mean) {
    for (long c = 0; c < channels; c++) channel[c] = 0.0;
    for (int k = 0; k < period; k++) channel[k % channels] += per_offset[k];
    for (int k = 0; k < period; k++) mean[k] = channel[k % channels] / (double)pixels;
}

/* x: `batch` images of `pixels` × `channels` floats. Returns 0, or 1 (nothing written) where the layout does
 * not fit the row scheme (pixels not a multiple of g, or rows longer than MAX_VECTORS vectors). */
int instance_norm_leaky_relu(float *x, long batch, long pixels, long channels, double eps, double slope) {
    if (batch < 0 || pixels < 1 || channels < 1) return 1;
    long g = 1;
    while ((g * channels) % LANES) g++;
    long period = g * channels;
    if (period > LANES * MAX_VECTORS || pixels % g) return 1;
    int vectors = (int)(period / LANES);
    size_t count = (size_t)(pixels / g);
    vfloat zero[MAX_VECTORS], mean[MAX_VECTORS], scale[MAX_VECTORS];
    double sums[LANES * MAX_VECTORS], channel[LANES * MAX_VECTORS], stat[LANES * MAX_VECTORS];
    memset(zero, 0, sizeof zero);
    const vfloat leak = (vfloat){0} + (float)slope;
    for (long b = 0; b < batch; b++) {
        vfloat *rows = (vfloat *)(x + (size_t)b * (size_t)pixels * (size_t)channels);
        offset_sums(rows, count, vectors, zero, 0, sums);
        channel_means(sums, (int)period, channels, pixels, channel, stat);
        for (int k = 0; k < period; k++) mean[k / LANES][k % LANES] = (float)stat[k];
        offset_sums(rows, count, vectors, mean, 1, sums);
        channel_means(sums, (int)period, channels, pixels, channel, stat);
        for (int k = 0; k < period; k++) scale[k / LANES][k % LANES] = (float)(1.0 / sqrt(stat[k] + eps));
        for (size_t i = 0; i < count; i++) {
            vfloat *row = rows + i * (size_t)vectors;
            for (int v = 0; v < vectors; v++) {
                vfloat y = (row[v] - mean[v]) * scale[v];
                vint positive = y > 0;
                row[v] = (vfloat)((positive & (vint)y) | (~positive & (vint)(y * leak)));
            }
        }
    }
    return 0;
}
