#include "models/prompt.h"

#include <algorithm>
#include <limits>

#include "base/error.h"

namespace vkvlm {

uint64_t text_key(int32_t id) { return uint64_t(uint32_t(id)); }

uint64_t image_key(uint64_t image_hash, int64_t offset) {
  uint64_t h = image_hash ^ (uint64_t(offset) * 0x9E3779B97F4A7C15ull);
  h ^= h >> 29;
  return h | (1ull << 63);
}

PromptBuilder::PromptBuilder(int components, int64_t first_position) : next_(first_position) {
  if (components < 1 || components > 3) fail("internal: 1 to 3 positions per token, not ", components);
  p_.position_components = components;
}

void PromptBuilder::push(int32_t id, uint64_t key, const std::array<int64_t, 3>& pos) {
  p_.ids.push_back(id);
  p_.keys.push_back(key);
  for (int c = 0; c < p_.position_components; ++c) {
    if (pos[size_t(c)] > std::numeric_limits<int32_t>::max()) fail("the prompt's positions do not fit 32 bits");
    p_.positions.push_back(int32_t(pos[size_t(c)]));
  }
}

void PromptBuilder::text(const std::vector<int32_t>& ids) {
  for (int32_t id : ids) {
    push(id, text_key(id), {next_, next_, next_});
    ++next_;
  }
}

void PromptBuilder::image(size_t k, const ImagePlan& plan, int32_t fill_id) {
  ImageSpan span{rows(), plan.tokens, k};
  const auto [gt, gh, gw] = plan.grid;
  if (gt > 0) {
    if (int64_t(gt) * gh * gw != plan.tokens) fail("internal: image grid ", gt, "x", gh, "x", gw, " holds ", plan.tokens, " tokens");
    const int64_t s = next_;
    int64_t largest = s;
    int64_t offset = 0;
    for (int t = 0; t < gt; ++t)
      for (int r = 0; r < gh; ++r)
        for (int c = 0; c < gw; ++c, ++offset) {
          push(fill_id, image_key(plan.hash, offset), {s + t, s + r, s + c});
          largest = std::max({largest, s + t, s + r, s + c});
        }
    next_ = largest + 1;
  } else {
    for (int64_t t = 0; t < plan.tokens; ++t) {
      push(fill_id, image_key(plan.hash, t), {next_, next_, next_});
      ++next_;
    }
  }
  p_.spans.push_back(span);
}

Prompt PromptBuilder::finish(std::string text, std::vector<ImagePlan> images) {
  Prompt p = std::move(p_);
  p.text = std::move(text);
  p.images = std::move(images);
  p.next_position = next_;
  for (auto& s : p.spans)
    if (s.image >= p.images.size()) fail("internal: prompt span for image ", s.image, " of ", p.images.size());
  return p;
}

int64_t keep_leading_rows(Prompt& p, int64_t rows) {
  rows = std::clamp<int64_t>(rows, 0, p.size());
  for (const auto& s : p.spans)
    if (s.position < rows && rows < s.position + s.length) rows = s.position;
  p.ids.resize(size_t(rows));
  p.keys.resize(size_t(rows));
  p.positions.resize(size_t(rows) * size_t(p.position_components));
  std::vector<ImageSpan> spans;
  for (const auto& s : p.spans)
    if (s.position + s.length <= rows) spans.push_back(s);
  p.spans = std::move(spans);
  // A span cut short is still whole in what is kept (a shorter prefix); spans past it go.
  std::vector<BidirectionalSpan> kept;
  for (BidirectionalSpan b : p.bidirectional)
    if (b.begin < rows) kept.push_back({b.begin, std::min(b.end, rows)});
  p.bidirectional = std::move(kept);
  return rows;
}

bool valid_spans(const std::vector<BidirectionalSpan>& spans, int64_t rows) {
  int64_t end = 0;
  for (const BidirectionalSpan& b : spans) {
    if (b.begin < end || b.end <= b.begin || b.end > rows) return false;
    end = b.end;
  }
  return true;
}

int64_t rows_valid_under(const std::vector<BidirectionalSpan>& cached, const std::vector<BidirectionalSpan>& spans,
                         int64_t common) {
  int64_t valid = common;
  for (const auto* list : {&cached, &spans})
    for (const BidirectionalSpan& b : *list) {
      if (b.begin >= valid) break;
      const bool both = std::find(cached.begin(), cached.end(), b) != cached.end() &&
                        std::find(spans.begin(), spans.end(), b) != spans.end();
      if (!both || b.end > common) valid = b.begin;
    }
  return valid;
}

std::vector<BidirectionalSpan> spans_within(const std::vector<BidirectionalSpan>& spans, int64_t rows) {
  std::vector<BidirectionalSpan> out;
  for (const BidirectionalSpan& b : spans)
    if (b.end <= rows) out.push_back(b);
  return out;
}

int64_t end_outside_spans(const std::vector<BidirectionalSpan>& spans, int64_t to) {
  for (const BidirectionalSpan& b : spans)
    if (b.begin < to && to < b.end) return b.end;
  return to;
}

std::vector<int32_t> span_rows(const std::vector<BidirectionalSpan>& spans, int64_t from, int64_t to) {
  std::vector<int32_t> out(size_t(2 * (to - from)), 0);
  for (const BidirectionalSpan& b : spans)
    for (int64_t r = std::max(b.begin, from); r < std::min(b.end, to); ++r) {
      out[size_t(2 * (r - from))] = int32_t(b.begin);
      out[size_t(2 * (r - from) + 1)] = int32_t(b.end);
    }
  return out;
}

}  // namespace vkvlm
