// The two kernels of batch-1 CPU decode that PyTorch's own ops leave slow. Built on first use by
// subfit/runtime/cpu_kernels.py.
//
// gemv_out: y = W x (+ b) for one row of activations, bfloat16 weights: the matmul of a decode step.
// A decode step is a chain of matrix-vector products over weights that do not fit in cache, so
// its speed is the rate at which one core streams weights. Four rows are read side by side (four
// independent streams in flight, each row's sums in its own AVX-512 register, AVX512-BF16 dot
// products summing in float32) with a software prefetch ahead of them; a call costs ~5 us.
//
// add_rms_norm_out: h = x + residual, normed = RMSNorm(h) * weight on the float32 residual stream
// (x float32, or the bfloat16 output of a bf16 decode's matmul),
// in one pass per row: the norm that opens every unit. As PyTorch ops it is eight dispatches
// (F.rms_norm's mean, pow, rsqrt, casts ... and the add), ~30 us per call with the caches cold
// from the weights streamed before it; here it is one call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

using bf16 = at::BFloat16;
constexpr int ROWS = 4;              // rows per group: independent weight streams per core
constexpr int64_t WIDTH = 32;        // bf16 lanes per AVX-512 register
constexpr int64_t PREFETCH = 512;    // elements ahead of the loads (1 KiB)
constexpr int64_t GRAIN = 16;        // row groups per thread chunk, at least

template <int R>
void rows_dot(const bf16* w, int64_t n, const bf16* x, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + WIDTH <= n; k += WIDTH) {
    const __m512bh xk = (__m512bh)_mm512_loadu_si512(x + k);
    for (int r = 0; r < R; r++) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * n + k + PREFETCH), _MM_HINT_T0);
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * n + k), xk);
    }
  }
  if (k < n) {  // x is zero-padded; the weight's tail is read under a mask
    const __m512bh xk = (__m512bh)_mm512_loadu_si512(x + k);
    const __mmask32 mask = (__mmask32)((1ull << (n - k)) - 1);
    for (int r = 0; r < R; r++) {
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * n + k), xk);
    }
  }
  for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// Arguments are checked by the Python wrapper: weight [rows, n] and out [rows] bfloat16, x [n]
// float32 or bfloat16 (rounded to bfloat16 to nearest even, as x.to(torch.bfloat16) does).
void gemv_out(const torch::Tensor& weight, const torch::Tensor& x, const c10::optional<torch::Tensor>& bias,
              torch::Tensor out) {
  const int64_t rows = weight.size(0), n = weight.size(1);
  std::vector<bf16> xv((n + WIDTH - 1) / WIDTH * WIDTH, bf16(0.0f));
  const auto xb = x.to(torch::kBFloat16).contiguous();
  std::copy(xb.data_ptr<bf16>(), xb.data_ptr<bf16>() + n, xv.begin());
  const bf16* w = weight.data_ptr<bf16>();
  const bf16* b = bias.has_value() ? bias->data_ptr<bf16>() : nullptr;
  bf16* y = out.data_ptr<bf16>();
  const int64_t groups = (rows + ROWS - 1) / ROWS;
  at::parallel_for(0, groups, GRAIN, [&](int64_t begin, int64_t end) {
    float sums[ROWS];
    for (int64_t g = begin; g < end; g++) {
      const int64_t row = g * ROWS, count = std::min<int64_t>(ROWS, rows - row);
      if (count == ROWS) {
        rows_dot<ROWS>(w + row * n, n, xv.data(), sums);
      } else {
        for (int64_t r = 0; r < count; r++) rows_dot<1>(w + (row + r) * n, n, xv.data(), sums + r);
      }
      for (int64_t r = 0; r < count; r++) y[row + r] = bf16(b ? sums[r] + static_cast<float>(b[row + r]) : sums[r]);
    }
  });
}

inline float sum_of_squares(const float* h, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 v = _mm512_loadu_ps(h + k);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  if (k < n) {
    const __m512 v = _mm512_maskz_loadu_ps((__mmask16)((1u << (n - k)) - 1), h + k);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <typename T>
void add_rows(const T* x, const float* residual, float* h, int64_t n) {
  for (int64_t k = 0; k < n; k++) h[k] = static_cast<float>(x[k]) + residual[k];
}

// Arguments are checked by the Python wrapper: residual, h and normed [rows, n] float32 and
// contiguous, x likewise (float32, or bfloat16 as a bf16 decode's matmuls give it) or absent
// (then h is residual itself), weight [n] float32.
void add_rms_norm_out(const c10::optional<torch::Tensor>& x, const torch::Tensor& residual, const torch::Tensor& weight,
                      double eps, torch::Tensor h, torch::Tensor normed) {
  const int64_t n = weight.size(0), rows = residual.numel() / n;
  const bool has_x = x.has_value(), bf16_x = has_x && x->scalar_type() == at::kBFloat16;
  const float* res = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* hs = h.data_ptr<float>();
  float* out = normed.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {  // rows of a prompt split over threads
    for (int64_t row = begin; row < end; row++) {
      float* hr = hs + row * n;
      if (bf16_x) {
        add_rows(x->data_ptr<bf16>() + row * n, res + row * n, hr, n);
      } else if (has_x) {
        add_rows(x->data_ptr<float>() + row * n, res + row * n, hr, n);
      }
      const float* src = has_x ? hr : res + row * n;
      const float scale = 1.0f / std::sqrt(sum_of_squares(src, n) / static_cast<float>(n) + static_cast<float>(eps));
      float* o = out + row * n;
      for (int64_t k = 0; k < n; k++) o[k] = w[k] * (src[k] * scale);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_out", &gemv_out, "out = weight @ x (+ bias), one row, bfloat16 weight");
  m.def("add_rms_norm_out", &add_rms_norm_out, "h = x + residual; normed = RMSNorm(h) * weight, float32 rows");
}
