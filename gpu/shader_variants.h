#pragma once
// The name of every shader variant the ops ask the pipeline registry for, built in one place,
// and the list of all of them, which a test checks against the compiled set
// (shaders/shaders.cmake): a misspelled or missing variant fails the tests, not a user's run.
#include <string>
#include <vector>

#include "gpu/memory.h"
#include "gpu/ops.h"

namespace vkvlm::gpu::variant {

enum class MatmulKernel { Gemv, Gemm, Coopmat, Lanes };
// x16: the input is f16 (not for Coopmat); subgroup: Gemv's subgroup reduction.
std::string matmul(MatmulKernel kernel, WeightFormat w, bool x16, bool subgroup);
std::string norm(bool rms, bool subgroup);
std::string kv_append(int bits);  // 16: the f16 cache; 4, 8: quantized
// kv: "kv16", "kv32", "q4" or "q8" (how K and V are stored).
std::string attention(bool rows, const std::string& kv, bool subgroup);
std::string convert(DType from, DType to);  // from f32, f16, bf16 to f32, f16
std::string get_rows(WeightFormat table);
std::string logsumexp(bool subgroup);
inline const char* const k_rope = "rope";
inline const char* const k_attn_merge = "attn_merge";
inline const char* const k_unary = "unary";
inline const char* const k_binary = "binary";
inline const char* const k_patch_embed = "patch_embed";
inline const char* const k_topk = "topk";
inline const char* const k_repeat_penalty = "repeat_penalty";

// Every variant the ops can ask for.
std::vector<std::string> all();

}  // namespace vkvlm::gpu::variant
