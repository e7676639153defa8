#include "models/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <sstream>

#include "base/files.h"
#include "gpu/error.h"
#include "gpu/recorder.h"

namespace vkvlm {
namespace fs = std::filesystem;

namespace {

// An image_url part's URL: "image_url": "..." or {"url": "..."}.
std::string image_url_of(const Messages& part) {
  if (!part.contains("image_url")) return "";
  const auto& iu = part["image_url"];
  if (iu.is_string()) return iu.get<std::string>();
  if (iu.is_object() && iu.contains("url") && iu["url"].is_string()) return iu["url"].get<std::string>();
  return "";
}

// `vkvlm info`'s lines for the decoder's kinds of layers: each distinct set of traits, how many
// layers have it and which ("layers 0-4, 6: sliding window 512, GeGLU").
std::vector<std::string> layer_kinds(const TextConfig& t) {
  auto name = [](const LayerTraits& l) {
    std::string s = l.window > 0 ? "sliding window " + std::to_string(l.window) : std::string("global attention");
    return s + (l.activation == MlpActivation::GeluTanh ? ", GeGLU MLP" : ", SwiGLU MLP");
  };
  std::vector<std::pair<std::string, std::vector<int>>> kinds;  // in order of first appearance
  for (size_t i = 0; i < t.layers.size(); ++i) {
    const std::string n = name(t.layers[i]);
    auto it = std::find_if(kinds.begin(), kinds.end(), [&](const auto& k) { return k.first == n; });
    if (it == kinds.end()) it = kinds.insert(kinds.end(), {n, {}});
    it->second.push_back(int(i));
  }
  std::vector<std::string> out;
  for (const auto& [n, idx] : kinds) {
    std::ostringstream line;
    line << (idx.size() == 1 ? "layer " : "layers ");
    for (size_t i = 0; i < idx.size();) {
      size_t j = i;
      while (j + 1 < idx.size() && idx[j + 1] == idx[j] + 1) ++j;
      line << (i ? ", " : "") << idx[i];
      if (j > i) line << "-" << idx[j];
      i = j + 1;
    }
    line << ": " << n;
    out.push_back(line.str());
  }
  return out;
}

}  // namespace

std::string default_model_dir() {
  if (const char* env = std::getenv("VKVLM_MODEL"); env && *env) return env;
  std::vector<fs::path> candidates;
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    candidates.push_back(exe.parent_path() / "../models/shapes-llava");
    candidates.push_back(exe.parent_path() / "../share/vkvlm/models/shapes-llava");
  }
  candidates.push_back(fs::path(VKVLM_SOURCE_DIR) / "models/shapes-llava");
  for (auto& c : candidates)
    if (fs::exists(c / "config.json", ec)) return fs::weakly_canonical(c, ec).string();
  fail("no --model given and the bundled demo model (models/shapes-llava) was not found; pass --model DIR");
}

uint64_t hash_bytes(const void* data, size_t n, uint64_t seed) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t h = seed;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

void GenerationParams::validate() const {
  if (max_tokens < 0 || max_tokens > (1 << 24)) fail("max_tokens must be between 0 and 16777216, not ", max_tokens);
  sampling.validate();
  if (top_logprobs < 0 || top_logprobs > 20) fail("top_logprobs must be between 0 and 20, not ", top_logprobs);
  if (top_logits < 0 || top_logits > 64) fail("top_logits must be between 0 and 64, not ", top_logits);
  for (auto& s : stop)
    if (s.empty()) fail("stop strings must not be empty");
  if (num_draft_tokens < 1 || num_draft_tokens > 16) fail("num_draft_tokens must be between 1 and 16, not ", num_draft_tokens);
  if (lookup_ngram < 0 || lookup_ngram > 16) fail("lookup_ngram must be between 0 (off) and 16, not ", lookup_ngram);
}

// ---------------------------------------------------------------------------------------------
// Model

Model::Model(gpu::Context& ctx, const std::string& dir, LoadOptions options) : ctx_(ctx) {
  cfg_ = load_model_config(dir);
  const fs::path d(dir);
  std::error_code ec;
  if (!fs::exists(d / "tokenizer.json", ec)) fail("model folder ", dir, " has no tokenizer.json");
  tok_ = std::make_unique<Tokenizer>(Tokenizer::from_file((d / "tokenizer.json").string()));
  if (tok_->vocab_size() > cfg_.text.vocab_size)
    fail("tokenizer.json of ", dir, " has ", tok_->vocab_size(), " tokens but the model's vocabulary is ", cfg_.text.vocab_size);

  template_ = ChatTemplate::from_model_dir(dir);

  for (auto id : cfg_.eos_token_ids)
    if (id < cfg_.text.vocab_size) eos_.push_back(int32_t(id));
  if (eos_.empty())
    if (auto& s = template_.eos_token())
      if (int32_t id = tok_->token_to_id(*s); id >= 0) eos_.push_back(id);

  store_ = options.weights ? options.weights : std::make_shared<const TensorStore>(TensorStore::open_directory(dir));
  WeightLoader loader(ctx_, *store_, cfg_, options);
  lm_ = std::make_unique<LanguageModel>(ctx_, cfg_.text, loader);
  vision_ = cfg_.arch->load_vision(ctx_, cfg_, loader);
  loader.finish_progress();

  // Cheap to compute (a few KiB per tensor), yet two checkpoints of one shape differ in it.
  uint64_t h = hash_bytes(options.quantize.data(), options.quantize.size());
  const std::string config = read_file_bounded((d / "config.json").string(), 16u << 20, "config.json");
  h = hash_bytes(config.data(), config.size(), h);
  h = hash_bytes(&cfg_.text.vocab_size, sizeof(cfg_.text.vocab_size), h);
  const int64_t tokens = tok_->vocab_size();
  h = hash_bytes(&tokens, sizeof(tokens), h);
  for (const auto& name : store_->names()) {
    const StTensor& t = store_->get(name);
    h = hash_bytes(name.data(), name.size(), h);
    const std::string desc = std::string(st_dtype_name(t.dtype)) + t.shape_string();
    h = hash_bytes(desc.data(), desc.size(), h);
    const uint64_t sample = 1024;
    for (uint64_t at : {uint64_t(0), t.bytes / 2, t.bytes > sample ? t.bytes - sample : 0})
      h = hash_bytes(t.data + at, size_t(std::min(sample, t.bytes - at)), h);
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  fingerprint_ = hex;
}

Model::~Model() = default;

uint64_t Model::weight_bytes() const { return lm_->weight_bytes() + (vision_ ? vision_->weight_bytes() : 0); }

std::string Model::render_chat(const Messages& messages, bool add_generation_prompt, const nlohmann::json& vars) const {
  return template_.render(messages, add_generation_prompt, Messages(vars));
}

std::vector<ImageSlot> image_slots(const ModelConfig& cfg, const Messages& messages) {
  std::vector<ImageSlot> slots;
  if (!messages.is_array()) return slots;
  auto placeholders = [&](const std::string& text) {
    for (size_t n = cfg.arch->count_placeholders(cfg, text); n > 0; --n) slots.push_back({ImageSlot::Kind::Placeholder, ""});
  };
  for (const auto& m : messages) {
    if (!m.is_object() || !m.contains("content")) continue;
    const auto& c = m["content"];
    if (c.is_string()) placeholders(c.get<std::string>());
    if (!c.is_array()) continue;
    for (const auto& part : c) {
      if (!part.is_object() || !part.contains("type") || !part["type"].is_string()) continue;
      const std::string type = part["type"].get<std::string>();
      if (type == "text" && part.contains("text") && part["text"].is_string()) placeholders(part["text"].get<std::string>());
      else if (type == "image") slots.push_back({ImageSlot::Kind::Part, ""});
      else if (type == "image_url") slots.push_back({ImageSlot::Kind::Url, image_url_of(part)});
    }
  }
  return slots;
}

Prompt Model::build_draft_prompt(const Messages& messages, const std::vector<Image>& images, const nlohmann::json& vars) const {
  if (vision_) return build_prompt(messages, images, vars);
  // A text-only draft sees the conversation's text: image parts go.
  Messages text = messages;
  for (auto& m : text)
    if (m.is_object() && m.contains("content") && m["content"].is_array()) {
      Messages kept = Messages::array();
      for (auto& part : m["content"])
        if (part.is_object() && part.value("type", "") == "text") kept.push_back(part);
      m["content"] = kept;
    }
  return build_prompt(text, {}, vars);
}

Prompt Model::build_prompt(const Messages& messages, const std::vector<Image>& images, const nlohmann::json& vars,
                           bool add_generation_prompt) const {
  if (!messages.is_array() || messages.empty()) fail("messages must be a non-empty list");
  // Image parts become {"type": "image"}, the form the chat templates expect.
  Messages norm = Messages::array();
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    if (!m.is_object()) fail("message ", i, " is not an object");
    if (!m.contains("role") || !m["role"].is_string()) fail("message ", i, " has no role string");
    Messages out = m;
    if (m.contains("content") && m["content"].is_array()) {
      Messages parts = Messages::array();
      for (size_t k = 0; k < m["content"].size(); ++k) {
        const auto& part = m["content"][k];
        if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
          fail("message ", i, " content part ", k, " has no type");
        const std::string type = part["type"].get<std::string>();
        if (type == "text") {
          if (!part.contains("text") || !part["text"].is_string()) fail("message ", i, " text part ", k, " has no text string");
          parts.push_back(part);
        } else if (type == "image" || type == "image_url") {
          parts.push_back(Messages{{"type", "image"}});
        } else {
          fail("message ", i, " content part ", k, " has type '", type, "' (text, image and image_url are supported)");
        }
      }
      out["content"] = parts;
    } else if (m.contains("content") && !m["content"].is_string() && !m["content"].is_null()) {
      fail("message ", i, " content must be a string or a list of parts");
    }
    norm.push_back(out);
  }
  if (!images.empty() && !vision_) fail("model ", cfg_.dir, " is a text model and cannot take images");
  const auto slots = image_slots(messages);
  size_t parts = 0;
  for (auto& s : slots) parts += s.kind != ImageSlot::Kind::Placeholder;
  const size_t placeholders = slots.size() - parts;
  if (parts && parts == placeholders && images.size() == parts) {
    // The placeholders say where the images go; the parts only carried them.
    for (auto& m : norm)
      if (m.contains("content") && m["content"].is_array()) {
        Messages kept = Messages::array();
        for (auto& part : m["content"])
          if (part["type"] != "image") kept.push_back(part);
        m["content"] = kept;
      }
  } else if (slots.size() != images.size()) {
    fail("the conversation has ", parts, " image part(s) and ", placeholders, " image placeholder(s) in its text, but ",
         images.size(), " image(s) were given");
  }
  std::vector<ImagePlan> plans;
  for (auto& img : images) plans.push_back(vision_->plan(img));
  PromptTools tools{cfg_, *tok_, [&](const Messages& msgs) { return render_chat(msgs, add_generation_prompt, vars); }};
  Prompt p = cfg_.arch->build_prompt(tools, norm, std::move(plans));
  if (p.keys.size() != p.ids.size() || p.positions.size() != p.ids.size() * size_t(p.position_components))
    fail("internal: the prompt's rows, keys and positions disagree");
  if (p.position_components != cfg_.text.rope.positions_per_token())
    fail("internal: the prompt has ", p.position_components, " position(s) per token; the model takes ",
         cfg_.text.rope.positions_per_token());
  return p;
}

Prompt Model::build_cacheable_prompt(const Messages& messages, const std::vector<Image>& images,
                                     const nlohmann::json& vars) const {
  Prompt p = build_prompt(messages, images, vars, /*add_generation_prompt=*/false);
  const Prompt asked = build_prompt(messages, images, vars, /*add_generation_prompt=*/true);
  int64_t shared = int64_t(shared_prefix(p.keys, asked.keys));
  // A bidirectional span is cacheable whole or not at all.
  for (const BidirectionalSpan& b : p.bidirectional)
    if (b.begin < shared && shared < b.end) shared = b.begin;
  if (keep_leading_rows(p, shared) == 0)
    fail("the conversation has no prefix that its continuations keep (its template renders it differently when it goes on)");
  return p;
}

Prompt Model::build_raw_prompt(const std::string& text) const {
  PromptBuilder b(cfg_.text.rope.positions_per_token());
  b.text(tok_->encode(text, true));
  return b.finish(text, {});
}

std::string Model::info(int64_t context_tokens, const KvFormat& kv_format) const {
  std::ostringstream os;
  const auto& t = cfg_.text;
  auto gb = [](uint64_t b) {
    std::ostringstream s;
    s.precision(3);
    s << double(b) / 1e9 << " GB";
    return s.str();
  };
  os << "model: " << cfg_.dir << "\n";
  os << "architecture: " << cfg_.model_type << (cfg_.architecture.empty() ? "" : " (" + cfg_.architecture + ")")
     << (cfg_.arch->prefix_lm() ? ", prefix-LM attention over the prompt" : "") << "\n";
  os << "language model: " << t.family << ", " << t.num_layers << " layers, hidden " << t.hidden_size << ", MLP "
     << t.intermediate_size << ", " << t.num_heads
     << " heads (" << t.num_kv_heads << " KV) of " << t.head_dim << ", vocabulary " << t.vocab_size << ", max positions "
     << t.max_position << ", rope " << t.rope.type << " theta " << t.rope.theta;
  if (!t.rope.sections.empty()) {
    os << ", M-RoPE sections";
    for (int s : t.rope.sections) os << " " << s;
  }
  os << "\n";
  for (const std::string& kind : layer_kinds(t)) os << "  " << kind << "\n";
  if (vision_)
    for (auto& line : vision_->describe()) os << line << "\n";
  os << "weights: " << lm_->format_summary() << " (language model); " << gb(weight_bytes()) << " on the GPU\n";
  if (cfg_.quantization.spec.bits)
    os << "checkpoint quantization: MLX " << cfg_.quantization.spec.bits << "-bit, group " << cfg_.quantization.spec.group_size
       << "\n";
  kv_format.check(t);
  const uint64_t kv = kv_format.bytes(t, context_tokens);
  os << "KV cache: " << gb(kv) << " for " << context_tokens << " tokens (" << kv_format.describe() << "; "
     << kv_format.bytes(t, 1) << " bytes per token)\n";
  os << "KV cache per setting (--kv-bits, --kv-group-size):";
  for (int bits : {16, 8, 4})
    for (int group : {64, 32}) {
      KvFormat f;
      f.bits = bits;
      f.group_size = group;
      if ((bits == 16 && group == 32) || (f.quantized() && t.head_dim % group)) continue;
      os << (bits == 16 ? " " : ", ") << f.describe() << " " << gb(f.bytes(t, context_tokens));
    }
  os << "\n";
  os << "memory needed: about " << gb(weight_bytes() + kv) << " plus activations\n";
  os << "tokenizer: " << tok_->vocab_size() << " tokens; chat template: " << (template_.available() ? "yes" : "no") << "\n";
  return os.str();
}

}  // namespace vkvlm
