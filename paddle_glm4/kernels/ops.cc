// The Paddle operators: glm4_linear_bf16, glm4_linear_int8, glm4_linear_int4, glm4_attention, the elementwise
// ones (glm4_swiglu, glm4_rms_norm, glm4_add_rms_norm, glm4_split_rotary, glm4_argmax_logsumexp) and
// glm4_kernel_path. Inputs are
// checked here, then glm4::linear, glm4::attention or elementwise.cc does the work. The only file that includes Paddle's headers (they
// take ~40 s to compile; the kernels, a few).
#include "paddle/extension.h"

#include "attention.h"
#include "common.h"
#include "elementwise.h"

namespace {

std::vector<std::vector<int64_t>> linear_shape(const std::vector<int64_t>& x_shape, int64_t n) {
  std::vector<int64_t> out(x_shape);
  PD_CHECK(!out.empty(), "glm4 linear: x must have at least one dimension");
  out.back() = n;
  return {out};
}

int checked_isa(const std::string& attr) {
  const std::string cap = glm4::requested_isa(attr);
  PD_CHECK(cap == "auto" || glm4::isa_from_name(cap) >= 0, "glm4 linear: unknown kernel path '", cap,
           "' (op attribute or GLM4_KERNELS_ISA): expected auto, scalar, avx2, avx512vnni or avx512bf16");
  return glm4::resolve_isa(cap);
}

std::vector<paddle::Tensor> forward(const paddle::Tensor& x, const glm4::Weights& w,
                                    const paddle::optional<paddle::Tensor>& bias, bool int_weights,
                                    const std::string& act_name, const std::string& isa_name, int threads,
                                    glm4::Planner planner) {
  PD_CHECK(x.is_cpu(), "glm4 linear kernels run on CPU only");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32, "glm4 linear: x must be float32");
  const auto& shape = x.shape();
  PD_CHECK(!shape.empty() && shape.back() == w.K, "glm4 linear: x's last dimension (",
           shape.empty() ? 0 : shape.back(), ") must equal the weight's input features (", w.K, ")");
  const float* bias_data = nullptr;
  if (bias) {
    PD_CHECK(bias->dtype() == paddle::DataType::FLOAT32 && bias->numel() == w.N,
             "glm4 linear: bias must be float32 [", w.N, "]");
    bias_data = bias->data<float>();
  }
  const int isa = checked_isa(isa_name);
  int act = glm4::kF32;
  if (act_name != "auto") {
    act = glm4::act_from_name(act_name);
    PD_CHECK(act >= 0, "glm4 linear: unknown activation_dtype '", act_name,
             "': expected auto, float32, bfloat16 or int8");
    PD_CHECK(act != glm4::kI8 || int_weights, "glm4 linear: activation_dtype 'int8' needs int8 or int4 weights");
  }
  auto y = paddle::empty(linear_shape(shape, w.N)[0], paddle::DataType::FLOAT32, x.place());
  const int64_t M = w.K ? x.numel() / w.K : 0;
  if (M == 0 || w.N == 0) return {y};
  bool use_gemm = M > glm4::kGemvMaxRows;
  if (act_name == "auto") act = glm4::auto_act(isa, int_weights, M);
  // integer activations have a GEMM on VNNI only (vpdpbusd); elsewhere their GEMV dots serve every row count
  if (act == glm4::kI8 && (isa < glm4::kAvx512Vnni || M <= glm4::kInt8GemvMaxRows)) use_gemm = false;
  glm4::linear(x.data<float>(), M, w, bias_data, y.data<float>(), isa, act, use_gemm, int_weights,
               threads > 0 ? threads : glm4::ThreadPool::default_threads(), planner);
  return {y};
}

}  // namespace

// ---- bf16 ------------------------------------------------------------------------------------------------
std::vector<paddle::Tensor> LinearBf16(const paddle::Tensor& x, const paddle::Tensor& weight,
                                       const paddle::optional<paddle::Tensor>& bias, const std::string& act,
                                       const std::string& isa, int threads) {
  PD_CHECK(weight.dtype() == paddle::DataType::BFLOAT16 && weight.shape().size() == 2,
           "glm4_linear_bf16: weight must be bfloat16 [N, K]");
  const int64_t n = weight.shape()[0], k = weight.shape()[1];
  const glm4::Weights w{reinterpret_cast<const uint8_t*>(weight.data<paddle::bfloat16>()), nullptr, n, k, 2 * k,
                        std::max<int64_t>(k, 1), 1};
  return forward(x, w, bias, false, act, isa, threads, glm4::plan_bf16);
}

std::vector<std::vector<int64_t>> Bf16Shape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                            const paddle::optional<std::vector<int64_t>>&) {
  return linear_shape(x, w[0]);
}

std::vector<paddle::DataType> Bf16Dtype(const paddle::DataType&, const paddle::DataType&,
                                        const paddle::optional<paddle::DataType>&) {
  return {paddle::DataType::FLOAT32};
}

PD_BUILD_OP(glm4_linear_bf16)
    .Inputs({"X", "Weight", paddle::Optional("Bias")})
    .Outputs({"Out"})
    .Attrs({"act: std::string", "isa: std::string", "threads: int"})
    .SetKernelFn(PD_KERNEL(LinearBf16))
    .SetInferShapeFn(PD_INFER_SHAPE(Bf16Shape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Bf16Dtype));

// ---- int8 and int4: weights and scales ------------------------------------------------------------------
std::vector<paddle::Tensor> LinearInt8(const paddle::Tensor& x, const paddle::Tensor& qweight,
                                       const paddle::Tensor& scale, const paddle::optional<paddle::Tensor>& bias,
                                       const std::string& act, const std::string& isa, int threads) {
  PD_CHECK(qweight.dtype() == paddle::DataType::INT8 && qweight.shape().size() == 2,
           "glm4_linear_int8: qweight must be int8 [N, K]");
  const int64_t n = qweight.shape()[0], k = qweight.shape()[1];
  PD_CHECK(scale.dtype() == paddle::DataType::FLOAT32 && scale.numel() == n,
           "glm4_linear_int8: scale must be float32 [", n, "]");
  const glm4::Weights w{reinterpret_cast<const uint8_t*>(qweight.data<int8_t>()), scale.data<float>(), n, k, k,
                        std::max<int64_t>(k, 1), 1};
  return forward(x, w, bias, true, act, isa, threads, glm4::plan_int8);
}

std::vector<paddle::Tensor> LinearInt4(const paddle::Tensor& x, const paddle::Tensor& qweight,
                                       const paddle::Tensor& scales, const paddle::optional<paddle::Tensor>& bias,
                                       const std::string& act, const std::string& isa, int threads,
                                       int group_size) {
  PD_CHECK(qweight.dtype() == paddle::DataType::UINT8 && qweight.shape().size() == 2,
           "glm4_linear_int4: qweight must be uint8 [N, ceil(K/2)]");
  PD_CHECK(group_size >= 2 && group_size % 2 == 0, "glm4_linear_int4: group_size must be even and >= 2, got ",
           group_size);
  const int64_t n = qweight.shape()[0], k = x.shape().empty() ? 0 : x.shape().back();
  PD_CHECK(qweight.shape()[1] == (k + 1) / 2, "glm4_linear_int4: qweight has ", qweight.shape()[1],
           " bytes per row; x's ", k, " input features need ", (k + 1) / 2);
  const int64_t groups = (k + group_size - 1) / group_size;
  PD_CHECK(scales.dtype() == paddle::DataType::FLOAT32 && scales.shape().size() == 2 &&
               scales.shape()[0] == n && scales.shape()[1] == groups,
           "glm4_linear_int4: scales must be float32 [", n, ", ", groups, "] for K=", k, ", group ", group_size);
  const glm4::Weights w{qweight.data<uint8_t>(), scales.data<float>(), n, k, (k + 1) / 2, group_size, groups};
  return forward(x, w, bias, true, act, isa, threads, glm4::plan_int4);
}

std::vector<std::vector<int64_t>> QuantShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                             const std::vector<int64_t>&,
                                             const paddle::optional<std::vector<int64_t>>&) {
  return linear_shape(x, w[0]);
}

std::vector<paddle::DataType> QuantDtype(const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
                                         const paddle::optional<paddle::DataType>&) {
  return {paddle::DataType::FLOAT32};
}

PD_BUILD_OP(glm4_linear_int8)
    .Inputs({"X", "QWeight", "Scale", paddle::Optional("Bias")})
    .Outputs({"Out"})
    .Attrs({"act: std::string", "isa: std::string", "threads: int"})
    .SetKernelFn(PD_KERNEL(LinearInt8))
    .SetInferShapeFn(PD_INFER_SHAPE(QuantShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(QuantDtype));

PD_BUILD_OP(glm4_linear_int4)
    .Inputs({"X", "QWeight", "Scales", paddle::Optional("Bias")})
    .Outputs({"Out"})
    .Attrs({"act: std::string", "isa: std::string", "threads: int", "group_size: int"})
    .SetKernelFn(PD_KERNEL(LinearInt4))
    .SetInferShapeFn(PD_INFER_SHAPE(QuantShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(QuantDtype));

// ---- Which path runs -------------------------------------------------------------------------------------
// The path this CPU runs under the given cap (as the linear ops resolve it), as int32 [1]: 0 scalar,
// 1 avx2, 2 avx512vnni, 3 avx512bf16.
std::vector<paddle::Tensor> KernelPath(const paddle::Tensor& x, const std::string& isa) {
  auto out = paddle::empty({1}, paddle::DataType::INT32, x.place());
  out.data<int32_t>()[0] = checked_isa(isa);
  return {out};
}

std::vector<std::vector<int64_t>> PathShape(const std::vector<int64_t>&) { return {{1}}; }

std::vector<paddle::DataType> PathDtype(const paddle::DataType&) { return {paddle::DataType::INT32}; }

PD_BUILD_OP(glm4_kernel_path)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"isa: std::string"})
    .SetKernelFn(PD_KERNEL(KernelPath))
    .SetInferShapeFn(PD_INFER_SHAPE(PathShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PathDtype));

// ---- Attention -------------------------------------------------------------------------------------------
// Q float32 [b, s, h, d]; K, V float32 or bfloat16 [b, C, g, d], read in their first L slots (L: KeyValid's
// length, else start + s); Start int64, one value; KeyValid bool [b, L] (optional). See attention.h.
std::vector<paddle::Tensor> Attention(const paddle::Tensor& q, const paddle::Tensor& k, const paddle::Tensor& v,
                                      const paddle::Tensor& start, const paddle::optional<paddle::Tensor>& key_valid,
                                      const std::string& isa, int threads) {
  PD_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu(), "glm4_attention runs on CPU only");
  PD_CHECK(q.dtype() == paddle::DataType::FLOAT32 && q.shape().size() == 4, "glm4_attention: q must be float32 "
           "[b, s, h, d]");
  const bool bf16 = k.dtype() == paddle::DataType::BFLOAT16;
  PD_CHECK((bf16 || k.dtype() == paddle::DataType::FLOAT32) && v.dtype() == k.dtype(),
           "glm4_attention: k and v must both be float32 or both bfloat16");
  PD_CHECK(k.shape().size() == 4 && k.shape() == v.shape(), "glm4_attention: k and v must be [b, C, g, d] alike");
  const auto &qs = q.shape(), &ks = k.shape();
  const int64_t b = qs[0], s = qs[1], h = qs[2], d = qs[3], capacity = ks[1], g = ks[2];
  PD_CHECK(ks[0] == b && ks[3] == d && g > 0 && h % g == 0, "glm4_attention: q [", b, ", ", s, ", ", h, ", ", d,
           "] does not fit k [", ks[0], ", ", capacity, ", ", g, ", ", ks[3], "] (h a multiple of g)");
  PD_CHECK(start.dtype() == paddle::DataType::INT64 && start.numel() == 1, "glm4_attention: start must be one int64");
  const int64_t first = start.data<int64_t>()[0];
  const int64_t length = key_valid ? key_valid->shape().back() : first + s;
  PD_CHECK(first >= 0 && first + s <= length && length <= capacity, "glm4_attention: queries at slots ", first,
           "..", first + s, " over ", length, " keys do not fit a cache of ", capacity, " slots");
  const auto contiguous_tail = [&](const paddle::Tensor& t) {
    return t.strides()[3] == 1 && t.strides()[2] == t.shape()[3];
  };
  PD_CHECK(contiguous_tail(q) && contiguous_tail(k) && contiguous_tail(v),
           "glm4_attention: the last two dimensions of q, k and v must be contiguous");
  glm4::AttentionArgs a{};
  a.q = q.data<float>(), a.q_stride_b = q.strides()[0], a.q_stride_s = q.strides()[1];
  a.k = bf16 ? static_cast<const void*>(k.data<paddle::bfloat16>()) : k.data<float>();
  a.v = bf16 ? static_cast<const void*>(v.data<paddle::bfloat16>()) : v.data<float>();
  a.bf16 = bf16;
  a.k_stride_b = k.strides()[0], a.k_stride_s = k.strides()[1];
  a.v_stride_b = v.strides()[0], a.v_stride_s = v.strides()[1];
  if (key_valid) {
    PD_CHECK(key_valid->dtype() == paddle::DataType::BOOL && key_valid->shape().size() == 2 &&
                 key_valid->shape()[0] == b && key_valid->strides()[1] == 1,
             "glm4_attention: key_valid must be bool [b, L] with contiguous rows");
    a.key_valid = key_valid->data<bool>(), a.valid_stride_b = key_valid->strides()[0];
  }
  auto out = paddle::empty(qs, paddle::DataType::FLOAT32, q.place());
  a.out = out.data<float>();
  a.b = b, a.s = s, a.h = h, a.g = g, a.d = d, a.L = length, a.start = first;
  glm4::attention(a, checked_isa(isa), threads > 0 ? threads : glm4::ThreadPool::default_threads());
  return {out};
}

std::vector<std::vector<int64_t>> AttentionShape(const std::vector<int64_t>& q, const std::vector<int64_t>&,
                                                 const std::vector<int64_t>&, const std::vector<int64_t>&,
                                                 const paddle::optional<std::vector<int64_t>>&) {
  return {q};
}

std::vector<paddle::DataType> AttentionDtype(const paddle::DataType&, const paddle::DataType&,
                                             const paddle::DataType&, const paddle::DataType&,
                                             const paddle::optional<paddle::DataType>&) {
  return {paddle::DataType::FLOAT32};
}

PD_BUILD_OP(glm4_attention)
    .Inputs({"Q", "K", "V", "Start", paddle::Optional("KeyValid")})
    .Outputs({"Out"})
    .Attrs({"isa: std::string", "threads: int"})
    .SetKernelFn(PD_KERNEL(Attention))
    .SetInferShapeFn(PD_INFER_SHAPE(AttentionShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(AttentionDtype));

// ---- Elementwise: SwiGLU, RMSNorm, rotary (elementwise.cc) ------------------------------------------------
namespace {

void check_float_input(const paddle::Tensor& t, const char* op, const char* name) {
  PD_CHECK(t.is_cpu(), op, " runs on CPU only");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, op, ": ", name, " must be float32");
  PD_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

int threads_or_default(int threads) { return threads > 0 ? threads : glm4::ThreadPool::default_threads(); }

}  // namespace

// X float32 [..., 2F] (gate, then up) -> silu(gate) * up, [..., F].
std::vector<paddle::Tensor> Swiglu(const paddle::Tensor& x, const std::string& isa, int threads) {
  check_float_input(x, "glm4_swiglu", "x");
  const auto& shape = x.shape();
  PD_CHECK(!shape.empty() && shape.back() % 2 == 0, "glm4_swiglu: x's last dimension must be even (gate | up)");
  std::vector<int64_t> out_shape(shape);
  const int64_t F = out_shape.back() / 2;
  out_shape.back() = F;
  auto y = paddle::empty(out_shape, paddle::DataType::FLOAT32, x.place());
  if (F > 0) glm4::swiglu(x.data<float>(), x.numel() / (2 * F), F, y.data<float>(), checked_isa(isa),
                          threads_or_default(threads));
  return {y};
}

std::vector<std::vector<int64_t>> SwigluShape(const std::vector<int64_t>& x) {
  std::vector<int64_t> out(x);
  PD_CHECK(!out.empty(), "glm4_swiglu: x must have at least one dimension");
  out.back() /= 2;
  return {out};
}

std::vector<paddle::DataType> FloatDtype(const paddle::DataType&) { return {paddle::DataType::FLOAT32}; }

PD_BUILD_OP(glm4_swiglu)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"isa: std::string", "threads: int"})
    .SetKernelFn(PD_KERNEL(Swiglu))
    .SetInferShapeFn(PD_INFER_SHAPE(SwigluShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FloatDtype));

// X float32 [..., H] (+ Residual, same shape), Weight float32 [H] -> the norm [..., H] (and the sum).
namespace {

std::vector<paddle::Tensor> norm(const paddle::Tensor& x, const paddle::Tensor* residual, const paddle::Tensor& weight,
                                 float eps, const std::string& isa, int threads, const char* op) {
  check_float_input(x, op, "x");
  check_float_input(weight, op, "weight");
  const auto& shape = x.shape();
  PD_CHECK(!shape.empty() && weight.numel() == shape.back(), op, ": weight [", weight.numel(),
           "] must match x's last dimension (", shape.empty() ? 0 : shape.back(), ")");
  if (residual) {
    check_float_input(*residual, op, "residual");
    PD_CHECK(residual->shape() == shape, op, ": residual must have x's shape");
  }
  auto y = paddle::empty(shape, paddle::DataType::FLOAT32, x.place());
  auto sum = residual ? paddle::empty(shape, paddle::DataType::FLOAT32, x.place()) : paddle::Tensor();
  const int64_t H = shape.back();
  if (H > 0)
    glm4::rms_norm(x.data<float>(), residual ? residual->data<float>() : nullptr, weight.data<float>(),
                   x.numel() / H, H, eps, y.data<float>(), residual ? sum.data<float>() : nullptr, checked_isa(isa),
                   threads_or_default(threads));
  if (residual) return {y, sum};
  return {y};
}

}  // namespace

std::vector<paddle::Tensor> RmsNorm(const paddle::Tensor& x, const paddle::Tensor& weight, float eps,
                                    const std::string& isa, int threads) {
  return norm(x, nullptr, weight, eps, isa, threads, "glm4_rms_norm");
}

std::vector<std::vector<int64_t>> RmsNormShape(const std::vector<int64_t>& x, const std::vector<int64_t>&) {
  return {x};
}

std::vector<paddle::DataType> RmsNormDtype(const paddle::DataType&, const paddle::DataType&) {
  return {paddle::DataType::FLOAT32};
}

PD_BUILD_OP(glm4_rms_norm)
    .Inputs({"X", "Weight"})
    .Outputs({"Out"})
    .Attrs({"eps: float", "isa: std::string", "threads: int"})
    .SetKernelFn(PD_KERNEL(RmsNorm))
    .SetInferShapeFn(PD_INFER_SHAPE(RmsNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RmsNormDtype));

// Out = rms_norm(X + Residual) * Weight, Sum = X + Residual: a block's residual add and the next norm.
std::vector<paddle::Tensor> AddRmsNorm(const paddle::Tensor& x, const paddle::Tensor& residual,
                                       const paddle::Tensor& weight, float eps, const std::string& isa, int threads) {
  return norm(x, &residual, weight, eps, isa, threads, "glm4_add_rms_norm");
}

std::vector<std::vector<int64_t>> AddRmsNormShape(const std::vector<int64_t>& x, const std::vector<int64_t>&,
                                                  const std::vector<int64_t>&) {
  return {x, x};
}

std::vector<paddle::DataType> AddRmsNormDtype(const paddle::DataType&, const paddle::DataType&,
                                              const paddle::DataType&) {
  return {paddle::DataType::FLOAT32, paddle::DataType::FLOAT32};
}

PD_BUILD_OP(glm4_add_rms_norm)
    .Inputs({"X", "Residual", "Weight"})
    .Outputs({"Out", "Sum"})
    .Attrs({"eps: float", "isa: std::string", "threads: int"})
    .SetKernelFn(PD_KERNEL(AddRmsNorm))
    .SetInferShapeFn(PD_INFER_SHAPE(AddRmsNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(AddRmsNormDtype));

// QKV float32 [b, s, (h + 2g) d]; Cos, SignedSin float32 [b, s, 1, r] (ops.rotary_tables) -> Q [b, s, h, d],
// K [b, s, g, d] with their first r dims rotated, V [b, s, g, d].
std::vector<paddle::Tensor> SplitRotary(const paddle::Tensor& qkv, const paddle::Tensor& cos,
                                        const paddle::Tensor& sin, int heads, int groups, int head_dim,
                                        const std::string& isa, int threads) {
  const char* op = "glm4_split_rotary";
  check_float_input(qkv, op, "qkv");
  check_float_input(cos, op, "cos");
  check_float_input(sin, op, "sin");
  const auto& shape = qkv.shape();
  PD_CHECK(shape.size() == 3 && heads > 0 && groups > 0 && head_dim > 0 &&
               shape[2] == (heads + 2 * static_cast<int64_t>(groups)) * head_dim,
           op, ": qkv must be [b, s, (heads + 2 groups) head_dim] = [b, s, ", (heads + 2 * groups) * head_dim, "]");
  const int64_t r = cos.shape().empty() ? 0 : cos.shape().back();
  PD_CHECK(cos.shape().size() == 4 && cos.shape()[0] == shape[0] && cos.shape()[1] == shape[1] &&
               cos.shape()[2] == 1 && r % 2 == 0 && r <= head_dim && sin.shape() == cos.shape(),
           op, ": cos and sin must be [b, s, 1, r] alike, r even and at most head_dim");
  const int64_t b = shape[0], s = shape[1];
  auto q = paddle::empty({b, s, heads, head_dim}, paddle::DataType::FLOAT32, qkv.place());
  auto k = paddle::empty({b, s, groups, head_dim}, paddle::DataType::FLOAT32, qkv.place());
  auto v = paddle::empty({b, s, groups, head_dim}, paddle::DataType::FLOAT32, qkv.place());
  const glm4::RotaryArgs a{qkv.data<float>(), cos.data<float>(), sin.data<float>(), q.data<float>(), k.data<float>(),
                           v.data<float>(), b * s, heads, groups, head_dim, r};
  if (b * s > 0) glm4::split_rotary(a, checked_isa(isa), threads_or_default(threads));
  return {q, k, v};
}

std::vector<std::vector<int64_t>> SplitRotaryShape(const std::vector<int64_t>& qkv, const std::vector<int64_t>&,
                                                   const std::vector<int64_t>&, int heads, int groups, int head_dim) {
  const int64_t b = qkv.size() > 0 ? qkv[0] : -1, s = qkv.size() > 1 ? qkv[1] : -1;
  return {{b, s, heads, head_dim}, {b, s, groups, head_dim}, {b, s, groups, head_dim}};
}

std::vector<paddle::DataType> SplitRotaryDtype(const paddle::DataType&, const paddle::DataType&,
                                               const paddle::DataType&) {
  return {paddle::DataType::FLOAT32, paddle::DataType::FLOAT32, paddle::DataType::FLOAT32};
}

PD_BUILD_OP(glm4_split_rotary)
    .Inputs({"QKV", "Cos", "SignedSin"})
    .Outputs({"Q", "K", "V"})
    .Attrs({"heads: int", "groups: int", "head_dim: int", "isa: std::string", "threads: int"})
    .SetKernelFn(PD_KERNEL(SplitRotary))
    .SetInferShapeFn(PD_INFER_SHAPE(SplitRotaryShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SplitRotaryDtype));

// X float32 [..., V] -> Index int64 [...], the first position of each row's largest value, and Lse float32 [...],
// log(sum(exp(row))): the sampler's statistics of the logits (see elementwise.h).
std::vector<paddle::Tensor> ArgmaxLogsumexp(const paddle::Tensor& x, const std::string& isa, int threads) {
  const char* op = "glm4_argmax_logsumexp";
  check_float_input(x, op, "x");
  const auto& shape = x.shape();
  PD_CHECK(!shape.empty() && shape.back() > 0 && shape.back() < (int64_t{1} << 31), op,
           ": x's last dimension must hold 1 .. 2^31 - 1 values, got ", shape.empty() ? 0 : shape.back());
  const std::vector<int64_t> rows(shape.begin(), shape.end() - 1);
  auto index = paddle::empty(rows, paddle::DataType::INT64, x.place());
  auto lse = paddle::empty(rows, paddle::DataType::FLOAT32, x.place());
  const int64_t V = shape.back();
  glm4::argmax_logsumexp(x.data<float>(), x.numel() / V, V, index.data<int64_t>(), lse.data<float>(),
                         checked_isa(isa), threads_or_default(threads));
  return {index, lse};
}

std::vector<std::vector<int64_t>> ArgmaxLogsumexpShape(const std::vector<int64_t>& x) {
  const std::vector<int64_t> rows(x.begin(), x.empty() ? x.end() : x.end() - 1);
  return {rows, rows};
}

std::vector<paddle::DataType> ArgmaxLogsumexpDtype(const paddle::DataType&) {
  return {paddle::DataType::INT64, paddle::DataType::FLOAT32};
}

PD_BUILD_OP(glm4_argmax_logsumexp)
    .Inputs({"X"})
    .Outputs({"Index", "Lse"})
    .Attrs({"isa: std::string", "threads: int"})
    .SetKernelFn(PD_KERNEL(ArgmaxLogsumexp))
    .SetInferShapeFn(PD_INFER_SHAPE(ArgmaxLogsumexpShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ArgmaxLogsumexpDtype));
