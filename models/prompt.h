#pragma once
// A prompt as the language model takes it: token ids, where image features go, the RoPE
// position(s) of every token and the attention layout. Positions are data, not the row index:
// Qwen2-VL places image tokens on a (t, row, column) grid and continues text after the grid's
// largest position; PaliGemma counts from 1 and lets the whole prompt attend to itself.
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "host/image.h"
#include "host/image_processing.h"

namespace vkvlm {

// What an architecture decided for one image on the CPU, handed unchanged to its GPU encoder
// (so "how many tokens, in which order" is computed once).
struct ImagePlan {
  ProcessedImage pixels;
  int64_t tokens = 0;          // prompt rows the image occupies
  std::vector<int32_t> order;  // the architecture's gather order of feature rows (empty: as they come)
  // Qwen2-VL: the image tokens' grid (t, rows, columns) for their M-RoPE positions; 0: none.
  std::array<int, 3> grid{0, 0, 0};
  uint64_t hash = 0;           // identity of the image and its processing, for KV reuse
};

// An image's place in the prompt: `length` rows from `position` take its features.
struct ImageSpan {
  int64_t position = 0, length = 0;
  size_t image = 0;  // index into Prompt::images
};

// Rows [begin, end) of a causal prompt that see each other whole: PaliGemma's prefix (the whole
// prompt), Gemma 3's image blocks. The attention layout of a prompt is a list of these.
struct BidirectionalSpan {
  int64_t begin = 0, end = 0;
  bool operator==(const BidirectionalSpan&) const = default;
};

struct Prompt {
  // Token ids; image rows hold the model's image token (Phi-3-Vision: -k for image k, 1-based,
  // as its processor makes them).
  std::vector<int32_t> ids;
  std::vector<uint64_t> keys;  // per row: identity for KV reuse (token id, or image hash and offset)
  std::vector<ImageSpan> spans;
  std::vector<ImagePlan> images;
  std::string text;            // the rendered prompt
  int position_components = 1;      // RoPE positions per token (3 for M-RoPE)
  std::vector<int32_t> positions;   // [rows, position_components]
  int64_t next_position = 0;        // the first generated token's position; each next one adds 1
  std::vector<BidirectionalSpan> bidirectional;  // sorted, disjoint (none: causal throughout)

  int64_t size() const { return int64_t(ids.size()); }
};

// How many leading entries two sequences share (row keys, token ids): what a KV cache can keep.
template <typename T>
size_t shared_prefix(const std::vector<T>& a, const std::vector<T>& b) {
  size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  return n;
}

// Whether spans are sorted, disjoint, non-empty and within rows [0, rows).
bool valid_spans(const std::vector<BidirectionalSpan>& spans, int64_t rows);
// Of `common` leading rows that a prompt with `spans` shares with rows computed under `cached`,
// how many stay valid: a span's rows depend on the whole span, so a span counts only when both
// have it and it ends within the shared rows; the rows from its start are recomputed otherwise.
int64_t rows_valid_under(const std::vector<BidirectionalSpan>& cached, const std::vector<BidirectionalSpan>& spans,
                         int64_t common);
// The spans wholly within rows [0, rows).
std::vector<BidirectionalSpan> spans_within(const std::vector<BidirectionalSpan>& spans, int64_t rows);
// `to`, moved to the end of any span it would cut: a pass must hold a span whole.
int64_t end_outside_spans(const std::vector<BidirectionalSpan>& spans, int64_t to);
// The attention kernels' per-row data for rows [from, to): each row's span as [begin, end)
// (rows outside every span: [0, 0)), I32 pairs.
std::vector<int32_t> span_rows(const std::vector<BidirectionalSpan>& spans, int64_t from, int64_t to);

// Identity of a prompt row for KV reuse: text tokens by id, image rows by image and offset.
uint64_t text_key(int32_t id);
uint64_t image_key(uint64_t image_hash, int64_t offset);

// The prompt's first `rows` rows (moved back to the start of an image it would cut), with the
// spans and images they hold; returns the rows kept.
int64_t keep_leading_rows(Prompt& prompt, int64_t rows);

// Appends text and images to a prompt, giving every row its key and position(s).
class PromptBuilder {
 public:
  // `components`: positions per token; `first_position`: the first token's (PaliGemma: 1).
  explicit PromptBuilder(int components = 1, int64_t first_position = 0);

  // Text tokens, at consecutive positions.
  void text(const std::vector<int32_t>& ids);
  // Image k's rows, filled with `fill_id`: at consecutive positions, or, when the plan has a
  // grid, at (s + t, s + row, s + column) where s is the next text position (M-RoPE).
  void image(size_t k, const ImagePlan& plan, int32_t fill_id);
  int64_t rows() const { return int64_t(p_.ids.size()); }
  // The prompt, with its rendered text and images.
  Prompt finish(std::string text, std::vector<ImagePlan> images);

 private:
  void push(int32_t id, uint64_t key, const std::array<int64_t, 3>& pos);
  Prompt p_;
  int64_t next_ = 0;  // next text position (largest so far + 1)
};

}  // namespace vkvlm
