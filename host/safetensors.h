#pragma once
// safetensors files, memory-mapped: single files and sharded checkpoints with an index.
// Every header is validated (length, JSON, dtypes, shapes, offsets in range and consistent with
// shape x dtype, no overlaps), so a corrupt or truncated file is an error naming the file and
// the tensor, never a crash.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace vkvlm {

enum class StDType { F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL };
size_t st_dtype_size(StDType t);
const char* st_dtype_name(StDType t);

struct StTensor {
  std::string name;
  StDType dtype = StDType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // inside the mapping; may be unaligned (MLX writes no padding)
  uint64_t bytes = 0;
  std::string file;

  int64_t numel() const;
  std::string shape_string() const;
  // Values converted to f32 (from f32/f16/bf16/f64 and integer types).
  std::vector<float> to_f32() const;
};

class SafetensorsFile {
 public:
  // `what` names the file in errors ("weights file", "prompt cache").
  explicit SafetensorsFile(const std::string& path, const char* what = "weights file");
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, StTensor>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, StTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

// One tensor to write: its bytes as the dtype and shape say (row-major, little-endian).
struct StWrite {
  std::string name;
  StDType dtype = StDType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  uint64_t bytes = 0;
};

// Writes a safetensors file with `metadata` as its __metadata__: to a temporary file beside
// `path`, renamed over it once complete, so a failed write leaves any earlier file whole.
void write_safetensors_file(const std::string& path, const std::vector<StWrite>& tensors,
                            const std::map<std::string, std::string>& metadata);

// All tensors of a checkpoint directory: model.safetensors, or the shards listed in
// model.safetensors.index.json, or (for other layouts) every *.safetensors file in it.
class TensorStore {
 public:
  static TensorStore open_directory(const std::string& dir);
  static TensorStore open_file(const std::string& path);
  // Tensors whose data lies in memory the caller keeps alive through `memory` (random weights at
  // a real model's shapes for vkvlm-bench --model-shape: nothing read from disk). `where` names
  // them in errors.
  static TensorStore in_memory(std::vector<StTensor> tensors, std::shared_ptr<const void> memory, std::string where);

  const StTensor* find(const std::string& name) const;
  const StTensor& get(const std::string& name) const;  // throws, naming the tensor and folder
  bool has(const std::string& name) const { return find(name) != nullptr; }
  std::vector<std::string> names() const;
  const std::string& where() const { return where_; }
  uint64_t total_bytes() const;

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::shared_ptr<const std::vector<StTensor>> in_memory_;  // in_memory's tensors
  std::shared_ptr<const void> memory_;                      // and their data
  std::map<std::string, const StTensor*> index_;
  std::string where_;
};

}  // namespace vkvlm
