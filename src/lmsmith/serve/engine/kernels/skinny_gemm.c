/* y = x @ W^T (+ bias) for few rows of x, fp32, AVX-512 + OpenMP.

   A decode step multiplies one row per running sequence by every weight matrix, so the whole cost is
   streaming the weights from memory once. BLAS kernels are tuned for large M and, at 4-16 rows, run at
   about a third of peak FMA throughput, well below memory bandwidth. Here W is pre-arranged in panels of
   32 output columns (panel[k][0..31] = W[p*32 .. p*32+31][k], zero-padded past N), so a panel is one
   sequential stream; for each k, two 64-byte weight loads feed 2 x rows FMAs with x[row][k] broadcast,
   accumulating up to 8 rows x 32 columns in 16 registers. More rows are taken 8 at a time over the same
   panel (then read from L2). Panels are split across OpenMP threads.

   The Python side (skinny.py) arranges the panels with torch, compiles this file once per machine and
   calls it through ctypes (which releases the GIL). */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#define PANEL 32
#define PREFETCH_AHEAD 32 /* k steps of one panel: 32 x 128 bytes */

static inline __attribute__((always_inline)) void panel_block(
    const float *x, int64_t k, const int rows, const float *panel, float *y, int64_t ldy,
    int64_t cols_left, const float *bias)
{
    __m512 acc0[8], acc1[8];
    for (int r = 0; r < rows; ++r) {
        acc0[r] = _mm512_setzero_ps();
        acc1[r] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < k; ++i) {
        /* 4 KiB ahead: measured best of 0-8 KiB; a prefetch past the end is harmless (it never faults). */
        _mm_prefetch((const char *)(panel + (i + PREFETCH_AHEAD) * PANEL), _MM_HINT_T0);
        _mm_prefetch((const char *)(panel + (i + PREFETCH_AHEAD) * PANEL + 16), _MM_HINT_T0);
        const __m512 w0 = _mm512_loadu_ps(panel + i * PANEL);
        const __m512 w1 = _mm512_loadu_ps(panel + i * PANEL + 16);
        for (int r = 0; r < rows; ++r) {
            const __m512 xv = _mm512_set1_ps(x[r * k + i]);
            acc0[r] = _mm512_fmadd_ps(xv, w0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(xv, w1, acc1[r]);
        }
    }
    const __mmask16 mask0 = cols_left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols_left) - 1u);
    const __mmask16 mask1 = cols_left >= 32 ? (__mmask16)0xFFFF
                          : cols_left <= 16 ? (__mmask16)0 : (__mmask16)((1u << (cols_left - 16)) - 1u);
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (bias != NULL) {
        b0 = _mm512_maskz_loadu_ps(mask0, bias);
        b1 = _mm512_maskz_loadu_ps(mask1, bias + 16);
    }
    for (int r = 0; r < rows; ++r) {
        _mm512_mask_storeu_ps(y + r * ldy, mask0, _mm512_add_ps(acc0[r], b0));
        _mm512_mask_storeu_ps(y + r * ldy + 16, mask1, _mm512_add_ps(acc1[r], b1));
    }
}

/* x [m, k] row-major; packed [ceil(n/32), k, 32]; bias [n] or NULL; y [m, n] row-major. */
void skinny_linear(const float *x, int64_t m, int64_t k, const float *packed, int64_t n,
                   const float *bias, float *y, int threads)
{
    const int64_t panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < panels; ++p) {
        const float *panel = packed + p * k * PANEL;
        const float *panel_bias = bias != NULL ? bias + p * PANEL : NULL;
        const int64_t cols_left = n - p * PANEL;
        for (int64_t r0 = 0; r0 < m; r0 += 8) {
            const int64_t rows = m - r0 < 8 ? m - r0 : 8;
            const float *xs = x + r0 * k;
            float *ys = y + r0 * n + p * PANEL;
            switch (rows) {
            case 1: panel_block(xs, k, 1, panel, ys, n, cols_left, panel_bias); break;
            case 2: panel_block(xs, k, 2, panel, ys, n, cols_left, panel_bias); break;
            case 3: panel_block(xs, k, 3, panel, ys, n, cols_left, panel_bias); break;
            case 4: panel_block(xs, k, 4, panel, ys, n, cols_left, panel_bias); break;
            case 5: panel_block(xs, k, 5, panel, ys, n, cols_left, panel_bias); break;
            case 6: panel_block(xs, k, 6, panel, ys, n, cols_left, panel_bias); break;
            case 7: panel_block(xs, k, 7, panel, ys, n, cols_left, panel_bias); break;
            default: panel_block(xs, k, 8, panel, ys, n, cols_left, panel_bias); break;
            }
        }
    }
}
