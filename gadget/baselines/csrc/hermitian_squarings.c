/* Repeated squaring of Hermitian matrices with trace normalisation, in place, for ESPIRiT's per-pixel
 * eigenproblems (gadget/baselines/espirit.py, top_eigenvectors). For each of n complex64 c×c matrices P
 * (row-major, real and imaginary parts interleaved):
 *     `squarings` times:  P <- P / tr(P);  P <- P·P;     then once more  P <- P / tr(P),
 * with tr(P) real (P Hermitian) and clamped below at FLT_MIN, as the PyTorch passes there do.
 * P·P of a Hermitian P is Hermitian: only its upper triangle is summed, (P·P)[i][j] = Σ_k P[i][k] P[k][j],
 * and the lower one is its conjugate. LANES matrices at a time are moved into a planar layout with the
 * matrix index fastest (a short last block is padded with copies of its first matrix), so that each
 * arithmetic operation is one vector operation over LANES matrices and no sum crosses lanes.
 * Loaded by gadget/baselines/espirit.py (built by gadget/mri/native.py, ctypes). Returns 0, or 1 for sizes it
 * does not take (c > MAX_C). */
#include <float.h>
#include <string.h>

#define LANES 8
#define MAX_C 32
typedef float vfloat __attribute__((vector_size(4 * LANES)));

static void square_block(vfloat *re, vfloat *im, vfloat *next_re, vfloat *next_im, int c, int squarings) {
    for (int s = 0; s <= squarings; s++) {
        vfloat trace = (vfloat){0};
        for (int i = 0; i < c; i++) trace += re[i * c + i];
        vfloat scale;
        for (int l = 0; l < LANES; l++) scale[l] = 1.0f / (trace[l] > FLT_MIN ? trace[l] : FLT_MIN);
        for (int e = 0; e < c * c; e++) {
            re[e] *= scale;
            im[e] *= scale;
        }
        if (s == squarings) break;
        for (int i = 0; i < c; i++) {
            for (int j = i; j < c; j++) {
                vfloat sum_re = (vfloat){0}, sum_im = (vfloat){0};
                for (int k = 0; k < c; k++) {
                    vfloat a_re = re[i * c + k], a_im = im[i * c + k], b_re = re[k * c + j], b_im = im[k * c + j];
                    sum_re += a_re * b_re - a_im * b_im;
                    sum_im += a_re * b_im + a_im * b_re;
                }
                next_re[i * c + j] = sum_re;
                next_im[i * c + j] = sum_im;
                next_re[j * c + i] = sum_re;
                next_im[j * c + i] = -sum_im;
            }
        }
        memcpy(re, next_re, sizeof(vfloat) * c * c);
        memcpy(im, next_im, sizeof(vfloat) * c * c);
    }
}

int hermitian_squarings(float *p, long n, long c, long squarings) {
    if (c < 1 || c > MAX_C || n < 0 || squarings < 0) return 1;
    long size = c * c;
    vfloat re[size], im[size], next_re[size], next_im[size]; /* 18 kB of stack at 12 coils, 128 kB at MAX_C */
    for (long start = 0; start < n; start += LANES) {
        long count = n - start < LANES ? n - start : LANES;
        for (long e = 0; e < size; e++) {
            for (long l = 0; l < LANES; l++) {
                const float *value = p + 2 * ((start + (l < count ? l : 0)) * size + e);
                re[e][l] = value[0];
                im[e][l] = value[1];
            }
        }
        square_block(re, im, next_re, next_im, (int)c, (int)squarings);
        for (long e = 0; e < size; e++) {
            for (long l = 0; l < count; l++) {
                float *value = p + 2 * ((start + l) * size + e);
                value[0] = re[e][l];
                value[1] = im[e][l];
            }
        }
    }
    return 0;
}
