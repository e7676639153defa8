#include "gpu/shader_variants.h"

#include <utility>

#include "gpu/error.h"

namespace vkvlm::gpu::variant {
namespace {

const WeightFormat k_formats[] = {WeightFormat::F32, WeightFormat::F16, WeightFormat::BF16, WeightFormat::Q4,
                                  WeightFormat::Q8};

std::string dtype_suffix(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    default: fail("internal: no float conversion for ", dtype_name(t));
  }
}

}  // namespace

std::string matmul(MatmulKernel kernel, WeightFormat w, bool x16, bool subgroup) {
  const std::string f = weight_format_name(w), x = x16 ? "_x16" : "_x32";
  switch (kernel) {
    case MatmulKernel::Coopmat: return "gemm_coopmat_" + f;
    case MatmulKernel::Lanes: return "matmul_lanes_" + f + x;
    case MatmulKernel::Gemv: return "gemv_" + f + x + (subgroup ? "_sg" : "");
    case MatmulKernel::Gemm: return "gemm_" + f + x;
  }
  return "";
}

std::string norm(bool rms, bool subgroup) { return std::string(rms ? "rmsnorm" : "layernorm") + (subgroup ? "_sg" : ""); }

std::string kv_append(int bits) { return bits == 16 ? "kv_append" : "kv_append_q" + std::to_string(bits); }

std::string attention(bool rows, const std::string& kv, bool subgroup) {
  return rows ? "attn_rows_" + kv + (subgroup ? "_sg" : "") : "attn_tiled_" + kv;
}

std::string convert(DType from, DType to) { return "convert_" + dtype_suffix(from) + "_" + dtype_suffix(to); }

std::string get_rows(WeightFormat table) { return std::string("get_rows_") + weight_format_name(table); }

std::string logsumexp(bool subgroup) { return subgroup ? "logsumexp_sg" : "logsumexp"; }

std::vector<std::string> all() {
  std::vector<std::string> out = {k_rope, k_attn_merge, k_unary, k_binary, k_patch_embed, k_topk, k_repeat_penalty};
  for (WeightFormat w : k_formats) {
    for (bool x16 : {false, true}) {
      out.push_back(matmul(MatmulKernel::Gemv, w, x16, false));
      out.push_back(matmul(MatmulKernel::Gemv, w, x16, true));
      out.push_back(matmul(MatmulKernel::Gemm, w, x16, false));
      out.push_back(matmul(MatmulKernel::Lanes, w, x16, false));
    }
    out.push_back(matmul(MatmulKernel::Coopmat, w, false, false));
    out.push_back(get_rows(w));
  }
  for (bool sg : {false, true}) {
    out.push_back(norm(true, sg));
    out.push_back(norm(false, sg));
    out.push_back(logsumexp(sg));
  }
  for (int bits : {16, 4, 8}) out.push_back(kv_append(bits));
  for (const char* kv : {"kv16", "kv32", "q4", "q8"}) {
    out.push_back(attention(false, kv, false));
    out.push_back(attention(true, kv, false));
    out.push_back(attention(true, kv, true));
  }
  // The conversions there are: bf16 only as a source, f32 to f32 as a strided copy.
  for (auto [from, to] : {std::pair{DType::F32, DType::F16}, std::pair{DType::F16, DType::F32},
                          std::pair{DType::BF16, DType::F32}, std::pair{DType::F32, DType::F32}})
    out.push_back(convert(from, to));
  return out;
}

}  // namespace vkvlm::gpu::variant
