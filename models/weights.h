#pragma once
// Moves checkpoint tensors onto the GPU in the form the kernels take: linear layers as
// gpu::Weight (f32/f16/bf16 as stored, MLX q4/q8 when the checkpoint is quantized or --quantize
// asks for it), small vectors (norms, biases) as f32.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gpu/context.h"
#include "gpu/ops.h"
#include "host/config.h"
#include "models/model_config.h"
#include "host/safetensors.h"

namespace vkvlm {

struct LoadOptions {
  std::string quantize;  // "", "q4" or "q8": quantize float linear layers of the language model
  bool progress = false;  // draw a progress bar on stderr
  // The weights from this store instead of the folder's safetensors files (vkvlm-bench
  // --model-shape: random weights at a real model's shapes, generated in memory).
  std::shared_ptr<const TensorStore> weights;
};

// Several linear layers applied to one input and written side by side (fused q/k/v, gate/up).
// Layers with the same storage format share one weight; otherwise each keeps its own.
struct Projection {
  std::vector<gpu::Weight> parts;
  std::vector<int64_t> offsets;     // first output column of each part
  std::vector<gpu::Tensor> biases;  // per part: f32 [part n], or invalid
  int64_t n_total = 0, k = 0;

  // y [rows, n_total] (+)= x [rows, k] W^T + bias.
  void run(gpu::Recorder& rec, const gpu::Mat& x, const gpu::Mat& y, bool accumulate = false,
           const gpu::Variant& v = {}) const;
  uint64_t bytes() const;
};

class WeightLoader {
 public:
  WeightLoader(gpu::Context& ctx, const TensorStore& store, const ModelConfig& config, LoadOptions options);

  bool has(const std::string& name) const { return store_.has(name); }
  const TensorStore& store() const { return store_; }

  // The linear layer `module` (tensors module.weight [n, k], or module.weight/.scales/.biases
  // when quantized). `quantizable` allows --quantize to apply.
  gpu::Weight linear(const std::string& module, int64_t n, int64_t k, bool quantizable);
  // Several modules stacked along n; bias_suffix (".bias") adds their biases if present.
  Projection projection(const std::vector<std::string>& modules, const std::vector<int64_t>& ns, int64_t k,
                        bool quantizable, bool with_bias);
  // A tensor of exactly `numel` values as f32 (norm weights, biases, embeddings of images).
  gpu::Tensor f32(const std::string& name, std::vector<int64_t> shape);
  // Host f32 copy of a tensor checked against `numel`.
  std::vector<float> host_f32(const std::string& name, int64_t numel) const;

  // Bytes moved to the GPU so far, for progress and `info`.
  uint64_t uploaded_bytes() const { return uploaded_; }
  void finish_progress();

 private:
  gpu::Weight upload_float(const StTensor& t, const std::string& module, int64_t n, int64_t k, bool quantize);
  gpu::Weight upload_quantized(const std::string& module, int64_t n, int64_t k);
  QuantSpec spec_for(const std::string& module) const;
  void progress(uint64_t bytes);

  gpu::Context& ctx_;
  const TensorStore& store_;
  const ModelConfig& config_;
  LoadOptions options_;
  uint64_t uploaded_ = 0, total_ = 0;
  int last_percent_ = -1;
};

}  // namespace vkvlm
