// The kernels of batch-1 CPU decode that PyTorch's own ops leave slow. Built on first use by
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
//
// attention_decode, feed_forward_decode, bypass_decode: a whole unit of one decode step (batch 1,
// one token) in one call, from the pending x and the residual to the next residual, fully summed
// in float32. As PyTorch ops a unit is 10-30 dispatches of tiny tensors, each costing more than
// its work: together they were a third of a bf16 step on SmolLM2. Weights and KV cache are all
// bfloat16 or all float32; inside, the activations between the matmuls stay float32 and are
// rounded to the weights' type only where a matmul or the cache reads them.
// Only the headers the kernels use: <torch/extension.h> (the whole C++ frontend) would double the
// first build's time, which a user's first command waits for.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
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

// The same for float32 weights (the float32 runtime's whole-unit kernels; its plain matmuls stay
// on MKL's GEMV, which this matches).
template <int R>
void rows_dot(const float* w, int64_t n, const float* x, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 xk = _mm512_loadu_ps(x + k);
    for (int r = 0; r < R; r++) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * n + k + PREFETCH / 2), _MM_HINT_T0);
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * n + k), xk, acc[r]);
    }
  }
  if (k < n) {
    const __m512 xk = _mm512_loadu_ps(x + k);
    const __mmask16 mask = (__mmask16)((1u << (n - k)) - 1);
    for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w + r * n + k), xk, acc[r]);
  }
  for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

int64_t padded(int64_t n) { return (n + WIDTH - 1) / WIDTH * WIDTH; }

// x in the weights' type T (bfloat16: rounded to nearest even, as x.to(torch.bfloat16) does) and
// zero-padded to whole registers, the form the dot products read.
template <typename T, typename S>
std::vector<T> input_row(const S* x, int64_t n) {
  std::vector<T> row(padded(n), T(0.0f));
  for (int64_t k = 0; k < n; k++) row[k] = T(static_cast<float>(x[k]));
  return row;
}

// sums[row] = W[row] . x for every row, rows split over threads; store(row, sum) consumes each.
template <typename T, typename Store>
void gemv_rows(const T* w, int64_t rows, int64_t n, const T* x, Store store) {
  const int64_t groups = (rows + ROWS - 1) / ROWS;
  at::parallel_for(0, groups, GRAIN, [&](int64_t begin, int64_t end) {
    float sums[ROWS];
    for (int64_t g = begin; g < end; g++) {
      const int64_t row = g * ROWS, count = std::min<int64_t>(ROWS, rows - row);
      if (count == ROWS) {
        rows_dot<ROWS>(w + row * n, n, x, sums);
      } else {
        for (int64_t r = 0; r < count; r++) rows_dot<1>(w + (row + r) * n, n, x, sums + r);
      }
      for (int64_t r = 0; r < count; r++) store(row + r, sums[r]);
    }
  });
}

template <typename T = bf16>
const T* bias_of(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->data_ptr<T>() : nullptr;
}

// Arguments are checked by the Python wrapper: weight [rows, n] and out [rows] bfloat16, x [n]
// float32 or bfloat16 (rounded to bfloat16).
void gemv_out(const at::Tensor& weight, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
              at::Tensor out) {
  const int64_t rows = weight.size(0), n = weight.size(1);
  const auto xc = x.contiguous();  // a strided view is read as its values
  const auto xv = xc.scalar_type() == at::kBFloat16 ? input_row<bf16>(xc.data_ptr<bf16>(), n)
                                                    : input_row<bf16>(xc.data_ptr<float>(), n);
  const bf16* b = bias_of(bias);
  bf16* y = out.data_ptr<bf16>();
  gemv_rows(weight.data_ptr<bf16>(), rows, n, xv.data(),
            [&](int64_t row, float sum) { y[row] = bf16(b ? sum + static_cast<float>(b[row]) : sum); });
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

// One row: h = x + residual (x float32, bfloat16, float16 or absent: then h is the residual itself
// and not written), out = RMSNorm(h) * weight. Returns the row h is in.
const float* add_norm_row(const c10::optional<at::Tensor>& x, int64_t row, const float* residual,
                          const float* weight, float eps, int64_t n, float* h, float* out) {
  const float* src = residual;
  if (x.has_value()) {
    const auto add = [&](const auto* xs) {
      for (int64_t k = 0; k < n; k++) h[k] = static_cast<float>(xs[row * n + k]) + residual[k];
    };
    const auto type = x->scalar_type();
    type == at::kBFloat16 ? add(x->data_ptr<bf16>()) : type == at::kHalf ? add(x->data_ptr<at::Half>())
                                                                          : add(x->data_ptr<float>());
    src = h;
  }
  const float scale = 1.0f / std::sqrt(sum_of_squares(src, n) / static_cast<float>(n) + eps);
  for (int64_t k = 0; k < n; k++) out[k] = weight[k] * (src[k] * scale);
  return src;
}

// Arguments are checked by the Python wrapper: residual, h and normed [rows, n] float32 and
// contiguous, x likewise (float32, or bfloat16 as a bf16 decode's matmuls give it) or absent
// (then h is residual itself), weight [n] float32.
void add_rms_norm_out(const c10::optional<at::Tensor>& x, const at::Tensor& residual, const at::Tensor& weight,
                      double eps, at::Tensor h, at::Tensor normed) {
  const int64_t n = weight.size(0), rows = residual.numel() / n;
  const float* res = residual.data_ptr<float>();
  float* hs = h.data_ptr<float>();
  float* out = normed.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {  // rows of a prompt split over threads
    for (int64_t row = begin; row < end; row++) {
      add_norm_row(x, row, res + row * n, weight.data_ptr<float>(), static_cast<float>(eps), n, hs + row * n,
                   out + row * n);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// whole units of a batch-1 decode step
// ---------------------------------------------------------------------------------------------
void check_stream(const c10::optional<at::Tensor>& x, const at::Tensor& residual, const at::Tensor& norm_weight) {
  const int64_t n = residual.size(-1);
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous() && residual.numel() == n,
              "residual must be one contiguous float32 row");
  TORCH_CHECK(!x.has_value() || (x->numel() == n && x->is_contiguous() &&
                                 (x->scalar_type() == at::kFloat || x->scalar_type() == at::kBFloat16 ||
                                  x->scalar_type() == at::kHalf)),
              "x must be one contiguous float32, bfloat16 or float16 row like residual");
  TORCH_CHECK(norm_weight.scalar_type() == at::kFloat && norm_weight.numel() == n, "norm weight must be [hidden] float32");
}

void check_weight(const at::Tensor& w, int64_t cols, const c10::optional<at::Tensor>& bias, at::ScalarType type,
                  const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) == cols && w.scalar_type() == type && w.is_contiguous(), name,
              " must be a contiguous ", c10::toString(type), " [rows, ", cols, "] matrix");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == w.size(0) && bias->scalar_type() == type && bias->is_contiguous()),
              name, "'s bias must be ", c10::toString(type), " [", w.size(0), "]");
}

// The stream entering a unit: (h = x + residual, as a row pointer; the tensor holding it; normed row).
struct Opened {
  at::Tensor h;
  const float* row;
  std::vector<float> normed;
};

Opened open_unit(const c10::optional<at::Tensor>& x, const at::Tensor& residual, const at::Tensor& norm_weight,
                 double eps) {
  const int64_t n = residual.size(-1);
  Opened o{x.has_value() ? at::empty_like(residual) : residual, nullptr, std::vector<float>(n)};
  o.row = add_norm_row(x, 0, residual.data_ptr<float>(), norm_weight.data_ptr<float>(), static_cast<float>(eps), n,
                       o.h.data_ptr<float>(), o.normed.data());
  return o;
}

// out = h + W x (+ b), float32: a unit's last matmul with the residual add in its epilogue.
template <typename T>
at::Tensor add_gemv(const Opened& o, const at::Tensor& residual, const at::Tensor& w,
                    const c10::optional<at::Tensor>& bias, const T* x) {
  auto out = at::empty_like(residual);
  float* y = out.data_ptr<float>();
  const T* b = bias_of<T>(bias);
  const float* h = o.row;
  gemv_rows(w.data_ptr<T>(), w.size(0), w.size(1), x,
            [&](int64_t row, float sum) { y[row] = h[row] + (b ? sum + static_cast<float>(b[row]) : sum); });
  return out;
}

inline __mmask16 lanes(int64_t remaining) {
  return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1);
}

// 16 (or, under a mask, fewer) values as float32 lanes.
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const bf16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

constexpr int64_t MAX_GROUP = 16;  // query heads served by one pass over a KV head's cache

// e^x in 16 lanes, for the softmax's x <= 0: 2^n * e^y with n = round(x / ln 2) and |y| <= ln 2 / 2,
// e^y by its degree-6 Taylor polynomial (relative error ~1e-7, float32's own rounding). The
// scalar std::exp was most of a long cache's attention time.
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.0f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 y = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 e = _mm512_set1_ps(1.0f / 720.0f);
  for (const float c : {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    e = _mm512_fmadd_ps(e, y, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(e, n);
}

// One query token over a layer's cache: for each of the n_head query heads (head h reads KV head
// h / G), softmax(q . k_j / sqrt(dim)) over the first `len` cached positions, times v; float32
// sums, y rounded to T. The G query heads of a KV head are served together, so its cache is read
// once, not G times. Short caches run on one thread (a call is a few microseconds; PyTorch's SDPA
// costs ~40 here); long ones split the KV heads over threads.
template <typename T>
void attend(const float* q, const T* k_cache, const T* v_cache, int64_t n_head, int64_t n_kv, int64_t max_seq,
            int64_t dim, int64_t len, T* y) {
  const int64_t group = n_head / n_kv, blocks = (group + MAX_GROUP - 1) / MAX_GROUP, tasks = n_kv * blocks;
  const int64_t stride = (dim + 15) / 16 * 16;  // an accumulator row: whole registers
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  at::parallel_for(0, tasks, len >= 256 ? 1 : tasks, [&](int64_t begin, int64_t end) {
    std::vector<float> p, acc;
    for (int64_t task = begin; task < end; task++) {
      const int64_t kv = task / blocks, first = kv * group + (task % blocks) * MAX_GROUP;
      const int64_t heads = std::min(MAX_GROUP, kv * group + group - first);
      const float* qs = q + first * dim;
      const T* k = k_cache + kv * max_seq * dim;
      const T* v = v_cache + kv * max_seq * dim;
      p.assign(heads * len, 0.0f);
      for (int64_t j = 0; j < len; j++) {  // scores: each cached key read once for all the heads
        __m512 dot[MAX_GROUP];
        for (int64_t g = 0; g < heads; g++) dot[g] = _mm512_setzero_ps();
        for (int64_t c = 0; c < dim; c += 16) {
          const __mmask16 mask = lanes(dim - c);
          const __m512 key = load16(k + j * dim + c, mask);
          for (int64_t g = 0; g < heads; g++) {
            dot[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, qs + g * dim + c), key, dot[g]);
          }
        }
        for (int64_t g = 0; g < heads; g++) p[g * len + j] = _mm512_reduce_add_ps(dot[g]) * scale;
      }
      float total[MAX_GROUP];
      for (int64_t g = 0; g < heads; g++) {  // softmax, unnormalised: divided out at the end
        float* row = p.data() + g * len;
        const __m512 top = _mm512_set1_ps(*std::max_element(row, row + len));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; j += 16) {
          const __mmask16 mask = lanes(len - j);
          const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + j), top));
          _mm512_mask_storeu_ps(row + j, mask, e);
          sum = _mm512_mask_add_ps(sum, mask, sum, e);
        }
        total[g] = _mm512_reduce_add_ps(sum);
      }
      acc.assign(heads * stride, 0.0f);
      for (int64_t j = 0; j < len; j++) {  // values: each cached value read once for all the heads
        for (int64_t c = 0; c < dim; c += 16) {
          const __m512 value = load16(v + j * dim + c, lanes(dim - c));
          for (int64_t g = 0; g < heads; g++) {
            float* a = acc.data() + g * stride + c;
            _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[g * len + j]), value, _mm512_loadu_ps(a)));
          }
        }
      }
      for (int64_t g = 0; g < heads; g++) {
        for (int64_t i = 0; i < dim; i++) y[(first + g) * dim + i] = T(acc[g * stride + i] / total[g]);
      }
    }
  });
}

// Pre-norm grouped-query attention for the token at cache position `pos`: q/k/v projection, RoPE
// (Hugging Face's rotate_half convention, from the [max_seq, head_dim / 2] float32 tables), k and
// v written into the layer's cache [1, n_kv, max_seq, head_dim], attention over the cache's first
// pos + 1 positions (`attend`), output projection and residual add. Weights and cache are all
// bfloat16 or all float32.
at::Tensor attention_decode(const c10::optional<at::Tensor>& x, const at::Tensor& residual,
                            const at::Tensor& norm_weight, double eps, const at::Tensor& wqkv,
                            const c10::optional<at::Tensor>& bqkv, const at::Tensor& wo,
                            const c10::optional<at::Tensor>& bo, const at::Tensor& cos,
                            const at::Tensor& sin, int64_t pos, at::Tensor k_cache, at::Tensor v_cache,
                            int64_t n_head) {
  check_stream(x, residual, norm_weight);
  const auto type = wqkv.scalar_type();
  TORCH_CHECK(type == at::kBFloat16 || type == at::kFloat, "wqkv must be bfloat16 or float32");
  const int64_t n = residual.size(-1);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == 1 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == type && v_cache.scalar_type() == type,
              "k_cache and v_cache must be contiguous [1, n_kv, max_seq, head_dim] in the weights' dtype");
  const int64_t n_kv = k_cache.size(1), max_seq = k_cache.size(2), dim = k_cache.size(3);
  TORCH_CHECK(n_head % n_kv == 0 && dim % 2 == 0, "n_head must be a multiple of n_kv and head_dim even");
  TORCH_CHECK(0 <= pos && pos < max_seq && pos < cos.size(0), "position ", pos, " is outside the cache");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(1) == dim / 2 && sin.sizes() == cos.sizes(),
              "cos and sin must be contiguous float32 [max_seq, head_dim / 2] tables");
  check_weight(wqkv, n, bqkv, type, "wqkv");
  TORCH_CHECK(wqkv.size(0) == (n_head + 2 * n_kv) * dim, "wqkv must have (n_head + 2 n_kv) * head_dim rows");
  check_weight(wo, n_head * dim, bo, type, "wo");
  TORCH_CHECK(wo.size(0) == n, "wo must have hidden rows");
  // The weights' type T: the KV cache and the activations between the matmuls are in it too.
  const auto run = [&](auto zero) -> at::Tensor {
    using T = decltype(zero);
    const int64_t half = dim / 2, heads = n_head + 2 * n_kv;
    Opened o = open_unit(x, residual, norm_weight, eps);
    std::vector<float> qkv(heads * dim);
    const T* b = bias_of<T>(bqkv);
    const auto normed = input_row<T>(o.normed.data(), n);
    gemv_rows(wqkv.data_ptr<T>(), heads * dim, n, normed.data(),
              [&](int64_t row, float sum) { qkv[row] = b ? sum + static_cast<float>(b[row]) : sum; });
    const float* c = cos.data_ptr<float>() + pos * half;
    const float* s = sin.data_ptr<float>() + pos * half;
    for (int64_t head = 0; head < n_head + n_kv; head++) {  // q and k: rotate_half RoPE
      float* v = qkv.data() + head * dim;
      for (int64_t i = 0; i < half; i++) {
        const float a = v[i], z = v[i + half];
        v[i] = a * c[i] - z * s[i];
        v[i + half] = z * c[i] + a * s[i];
      }
    }
    T* kc = k_cache.data_ptr<T>();
    T* vc = v_cache.data_ptr<T>();
    for (int64_t head = 0; head < n_kv; head++) {
      const float* k = qkv.data() + (n_head + head) * dim;
      const float* v = qkv.data() + (n_head + n_kv + head) * dim;
      T* kd = kc + (head * max_seq + pos) * dim;
      T* vd = vc + (head * max_seq + pos) * dim;
      for (int64_t i = 0; i < dim; i++) {
        kd[i] = T(k[i]);
        vd[i] = T(v[i]);
      }
    }
    for (int64_t i = 0; i < n_head * dim; i++) qkv[i] = static_cast<float>(T(qkv[i]));  // q as the cache's type
    std::vector<T> y(padded(n_head * dim), T(0.0f));
    attend(qkv.data(), kc, vc, n_head, n_kv, max_seq, dim, pos + 1, y.data());
    return add_gemv<T>(o, residual, wo, bo, y.data());
  };
  return type == at::kFloat ? run(0.0f) : run(bf16(0.0f));
}

// Pre-norm SwiGLU FeedForward: w13 = [gate; up] fused, act = silu(gate) * up in float32, then
// down projection and residual add. Weights all bfloat16 or all float32.
at::Tensor feed_forward_decode(const c10::optional<at::Tensor>& x, const at::Tensor& residual,
                               const at::Tensor& norm_weight, double eps, const at::Tensor& w13,
                               const at::Tensor& w2) {
  check_stream(x, residual, norm_weight);
  const auto type = w13.scalar_type();
  TORCH_CHECK(type == at::kBFloat16 || type == at::kFloat, "w13 must be a contiguous bfloat16 or float32 matrix");
  const int64_t n = residual.size(-1), f = w13.size(0) / 2;
  check_weight(w13, n, c10::nullopt, type, "w13");
  check_weight(w2, f, c10::nullopt, type, "w2");
  TORCH_CHECK(w13.size(0) == 2 * f && w2.size(0) == n, "w13 must be [2 * intermediate, hidden], w2 [hidden, intermediate]");
  const auto run = [&](auto zero) -> at::Tensor {
    using T = decltype(zero);
    Opened o = open_unit(x, residual, norm_weight, eps);
    std::vector<float> gate_up(2 * f);
    const auto normed = input_row<T>(o.normed.data(), n);
    gemv_rows(w13.data_ptr<T>(), 2 * f, n, normed.data(), [&](int64_t row, float sum) { gate_up[row] = sum; });
    std::vector<T> act(padded(f), T(0.0f));
    for (int64_t i = 0; i < f; i++) {
      const float g = gate_up[i];
      act[i] = T(g / (1.0f + std::exp(-g)) * gate_up[f + i]);
    }
    return add_gemv<T>(o, residual, w2, c10::nullopt, act.data());
  };
  return type == at::kFloat ? run(0.0f) : run(bf16(0.0f));
}

// A removed unit's fitted bypass, h + (RMSNorm(h) @ down) @ up + bias, float32 throughout (its
// matrices are small: rank x hidden).
at::Tensor bypass_decode(const c10::optional<at::Tensor>& x, const at::Tensor& residual,
                         const at::Tensor& norm_weight, double eps, const at::Tensor& down,
                         const at::Tensor& up, const at::Tensor& bias) {
  check_stream(x, residual, norm_weight);
  const int64_t n = residual.size(-1), rank = down.size(1);
  TORCH_CHECK(down.dim() == 2 && down.size(0) == n && up.dim() == 2 && up.size(0) == rank && up.size(1) == n &&
                  bias.numel() == n && down.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat && down.is_contiguous() && up.is_contiguous() && bias.is_contiguous(),
              "down [hidden, rank], up [rank, hidden] and bias [hidden] must be contiguous float32");
  Opened o = open_unit(x, residual, norm_weight, eps);
  std::vector<float> z(rank, 0.0f);
  const float* d = down.data_ptr<float>();
  for (int64_t i = 0; i < n; i++) {
    const float a = o.normed[i];
    const float* row = d + i * rank;
    for (int64_t j = 0; j < rank; j++) z[j] += a * row[j];
  }
  auto out = at::empty_like(residual);
  float* y = out.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  std::vector<float> acc(b, b + n);
  const float* u = up.data_ptr<float>();
  for (int64_t j = 0; j < rank; j++) {
    const float a = z[j];
    const float* row = u + j * n;
    for (int64_t k = 0; k < n; k++) acc[k] += a * row[k];
  }
  for (int64_t k = 0; k < n; k++) y[k] = o.row[k] + acc[k];
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_out", &gemv_out, "out = weight @ x (+ bias), one row, bfloat16 weight");
  m.def("add_rms_norm_out", &add_rms_norm_out, "h = x + residual; normed = RMSNorm(h) * weight, float32 rows");
  m.def("attention_decode", &attention_decode, "one decode step of a pre-norm GQA attention unit, batch 1");
  m.def("feed_forward_decode", &feed_forward_decode, "one decode step of a pre-norm SwiGLU unit, batch 1");
  m.def("bypass_decode", &bypass_decode, "one decode step of a fitted bypass, batch 1");
}
