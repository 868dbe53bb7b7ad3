// The Paddle operators: glm4_linear_bf16, glm4_linear_int8, glm4_linear_int4, glm4_attention, the elementwise
// ones (glm4_swiglu, glm4_rms_norm, glm4_add_rms_norm, glm4_split_rotary, glm4_argmax_logsumexp), glm4_block
// (a whole transformer block) and glm4_kernel_path. Inputs are checked here, then glm4::linear, glm4::attention,
// elementwise.cc or block.cc does the work. The only file that includes Paddle's headers (they take ~40 s to
// compile; the kernels, a few).
#include "paddle/extension.h"

#include "attention.h"
#include "block.h"
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

// The activation dtype an op attribute names: kF32, kBf16, kI8, or -1 for "auto" (glm4::linear picks).
int checked_act(const std::string& act_name, bool int_weights, const char* op) {
  if (act_name == "auto") return -1;
  const int act = glm4::act_from_name(act_name);
  PD_CHECK(act >= 0, op, ": unknown activation_dtype '", act_name, "': expected auto, float32, bfloat16 or int8");
  PD_CHECK(act != glm4::kI8 || int_weights, op, ": activation_dtype 'int8' needs int8 or int4 weights");
  return act;
}

// A Linear's weights in format `fmt` ("bf16", "int8" or "int4"; see the package docstring), checked: bf16
// weight [N, K]; int8 qweight [N, K] and scale [N]; int4 qweight [N, ceil(K/2)] and scales [N, ceil(K/G)].
// k: the input features (int4's packed rows cannot tell an odd K from the next even one).
glm4::LinearWeights linear_weights(const std::string& fmt, const paddle::Tensor& weight,
                                   const paddle::optional<paddle::Tensor>& scales,
                                   const paddle::optional<paddle::Tensor>& bias, int64_t k, int group_size,
                                   const char* op) {
  PD_CHECK(weight.is_cpu() && weight.shape().size() == 2, op, ": the weight must be a CPU tensor [N, .]");
  const int64_t n = weight.shape()[0];
  const float* bias_data = nullptr;
  if (bias) {
    PD_CHECK(bias->dtype() == paddle::DataType::FLOAT32 && bias->numel() == n, op, ": bias must be float32 [", n,
             "]");
    bias_data = bias->data<float>();
  }
  PD_CHECK(fmt == "int4" || weight.shape()[1] == k, op, ": the input's last dimension (", k,
           ") must equal the weight's input features (", weight.shape()[1], ")");
  if (fmt == "bf16") {
    PD_CHECK(weight.dtype() == paddle::DataType::BFLOAT16, op, ": weight must be bfloat16 [N, K]");
    const glm4::Weights w{reinterpret_cast<const uint8_t*>(weight.data<paddle::bfloat16>()), nullptr, n, k, 2 * k,
                          std::max<int64_t>(k, 1), 1};
    return {w, bias_data, false, glm4::plan_bf16};
  }
  PD_CHECK(scales.is_initialized(), op, ": ", fmt, " weights need their scales");
  if (fmt == "int8") {
    PD_CHECK(weight.dtype() == paddle::DataType::INT8, op, ": qweight must be int8 [N, K]");
    PD_CHECK(scales->dtype() == paddle::DataType::FLOAT32 && scales->numel() == n, op, ": scale must be float32 [",
             n, "]");
    const glm4::Weights w{reinterpret_cast<const uint8_t*>(weight.data<int8_t>()), scales->data<float>(), n, k, k,
                          std::max<int64_t>(k, 1), 1};
    return {w, bias_data, true, glm4::plan_int8};
  }
  PD_CHECK(fmt == "int4", op, ": unknown weight format '", fmt, "': expected bf16, int8 or int4");
  PD_CHECK(weight.dtype() == paddle::DataType::UINT8, op, ": qweight must be uint8 [N, ceil(K/2)]");
  PD_CHECK(group_size >= 2 && group_size % 2 == 0, op, ": group_size must be even and >= 2, got ", group_size);
  PD_CHECK(weight.shape()[1] == (k + 1) / 2, op, ": qweight has ", weight.shape()[1], " bytes per row; the input's ",
           k, " input features need ", (k + 1) / 2);
  const int64_t groups = (k + group_size - 1) / group_size;
  PD_CHECK(scales->dtype() == paddle::DataType::FLOAT32 && scales->shape().size() == 2 &&
               scales->shape()[0] == n && scales->shape()[1] == groups,
           op, ": scales must be float32 [", n, ", ", groups, "] for K=", k, ", group ", group_size);
  const glm4::Weights w{weight.data<uint8_t>(), scales->data<float>(), n, k, (k + 1) / 2, group_size, groups};
  return {w, bias_data, true, glm4::plan_int4};
}

int threads_or_default(int threads) { return threads > 0 ? threads : glm4::ThreadPool::default_threads(); }

std::vector<paddle::Tensor> forward(const paddle::Tensor& x, const std::string& fmt, const paddle::Tensor& weight,
                                    const paddle::optional<paddle::Tensor>& scales,
                                    const paddle::optional<paddle::Tensor>& bias, int group_size,
                                    const std::string& act_name, const std::string& isa_name, int threads,
                                    const char* op) {
  PD_CHECK(x.is_cpu(), "glm4 linear kernels run on CPU only");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32, "glm4 linear: x must be float32");
  const auto& shape = x.shape();
  PD_CHECK(!shape.empty(), "glm4 linear: x must have at least one dimension");
  const glm4::LinearWeights l = linear_weights(fmt, weight, scales, bias, shape.back(), group_size, op);
  const int isa = checked_isa(isa_name);
  const int act = checked_act(act_name, l.int_weights, op);
  auto y = paddle::empty(linear_shape(shape, l.w.N)[0], paddle::DataType::FLOAT32, x.place());
  const int64_t M = l.w.K ? x.numel() / l.w.K : 0;
  if (M > 0 && l.w.N > 0) glm4::linear(x.data<float>(), M, l, y.data<float>(), isa, act, threads_or_default(threads));
  return {y};
}

}  // namespace

// ---- bf16 ------------------------------------------------------------------------------------------------
std::vector<paddle::Tensor> LinearBf16(const paddle::Tensor& x, const paddle::Tensor& weight,
                                       const paddle::optional<paddle::Tensor>& bias, const std::string& act,
                                       const std::string& isa, int threads) {
  return forward(x, "bf16", weight, paddle::none, bias, 0, act, isa, threads, "glm4_linear_bf16");
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
  return forward(x, "int8", qweight, scale, bias, 0, act, isa, threads, "glm4_linear_int8");
}

std::vector<paddle::Tensor> LinearInt4(const paddle::Tensor& x, const paddle::Tensor& qweight,
                                       const paddle::Tensor& scales, const paddle::optional<paddle::Tensor>& bias,
                                       const std::string& act, const std::string& isa, int threads,
                                       int group_size) {
  return forward(x, "int4", qweight, scales, bias, group_size, act, isa, threads, "glm4_linear_int4");
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
  glm4::attention(a, checked_isa(isa), threads_or_default(threads));
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

// X float32 [..., V] -> Index int64 [...], the first position of each row's largest value, LogProb float32 [...], its
// log-probability, and Lse float32 [...], log(sum(exp(row))): the sampler's statistics of the logits (see
// elementwise.h).
std::vector<paddle::Tensor> ArgmaxLogsumexp(const paddle::Tensor& x, const std::string& isa, int threads) {
  const char* op = "glm4_argmax_logsumexp";
  check_float_input(x, op, "x");
  const auto& shape = x.shape();
  PD_CHECK(!shape.empty() && shape.back() > 0 && shape.back() < (int64_t{1} << 31), op,
           ": x's last dimension must hold 1 .. 2^31 - 1 values, got ", shape.empty() ? 0 : shape.back());
  const std::vector<int64_t> rows(shape.begin(), shape.end() - 1);
  auto index = paddle::empty(rows, paddle::DataType::INT64, x.place());
  auto log_prob = paddle::empty(rows, paddle::DataType::FLOAT32, x.place());
  auto lse = paddle::empty(rows, paddle::DataType::FLOAT32, x.place());
  const int64_t V = shape.back();
  glm4::argmax_logsumexp(x.data<float>(), x.numel() / V, V, index.data<int64_t>(), log_prob.data<float>(),
                         lse.data<float>(), checked_isa(isa), threads_or_default(threads));
  return {index, log_prob, lse};
}

std::vector<std::vector<int64_t>> ArgmaxLogsumexpShape(const std::vector<int64_t>& x) {
  const std::vector<int64_t> rows(x.begin(), x.empty() ? x.end() : x.end() - 1);
  return {rows, rows, rows};
}

std::vector<paddle::DataType> ArgmaxLogsumexpDtype(const paddle::DataType&) {
  return {paddle::DataType::INT64, paddle::DataType::FLOAT32, paddle::DataType::FLOAT32};
}

PD_BUILD_OP(glm4_argmax_logsumexp)
    .Inputs({"X"})
    .Outputs({"Index", "LogProb", "Lse"})
    .Attrs({"isa: std::string", "threads: int"})
    .SetKernelFn(PD_KERNEL(ArgmaxLogsumexp))
    .SetInferShapeFn(PD_INFER_SHAPE(ArgmaxLogsumexpShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ArgmaxLogsumexpDtype));

// ---- A whole transformer block (block.cc) ------------------------------------------------------------------
// X float32 [b, s, H] -> Out [b, keep or s, H]: model.GLM4Block.forward in one call. The Linear layers' weights
// are in `fmt` (as the linear operators take them: Weight, and Scales for int8 / int4), QKVBias optional; Cos,
// SignedSin [b, s, 1, r]; KCache, VCache [B >= b, C, g, d], float32 or bfloat16, written in place at slots
// Start .. Start + s of their first b rows; KeyValid [b, L] as glm4_attention takes it.
std::vector<paddle::Tensor> Block(
    const paddle::Tensor& x, const paddle::Tensor& input_norm, const paddle::Tensor& post_norm,
    const paddle::Tensor& qkv_weight, const paddle::optional<paddle::Tensor>& qkv_scales,
    const paddle::optional<paddle::Tensor>& qkv_bias, const paddle::Tensor& o_weight,
    const paddle::optional<paddle::Tensor>& o_scales, const paddle::Tensor& gate_up_weight,
    const paddle::optional<paddle::Tensor>& gate_up_scales, const paddle::Tensor& down_weight,
    const paddle::optional<paddle::Tensor>& down_scales, const paddle::Tensor& cos, const paddle::Tensor& sin,
    paddle::Tensor& k_cache, paddle::Tensor& v_cache, const paddle::Tensor& start,
    const paddle::optional<paddle::Tensor>& key_valid, const std::string& fmt, int group_size, float eps,
    int heads, int groups, int head_dim, int keep, const std::string& act_name, const std::string& isa_name,
    int threads) {
  const char* op = "glm4_block";
  check_float_input(x, op, "x");
  check_float_input(input_norm, op, "input_norm");
  check_float_input(post_norm, op, "post_norm");
  check_float_input(cos, op, "cos");
  check_float_input(sin, op, "sin");
  const auto& xs = x.shape();
  PD_CHECK(xs.size() == 3 && heads > 0 && groups > 0 && head_dim > 0 && heads % groups == 0, op,
           ": x must be [b, s, H], heads a multiple of groups");
  const int64_t b = xs[0], s = xs[1], H = xs[2], h = heads, g = groups, d = head_dim;
  PD_CHECK(input_norm.numel() == H && post_norm.numel() == H, op, ": the norms' weights must be [", H, "]");
  PD_CHECK(keep >= 0 && keep <= s, op, ": keep (", keep, ") must be 0 .. s (", s, ")");
  glm4::BlockArgs a{};
  a.qkv = linear_weights(fmt, qkv_weight, qkv_scales, qkv_bias, H, group_size, op);
  a.o = linear_weights(fmt, o_weight, o_scales, paddle::none, h * d, group_size, op);
  const int64_t F = gate_up_weight.shape().empty() ? 0 : gate_up_weight.shape()[0] / 2;  // gate, then up
  a.gate_up = linear_weights(fmt, gate_up_weight, gate_up_scales, paddle::none, H, group_size, op);
  a.down = linear_weights(fmt, down_weight, down_scales, paddle::none, F, group_size, op);
  PD_CHECK(a.qkv.w.N == (h + 2 * g) * d && a.o.w.N == H && a.gate_up.w.N == 2 * F && a.down.w.N == H, op,
           ": the Linear weights do not fit H=", H, ", heads=", h, ", groups=", g, ", head_dim=", d, ", F=", F);
  const int64_t r = cos.shape().empty() ? 0 : cos.shape().back();
  PD_CHECK(cos.shape().size() == 4 && cos.shape()[0] == b && cos.shape()[1] == s && cos.shape()[2] == 1 &&
               r % 2 == 0 && r <= d && sin.shape() == cos.shape(),
           op, ": cos and sin must be [b, s, 1, r] alike, r even and at most head_dim");

  const bool bf16 = k_cache.dtype() == paddle::DataType::BFLOAT16;
  PD_CHECK(k_cache.is_cpu() && (bf16 || k_cache.dtype() == paddle::DataType::FLOAT32) &&
               v_cache.dtype() == k_cache.dtype(),
           op, ": the caches must both be float32 or both bfloat16, on CPU");
  const auto& cs = k_cache.shape();
  PD_CHECK(cs.size() == 4 && v_cache.shape() == cs && cs[0] >= b && cs[2] == g && cs[3] == d &&
               k_cache.strides() == v_cache.strides() && k_cache.strides()[3] == 1 && k_cache.strides()[2] == d,
           op, ": the caches must be [B >= ", b, ", C, ", g, ", ", d, "] alike, each slot contiguous");
  PD_CHECK(start.dtype() == paddle::DataType::INT64 && start.numel() == 1, op, ": start must be one int64");
  const int64_t first = start.data<int64_t>()[0];
  const int64_t length = key_valid ? key_valid->shape().back() : first + s;
  PD_CHECK(first >= 0 && first + s <= length && length <= cs[1], op, ": tokens at slots ", first, "..", first + s,
           " over ", length, " keys do not fit a cache of ", cs[1], " slots");
  if (key_valid) {
    PD_CHECK(key_valid->dtype() == paddle::DataType::BOOL && key_valid->shape().size() == 2 &&
                 key_valid->shape()[0] == b && key_valid->strides()[1] == 1,
             op, ": key_valid must be bool [b, L] with contiguous rows");
    a.key_valid = key_valid->data<bool>(), a.valid_stride_b = key_valid->strides()[0];
  }
  const int isa = checked_isa(isa_name);
  const int act = checked_act(act_name, a.qkv.int_weights, op);
  const int64_t kept = keep > 0 ? keep : s;
  auto out = paddle::empty({b, kept, H}, paddle::DataType::FLOAT32, x.place());
  if (b * s == 0) return {out};
  a.x = x.data<float>(), a.b = b, a.s = s, a.H = H, a.keep = keep;
  a.input_norm = input_norm.data<float>(), a.post_norm = post_norm.data<float>(), a.eps = eps;
  a.h = h, a.g = g, a.d = d, a.cos = cos.data<float>(), a.sin = sin.data<float>(), a.r = r;
  a.k_cache = bf16 ? static_cast<void*>(k_cache.data<paddle::bfloat16>()) : k_cache.data<float>();
  a.v_cache = bf16 ? static_cast<void*>(v_cache.data<paddle::bfloat16>()) : v_cache.data<float>();
  a.bf16 = bf16, a.cache_stride_b = k_cache.strides()[0], a.cache_stride_s = k_cache.strides()[1];
  a.capacity = cs[1], a.start = first, a.L = length;
  a.out = out.data<float>();
  glm4::block(a, isa, act, threads_or_default(threads));
  return {out};
}

std::vector<std::vector<int64_t>> BlockShape(
    const std::vector<int64_t>& x, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const paddle::optional<std::vector<int64_t>>&,
    const paddle::optional<std::vector<int64_t>>&, const std::vector<int64_t>&,
    const paddle::optional<std::vector<int64_t>>&, const std::vector<int64_t>&,
    const paddle::optional<std::vector<int64_t>>&, const std::vector<int64_t>&,
    const paddle::optional<std::vector<int64_t>>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>& k_cache, const std::vector<int64_t>& v_cache, const std::vector<int64_t>&,
    const paddle::optional<std::vector<int64_t>>&, const std::string&, int, float, int, int, int, int keep) {
  std::vector<int64_t> out(x);
  if (keep > 0 && out.size() == 3) out[1] = keep;
  return {out, k_cache, v_cache};
}

std::vector<paddle::DataType> BlockDtype(
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
    const paddle::optional<paddle::DataType>&, const paddle::optional<paddle::DataType>&, const paddle::DataType&,
    const paddle::optional<paddle::DataType>&, const paddle::DataType&, const paddle::optional<paddle::DataType>&,
    const paddle::DataType&, const paddle::optional<paddle::DataType>&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType& k_cache, const paddle::DataType& v_cache,
    const paddle::DataType&, const paddle::optional<paddle::DataType>&) {
  return {paddle::DataType::FLOAT32, k_cache, v_cache};
}

PD_BUILD_OP(glm4_block)
    .Inputs({"X", "InputNorm", "PostNorm", "QkvWeight", paddle::Optional("QkvScales"), paddle::Optional("QkvBias"),
             "OWeight", paddle::Optional("OScales"), "GateUpWeight", paddle::Optional("GateUpScales"),
             "DownWeight", paddle::Optional("DownScales"), "Cos", "SignedSin", "KCache", "VCache", "Start",
             paddle::Optional("KeyValid")})
    .Outputs({"Out", "KCacheOut", "VCacheOut"})
    .SetInplaceMap({{"KCache", "KCacheOut"}, {"VCache", "VCacheOut"}})
    .Attrs({"fmt: std::string", "group_size: int", "eps: float", "heads: int", "groups: int", "head_dim: int",
            "keep: int", "act: std::string", "isa: std::string", "threads: int"})
    .SetKernelFn(PD_KERNEL(Block))
    .SetInferShapeFn(PD_INFER_SHAPE(BlockShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(BlockDtype));

// Positions int64 [b, s]; CosTable, SinTable float32 [P, r] (ops.rotary_tables of positions 0 .. P - 1) -> Cos,
// SignedSin float32 [b, s, 1, r]: the tables of those positions, as ops.rotary_tables gives them.
std::vector<paddle::Tensor> RotaryLookup(const paddle::Tensor& positions, const paddle::Tensor& cos_table,
                                         const paddle::Tensor& sin_table) {
  const char* op = "glm4_rotary_lookup";
  check_float_input(cos_table, op, "cos_table");
  check_float_input(sin_table, op, "sin_table");
  PD_CHECK(positions.is_cpu() && positions.dtype() == paddle::DataType::INT64 && positions.shape().size() == 2 &&
               positions.is_contiguous(),
           op, ": positions must be contiguous int64 [b, s] on CPU");
  PD_CHECK(cos_table.shape().size() == 2 && sin_table.shape() == cos_table.shape(), op,
           ": cos_table and sin_table must be [P, r] alike");
  const int64_t P = cos_table.shape()[0], r = cos_table.shape()[1], M = positions.numel();
  const int64_t* at = positions.data<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    PD_CHECK(at[m] >= 0 && at[m] < P, op, ": position ", at[m], " is outside the tables' 0 .. ", P - 1);
  const int64_t b = positions.shape()[0], s = positions.shape()[1];
  auto cos = paddle::empty({b, s, 1, r}, paddle::DataType::FLOAT32, cos_table.place());
  auto sin = paddle::empty({b, s, 1, r}, paddle::DataType::FLOAT32, cos_table.place());
  glm4::rotary_lookup(at, M, cos_table.data<float>(), sin_table.data<float>(), r, cos.data<float>(),
                      sin.data<float>());
  return {cos, sin};
}

std::vector<std::vector<int64_t>> RotaryLookupShape(const std::vector<int64_t>& positions,
                                                    const std::vector<int64_t>& table, const std::vector<int64_t>&) {
  const int64_t b = positions.size() > 0 ? positions[0] : -1, s = positions.size() > 1 ? positions[1] : -1;
  const int64_t r = table.size() > 1 ? table[1] : -1;
  return {{b, s, 1, r}, {b, s, 1, r}};
}

std::vector<paddle::DataType> RotaryLookupDtype(const paddle::DataType&, const paddle::DataType&,
                                                const paddle::DataType&) {
  return {paddle::DataType::FLOAT32, paddle::DataType::FLOAT32};
}

PD_BUILD_OP(glm4_rotary_lookup)
    .Inputs({"Positions", "CosTable", "SinTable"})
    .Outputs({"Cos", "SignedSin"})
    .SetKernelFn(PD_KERNEL(RotaryLookup))
    .SetInferShapeFn(PD_INFER_SHAPE(RotaryLookupShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RotaryLookupDtype));

// Ids int64 [...] -> Out float32 [..., K]: rows of the token embedding held as a Linear weight of vocab output rows
// in `fmt` (Table, and Scales for int8 / int4; see linear_weights), widened or dequantized (see elementwise.h).
std::vector<paddle::Tensor> Embedding(const paddle::Tensor& ids, const paddle::Tensor& table,
                                      const paddle::optional<paddle::Tensor>& scales, const std::string& fmt,
                                      int64_t k, int group_size) {
  const char* op = "glm4_embedding";
  PD_CHECK(ids.is_cpu() && ids.dtype() == paddle::DataType::INT64 && ids.is_contiguous(), op,
           ": ids must be contiguous int64 on CPU");
  const glm4::LinearWeights l = linear_weights(fmt, table, scales, paddle::none, k, group_size, op);
  const int64_t* at = ids.data<int64_t>();
  for (int64_t m = 0; m < ids.numel(); ++m)
    PD_CHECK(at[m] >= 0 && at[m] < l.w.N, op, ": token id ", at[m], " is outside the table's 0 .. ", l.w.N - 1);
  std::vector<int64_t> shape(ids.shape());
  shape.push_back(k);
  auto out = paddle::empty(shape, paddle::DataType::FLOAT32, ids.place());
  const auto kind = fmt == "bf16"   ? glm4::TableKind::kBf16
                    : fmt == "int8" ? glm4::TableKind::kInt8
                                    : glm4::TableKind::kInt4;
  glm4::embedding(l.w, kind, at, ids.numel(), out.data<float>());
  return {out};
}

std::vector<std::vector<int64_t>> EmbeddingShape(const std::vector<int64_t>& ids, const std::vector<int64_t>&,
                                                 const paddle::optional<std::vector<int64_t>>&, const std::string&,
                                                 int64_t k, int) {
  std::vector<int64_t> shape(ids);
  shape.push_back(k);
  return {shape};
}

std::vector<paddle::DataType> EmbeddingDtype(const paddle::DataType&, const paddle::DataType&,
                                             const paddle::optional<paddle::DataType>&) {
  return {paddle::DataType::FLOAT32};
}

PD_BUILD_OP(glm4_embedding)
    .Inputs({"Ids", "Table", paddle::Optional("Scales")})
    .Outputs({"Out"})
    .Attrs({"fmt: std::string", "k: int64_t", "group_size: int"})
    .SetKernelFn(PD_KERNEL(Embedding))
    .SetInferShapeFn(PD_INFER_SHAPE(EmbeddingShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(EmbeddingDtype));
