#pragma once
// JSON from outside (request bodies, batch lines, model folders, hub answers, cache headers) is
// parsed with its nesting bounded first, before anything is built, so that no later recursive
// walk of it (dump, copy, comparison, a template) can run out of stack.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include <nlohmann/json.hpp>

namespace vkvlm {

// Deeper than this, arrays and objects in JSON input are refused (real inputs nest a few levels;
// a tool's JSON Schema a few dozen).
inline constexpr int k_max_json_depth = 256;

// The offset of the bracket where arrays and objects in `text` nest deeper than max_depth
// (brackets inside strings do not count), or npos: a linear scan, no parsing.
size_t json_too_deep_at(std::string_view text, int max_depth = k_max_json_depth);
// How many values (every scalar, array, object and key) parsing `text` would build: the same
// linear scan, for planning the memory a parse takes.
uint64_t json_value_count(std::string_view text);

// Json::parse(text) (Json: nlohmann::json or ordered_json), first refusing nesting deeper than
// k_max_json_depth with a parse error of its own, which callers handle as any other.
template <typename Json = nlohmann::json>
Json parse_json(std::string_view text) {
  if (const size_t at = json_too_deep_at(text); at != std::string_view::npos)
    throw Json::parse_error::create(101, at + 1,
                                    "arrays and objects nest deeper than " + std::to_string(k_max_json_depth) + " levels",
                                    nullptr);
  return Json::parse(text);
}

}  // namespace vkvlm
