#pragma once
// One line of `vkvlm generate --batch FILE.jsonl`: {"prompt": TEXT | "messages": [...], "images":
// [PATH...], "id": ANY, and the sampling fields}. Parsed (nesting bounded first) and checked
// without the model, so that a bad line is named before anything loads; errors say what is wrong
// with the line, and the caller adds where it is.
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/model.h"

namespace vkvlm {

struct BatchLine {
  nlohmann::ordered_json id;          // echoed in the output (null when the line gives none)
  std::optional<std::string> prompt;  // one user turn, or
  Messages messages;                  // a conversation (checked: non-empty, each with role and content)
  std::vector<std::string> images;    // file paths
  GenerationParams params;            // `defaults` with the line's fields applied
};

// Whether `line` holds nothing but whitespace (it is skipped).
bool batch_line_blank(const std::string& line);
BatchLine parse_batch_line(const std::string& line, const GenerationParams& defaults);

// A conversation's shape: a non-empty array of {"role": string, "content": ...}; `what` names it
// in errors ("messages file F", "\"messages\"").
void check_messages(const Messages& messages, const std::string& what);

}  // namespace vkvlm
