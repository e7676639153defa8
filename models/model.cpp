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
#include "host/text_stream.h"
#include "models/session_run.h"

namespace vkvlm {
namespace fs = std::filesystem;
using gpu::Mat;
using gpu::Tensor;

namespace {

constexpr int64_t k_prefill_chunk = 512;  // rows per prefill forward pass (a bidirectional prefix takes one pass)
constexpr int k_candidates = 64;          // top candidates read back per sampled step

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

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
    std::string ranges;
    for (size_t i = 0; i < idx.size();) {
      size_t j = i;
      while (j + 1 < idx.size() && idx[j + 1] == idx[j] + 1) ++j;
      ranges += (ranges.empty() ? "" : ", ") + std::to_string(idx[i]) + (j > i ? "-" + std::to_string(idx[j]) : "");
      i = j + 1;
    }
    out.push_back((idx.size() == 1 ? "layer " : "layers ") + ranges + ": " + n);
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

// ---------------------------------------------------------------------------------------------
// Session

// The recordings replayed during generation: the sampling tail alone (after a prefill), and a
// whole decode step (embed the token, one forward pass, the sampling tail), with the buffers
// the host reads back.
struct Session::DecodeGraphs {
  std::unique_ptr<gpu::Recorder> tail, step;
  Tensor raw_vals, raw_ids, raw_lse;     // top raw logits (for logprobs / top_logits) and log Z
  Tensor cand_vals, cand_ids, cand_lse;  // sampling candidates and log Z at the temperature
  Tensor penalty_ids;                    // i32 [vocab], -1 where unused
  Tensor work;                           // penalized logits (or logits_ itself)
  int raw_k = 0, cand_k = 1;
  bool penalty = false, want_lse = false;
  float repeat_penalty = 1, temperature = 1;
  std::set<int32_t> seen;                // ids already in penalty_ids
};

struct Session::VerifyGraph {
  std::unique_ptr<gpu::Recorder> rec;
  Tensor ids;        // i32 [rows], host-visible: the token and the drafts
  Tensor kv_row;     // i32 [1], host-visible: the KV row of the first
  Tensor positions;  // i32 [rows, components], host-visible
  Tensor logits;     // f32 [rows, vocab], read back
  int64_t rows = 0;
};

struct Session::Drafting {
  Prompt prompt;
  std::unique_ptr<DecodeGraphs> graphs;
  std::vector<int32_t> fed;          // tokens fed after the prompt
  size_t logits_after = SIZE_MAX;    // logits_ follow this many of `fed` (SIZE_MAX: none)
};

void check_draft_model(const Model& target, const Model& draft) {
  const auto& a = target.tokenizer();
  const auto& b = draft.tokenizer();
  const int64_t va = target.config().text.vocab_size, vb = draft.config().text.vocab_size;
  auto names = [&] { return " (model " + target.dir() + ", draft " + draft.dir() + ")"; };
  if (a.vocab_size() != b.vocab_size())
    fail("the draft model's tokenizer has ", b.vocab_size(), " tokens and the model's ", a.vocab_size(),
         ": a draft must share the model's vocabulary", names());
  if (vb < a.vocab_size() || va < a.vocab_size())
    fail("the draft model's vocabulary (", vb, ") does not cover the model's tokenizer (", a.vocab_size(), " tokens)", names());
  for (const auto& t : a.added_tokens())
    if (t.special && b.token_to_id(t.content) != t.id)
      fail("the special token ", t.content, " is ", t.id, " in the model but ", b.token_to_id(t.content),
           " in the draft: a draft must share the model's vocabulary", names());
  for (const auto& t : b.added_tokens())
    if (t.special && a.token_to_id(t.content) != t.id)
      fail("the draft's special token ", t.content, " is ", t.id, " there but ", a.token_to_id(t.content),
           " in the model: a draft must share the model's vocabulary", names());
}

Session::Session(Model& model, int64_t context_tokens, bool rotating, const KvFormat& kv)
    : model_(model), ctx_(model.context()), rotating_(rotating) {
  const auto& t = model.config().text;
  if (context_tokens < 2 || context_tokens > (int64_t(1) << 30))
    fail("the context must hold between 2 and 2^30 tokens, not ", context_tokens);
  if (rotating && context_tokens <= kRotatingKeep + 1)
    fail("a rotating KV cache needs more than ", kRotatingKeep + 1, " rows, not ", context_tokens);
  if (rotating && t.smallest_window() > 0 && context_tokens > t.smallest_window())
    fail("a rotating KV cache of ", context_tokens, " rows is larger than the model's sliding window of ",
         t.smallest_window(), " tokens; use at most that");
  // Like the reference, positions past max_position_embeddings are allowed (RoPE extends to
  // them); the CLI warns when a context goes beyond what the model was trained for.
  capacity_ = context_tokens;
  cache_ = KvCache::create(ctx_, t, capacity_, kv);
  kv_row_ = ctx_.host_tensor(gpu::DType::I32, {2}, "kv row", gpu::MemoryKind::Upload);
  positions_ = ctx_.host_tensor(gpu::DType::I32, {1, t.rope.positions_per_token()}, "positions", gpu::MemoryKind::Upload);
  token_ = ctx_.host_tensor(gpu::DType::I32, {1}, "token", gpu::MemoryKind::Upload);
  logits_ = ctx_.tensor(gpu::DType::F32, {1, t.vocab_size}, "logits");
  ensure_rope(false, capacity_ + 1);
}

Session::~Session() = default;

void Session::reset() {
  wrapped_ = false;
  cached_keys_.clear();
  cached_spans_.clear();
  drafting_.reset();
}

void Session::ensure_rope(bool long_factors, int64_t positions) {
  if (rope_table_.valid() && long_factors == rope_long_ && positions <= rope_positions_) return;
  const auto& r = model_.config().text.rope;
  const int64_t rows = std::max(positions, rope_positions_);
  if (rows > (int64_t(1) << 31) - 1) fail("RoPE positions beyond 2^31 are not supported");
  const int64_t seq = long_factors ? r.original_max_position + 1 : 1;
  auto table = gpu::rope_table(rows, r.rot_dim, r.theta, r.factors_for(seq), r.attention_factor);
  if (!rope_table_.valid() || rows > rope_positions_)
    rope_table_ = ctx_.tensor(gpu::DType::F32, {rows, r.rot_dim / 2, 2}, "rope table");
  ctx_.upload(rope_table_, table.data(), table.size() * 4);
  rope_long_ = long_factors;
  rope_positions_ = rows;
}

int64_t Session::prefill(const Prompt& prompt, const std::vector<Tensor>& features, int64_t from, int64_t to,
                         const CancelCheck& cancelled) {
  const auto& lm = model_.lm();
  const int64_t E = lm.config().hidden_size, V = lm.config().vocab_size;
  const int comps = prompt.position_components;
  for (int64_t c0 = from; c0 < to;) {
    if (cancelled && c0 > from && cancelled()) return c0;
    int64_t n = std::min(k_prefill_chunk, to - c0);
    // A bidirectional span's rows see each other: a pass holds a span whole.
    n = std::min(end_outside_spans(prompt.bidirectional, c0 + n), to) - c0;
    gpu::Recorder rec(ctx_);
    std::vector<int32_t> ids(prompt.ids.begin() + c0, prompt.ids.begin() + c0 + n);
    for (auto& id : ids)
      if (id < 0 || id >= V) id = 0;  // image rows: overwritten below
    Tensor idt = rec.scratch(gpu::DType::I32, {n}, "prompt ids");
    ctx_.upload(idt, ids.data(), ids.size() * 4);
    Mat x = Mat::of(rec.scratch(gpu::DType::F32, {n, E}, "embeddings"));  // [n, E]
    lm.embed(rec, idt, 0, n, x);
    for (auto& s : prompt.spans) {
      const int64_t a = std::max(s.position, c0), b = std::min(s.position + s.length, c0 + n);
      if (a >= b) continue;
      rec.copy(features[s.image], uint64_t(a - s.position) * E * 4, x.t, uint64_t(a - c0) * E * 4, uint64_t(b - a) * E * 4);
    }
    ForwardRows rows;
    rows.kv_row = rec.scratch(gpu::DType::I32, {1}, "first kv row");
    const int32_t first = int32_t(c0);
    ctx_.upload(rows.kv_row, &first, 4);
    rows.positions = rec.scratch(gpu::DType::I32, {n, comps}, "positions");
    ctx_.upload(rows.positions, prompt.positions.data() + c0 * comps, size_t(n * comps) * 4);
    if (!prompt.bidirectional.empty()) {
      const std::vector<int32_t> pairs = span_rows(prompt.bidirectional, c0, c0 + n);
      rows.spans = rec.scratch(gpu::DType::I32, {n, 2}, "attention spans");
      ctx_.upload(rows.spans, pairs.data(), pairs.size() * 4);
    }
    Mat logits = Mat::of(logits_);
    lm.forward(rec, cache_, x, rows, rope_table_, c0 + n == to ? &logits : nullptr);
    rec.submit();
    c0 += n;
  }
  return to;
}

int64_t Session::reusable_rows(const Prompt& prompt, bool long_factors) const {
  if (long_factors != rope_long_) return 0;  // cached keys were rotated with the other factors
  // A bidirectional span's rows depend on the whole span: they are reusable only when the cached
  // rows were computed with the same span, whole.
  return rows_valid_under(cached_spans_, prompt.bidirectional, int64_t(shared_prefix(cached_keys_, prompt.keys)));
}

Session::Prepared Session::prepare(const Prompt& prompt, const CancelCheck& cancelled) {
  const int64_t N = prompt.size();
  if (N == 0) fail("the prompt is empty");
  if (N >= capacity_)
    fail("the prompt is ", N, " tokens long, which does not fit the ", rotating_ ? "rotating KV cache" : "context", " of ",
         capacity_, " tokens (raise ", rotating_ ? "--max-kv-size" : "the context size, e.g. --ctx", ")");
  const int comps = model_.config().text.rope.positions_per_token();
  if (prompt.keys.size() != prompt.ids.size() || prompt.position_components != comps ||
      prompt.positions.size() != prompt.ids.size() * size_t(comps) || !valid_spans(prompt.bidirectional, N))
    fail("internal: the prompt's rows, keys and positions disagree");
  // The RoPE table must cover every prompt position and every position decoding can reach.
  int64_t largest = prompt.next_position + (capacity_ - N);
  for (int32_t p : prompt.positions) {
    if (p < 0) fail("internal: negative RoPE position ", p);
    largest = std::max<int64_t>(largest, p);
  }
  const bool need_long = model_.config().text.rope.uses_long_factors(N);
  Prepared p;
  // Reuse the longest cached prefix (at least the last prompt row is recomputed for logits).
  p.reused = std::min(reusable_rows(prompt, need_long), N - 1);
  p.computed = N - p.reused;
  ensure_rope(need_long, largest + 1);

  cached_keys_.resize(size_t(p.reused));
  auto t_img = std::chrono::steady_clock::now();
  p.features.resize(prompt.images.size());
  for (auto& s : prompt.spans) {
    if (cancelled && cancelled()) {
      p.cancelled = true;
      return p;
    }
    if (s.position + s.length > p.reused && !p.features[s.image].valid())
      p.features[s.image] = model_.vision()->encode(prompt.images[s.image]);
  }
  p.image_seconds = seconds_since(t_img);

  auto t0 = std::chrono::steady_clock::now();
  const int64_t reached = prefill(prompt, p.features, p.reused, N, cancelled);
  // Rows are kept as far as prefill got (its passes never cut a span), with the spans they hold.
  cached_keys_.assign(prompt.keys.begin(), prompt.keys.begin() + reached);
  wrapped_ = false;  // the rows follow the conversation again
  cached_spans_ = spans_within(prompt.bidirectional, reached);
  p.cancelled = reached < N;
  p.prefill_seconds = seconds_since(t0);
  return p;
}

std::vector<float> Session::prompt_logits(const Prompt& prompt) {
  prepare(prompt);
  return ctx_.read<float>(logits_);
}

std::unique_ptr<Session::DecodeGraphs> Session::record_graphs(const Prompt& prompt, const GenerationParams& params) {
  const int64_t V = model_.config().text.vocab_size;
  auto gp = std::make_unique<DecodeGraphs>();
  DecodeGraphs& g = *gp;
  const auto& sp = params.sampling;
  g.raw_k = std::max({params.top_logprobs, params.top_logits, params.logprobs ? 1 : 0});
  g.cand_k = sp.greedy() ? 1 : k_candidates;
  g.penalty = sp.repeat_penalty != 1.0f;
  g.want_lse = !sp.greedy();
  g.repeat_penalty = sp.repeat_penalty;
  g.temperature = sp.temperature;
  auto host = [&](gpu::DType dt, int64_t n, const char* name) { return ctx_.host_tensor(dt, {1, n}, name, gpu::MemoryKind::Readback); };
  if (g.raw_k) {
    g.raw_vals = host(gpu::DType::F32, g.raw_k, "raw top values");
    g.raw_ids = host(gpu::DType::U32, g.raw_k, "raw top ids");
    g.raw_lse = host(gpu::DType::F32, 1, "raw log z");
  }
  g.cand_vals = host(gpu::DType::F32, g.cand_k, "candidate values");
  g.cand_ids = host(gpu::DType::U32, g.cand_k, "candidate ids");
  g.cand_lse = host(gpu::DType::F32, 1, "candidate log z");
  if (g.penalty) {
    // Every id seen so far: the whole cached sequence (the prompt and anything generated).
    std::vector<int32_t> list(size_t(V), -1);
    size_t n = 0;
    for (int32_t id : prompt.ids)
      if (id >= 0 && id < V && g.seen.insert(id).second) list[n++] = id;
    for (size_t r = prompt.ids.size(); r < cached_keys_.size(); ++r) {
      const int32_t id = int32_t(cached_keys_[r]);  // generated rows hold text keys
      if (id >= 0 && id < V && g.seen.insert(id).second) list[n++] = id;
    }
    g.penalty_ids = ctx_.host_tensor(gpu::DType::I32, {V}, "penalty ids", gpu::MemoryKind::Upload);
    ctx_.upload(g.penalty_ids, list.data(), list.size() * 4);
    g.work = ctx_.tensor(gpu::DType::F32, {1, V}, "penalized logits");
  } else {
    g.work = logits_;
  }
  g.tail = std::make_unique<gpu::Recorder>(ctx_);
  record_tail(*g.tail, g);
  g.tail->submit();  // evaluates the prefill's logits
  g.step = std::make_unique<gpu::Recorder>(ctx_);
  const auto& lm = model_.lm();
  Mat x = Mat::of(g.step->scratch(gpu::DType::F32, {1, lm.config().hidden_size}, "token embedding"));
  lm.embed(*g.step, token_, 0, 1, x);
  ForwardRows rows;
  rows.kv_row = kv_row_;
  rows.positions = positions_;
  rows.rotating = rotating_;
  Mat logits = Mat::of(logits_);
  lm.forward(*g.step, cache_, x, rows, rope_table_, &logits);
  record_tail(*g.step, g);
  return gp;
}

void Session::record_tail(gpu::Recorder& rec, DecodeGraphs& g) {
  const int64_t V = model_.config().text.vocab_size;
  if (g.raw_k) {
    gpu::topk(rec, Mat::of(logits_), g.raw_k, g.raw_vals, g.raw_ids);
    gpu::logsumexp(rec, Mat::of(logits_), 1.0f, g.raw_lse);
  }
  if (g.penalty) {
    rec.copy(logits_, 0, g.work, 0, logits_.bytes());
    gpu::repeat_penalty(rec, Mat::of(g.work), g.penalty_ids, V, g.repeat_penalty);
  }
  gpu::topk(rec, Mat::of(g.work), g.cand_k, g.cand_vals, g.cand_ids);
  if (g.want_lse) gpu::logsumexp(rec, Mat::of(g.work), 1.0f / g.temperature, g.cand_lse);
}

StepOutput Session::sample_step(DecodeGraphs& g, Sampler& sampler, const GenerationParams& params) {
  Candidates c;
  c.values = ctx_.read<float>(g.cand_vals);
  auto ids = ctx_.read<uint32_t>(g.cand_ids);
  c.ids.assign(ids.begin(), ids.end());
  for (auto& id : c.ids)
    if (uint32_t(id) == 0xFFFFFFFFu) id = -1;
  if (g.want_lse) c.log_norm = ctx_.read<float>(g.cand_lse)[0];
  StepOutput out;
  out.token = sampler.sample(c, [&] { return ctx_.read<float>(g.work); });
  if (g.raw_k) {
    auto rv = ctx_.read<float>(g.raw_vals);
    auto ri = ctx_.read<uint32_t>(g.raw_ids);
    const float lse = ctx_.read<float>(g.raw_lse)[0];
    float raw = NAN;
    for (int i = 0; i < g.raw_k; ++i)
      if (int32_t(ri[size_t(i)]) == out.token) raw = rv[size_t(i)];
    if (std::isnan(raw)) ctx_.download(logits_, &raw, 4, uint64_t(out.token) * 4);
    out.logprob = raw - lse;
    for (int i = 0; i < params.top_logprobs; ++i) out.top_logprobs.push_back({int32_t(ri[size_t(i)]), rv[size_t(i)] - lse});
    for (int i = 0; i < params.top_logits; ++i) out.top_logits.push_back({int32_t(ri[size_t(i)]), rv[size_t(i)]});
  }
  return out;
}

void Session::note_seen(DecodeGraphs& g, int32_t token) {
  if (g.penalty && g.seen.insert(token).second) {
    const int64_t slot = int64_t(g.seen.size()) - 1;
    ctx_.upload(g.penalty_ids, &token, 4, uint64_t(slot) * 4);
  }
}

std::unique_ptr<Session::VerifyGraph> Session::record_verify(int64_t rows) {
  const auto& lm = model_.lm();
  const int64_t V = lm.config().vocab_size, E = lm.config().hidden_size;
  const int comps = lm.config().rope.positions_per_token();
  auto v = std::make_unique<VerifyGraph>();
  v->rows = rows;
  v->ids = ctx_.host_tensor(gpu::DType::I32, {rows}, "verify ids", gpu::MemoryKind::Upload);
  v->kv_row = ctx_.host_tensor(gpu::DType::I32, {1}, "verify kv row", gpu::MemoryKind::Upload);
  v->positions = ctx_.host_tensor(gpu::DType::I32, {rows, comps}, "verify positions", gpu::MemoryKind::Upload);
  v->logits = ctx_.host_tensor(gpu::DType::F32, {rows, V}, "verify logits", gpu::MemoryKind::Readback);
  v->rec = std::make_unique<gpu::Recorder>(ctx_);
  Mat x = Mat::of(v->rec->scratch(gpu::DType::F32, {rows, E}, "verify embeddings"));  // [rows, E]
  lm.embed(*v->rec, v->ids, 0, rows, x);
  ForwardRows fr;
  fr.kv_row = v->kv_row;
  fr.positions = v->positions;
  fr.as_decode_steps = true;
  Mat logits = Mat::of(v->logits);
  lm.forward(*v->rec, cache_, x, fr, rope_table_, &logits);
  return v;
}

void Session::draft_begin(const Prompt& prompt) {
  prepare(prompt);
  drafting_ = std::make_unique<Drafting>();
  drafting_->prompt = prompt;
  drafting_->graphs = record_graphs(prompt, GenerationParams{});
  drafting_->logits_after = 0;
}

bool Session::draft_can_feed(size_t tokens) const {
  return drafting_ && drafting_->prompt.size() + int64_t(tokens) < capacity_;
}

std::vector<float> Session::draft_logits(const std::vector<int32_t>& tokens) {
  if (tokens.empty()) fail("internal: a draft needs a token to continue from");
  Drafting& d = *drafting_;
  const size_t common = shared_prefix(d.fed, tokens);
  if (!(common == tokens.size() && d.logits_after == tokens.size())) {
    // Roll back to what is shared (at least one token is fed, for its logits) and feed the rest.
    const size_t keep = std::min(common, tokens.size() - 1);
    d.fed.resize(keep);
    cached_keys_.resize(size_t(d.prompt.size()) + keep);
    const int64_t offset = d.prompt.next_position - d.prompt.size();
    for (size_t i = keep; i < tokens.size(); ++i) {
      const int64_t row = d.prompt.size() + int64_t(i);
      feed(*d.graphs, tokens[i], row, row + offset);
      d.fed.push_back(tokens[i]);
    }
    d.logits_after = tokens.size();
  }
  return ctx_.read<float>(logits_);
}

void Session::feed(DecodeGraphs& g, int32_t token, int64_t row, int64_t position) {
  stage_feed(g, token, row, position);
  g.step->replay();
  after_feed(token, row);
}

void Session::stage_feed(DecodeGraphs& g, int32_t token, int64_t row, int64_t position) {
  note_seen(g, token);
  if (position > int64_t(INT32_MAX)) fail("RoPE position ", position, " does not fit 32 bits");
  // The row this token takes, and how many rows the step sees (all written so far).
  const int32_t r[2] = {int32_t(physical_row(row)), int32_t(std::min(row + 1, capacity_))};
  std::vector<int32_t> pos(size_t(model_.config().text.rope.positions_per_token()), int32_t(position));
  ctx_.upload(token_, &token, 4);
  ctx_.upload(kv_row_, r, 8);
  ctx_.upload(positions_, pos.data(), pos.size() * 4);
}

void Session::after_feed(int32_t token, int64_t row) {
  if (row >= capacity_) {  // a rotating cache wrapped: its rows no longer follow the conversation
    wrapped_ = true;
    cached_keys_.clear();
  }
  if (!wrapped_) cached_keys_.push_back(text_key(token));
}

void Session::switch_to_long_factors(const Prompt& prompt, const std::vector<int32_t>& generated,
                                     std::vector<Tensor>& features) {
  Prompt all = prompt;
  for (int32_t t : generated) {
    all.ids.push_back(t);
    all.keys.push_back(text_key(t));
    for (int c = 0; c < all.position_components; ++c) all.positions.push_back(int32_t(all.next_position));
    ++all.next_position;
  }
  for (size_t k = 0; k < features.size(); ++k)
    if (!features[k].valid()) features[k] = model_.vision()->encode(prompt.images[k]);
  ensure_rope(true, rope_positions_);
  prefill(all, features, 0, all.size());
  cached_keys_ = all.keys;
  cached_spans_ = all.bidirectional;
}

namespace {

// Prompt lookup: the tokens that followed the last earlier occurrence of the context's final n
// tokens (up to `max`), or none. Image rows (negative here) match nothing.
std::vector<int32_t> lookup_drafts(const std::vector<int32_t>& context, int n, int max) {
  const size_t N = context.size();
  if (n <= 0 || N <= size_t(n)) return {};
  const int32_t* tail = context.data() + N - size_t(n);
  for (size_t start = N - size_t(n); start-- > 0;) {
    bool match = true;
    for (int k = 0; k < n && match; ++k) match = context[start + size_t(k)] == tail[k] && tail[k] >= 0;
    if (!match) continue;
    std::vector<int32_t> out;
    for (size_t i = start + size_t(n); i < N && out.size() < size_t(max); ++i) {
      if (context[i] < 0) break;
      out.push_back(context[i]);
    }
    if (!out.empty()) return out;  // else an image follows this match: look further back
  }
  return {};
}

// log(sum(exp(row))) in double.
double log_sum_exp(const float* row, int64_t n) {
  double m = -INFINITY;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isnan(row[i])) m = std::max(m, double(row[i]));
  double z = 0;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isnan(row[i])) z += std::exp(double(row[i]) - m);
  return m + std::log(z);
}

}  // namespace

Session::Run::Run(Session& session, const Prompt& p, const GenerationParams& gp, const StepCallback& cb)
    : s(session), prompt(p), params(gp), on_step(cb), sampler(gp.sampling), stream(session.model_.tokenizer(), gp.stop),
      eos(session.model_.eos_ids().begin(), session.model_.eos_ids().end()) {}

Session::Run::~Run() = default;

bool Session::Run::emit(StepOutput out) {
  if (res.tokens.empty()) first_token_seconds = seconds_since(t_decode);
  const int32_t token = out.token;
  res.tokens.push_back(token);
  const bool is_eos = eos.count(token) && !params.ignore_eos;
  const bool last = int64_t(res.tokens.size()) >= params.max_tokens || (!s.rotating_ && row + 1 >= s.capacity_);
  TextStream::Piece piece = stream.push(is_eos ? std::nullopt : std::optional<int32_t>(token), is_eos || last);
  out.text = piece.text;
  const bool keep_going = on_step ? on_step(out) : true;
  if (params.logprobs || params.top_logprobs || params.top_logits) res.steps.push_back(out);
  else res.steps.push_back({out.token, out.text, 0, {}, {}});
  if (is_eos || piece.stop) {
    res.finish_reason = "stop";
    return false;
  }
  if (!keep_going) {
    res.finish_reason = "cancelled";
    return false;
  }
  return !last;
}

bool Session::Run::stage(int32_t token) {
  const auto& rope = s.model_.config().text.rope;
  if (rope.uses_long_factors(row + 1) != s.rope_long_ && row + 1 >= s.capacity_) {
    // A rotating cache past its rows cannot be recomputed: new tokens take the long factors
    // (as mlx-lm does), the kept rows stay as they were computed.
    s.ensure_rope(true, s.rope_positions_);
  } else if (rope.uses_long_factors(row + 1) != s.rope_long_) {
    s.switch_to_long_factors(prompt, res.tokens, prep.features);
    graphs = s.record_graphs(prompt, params);
    ++graphs_version;
    row = prompt.size() + int64_t(res.tokens.size());
    return false;
  }
  s.stage_feed(*graphs, token, row, row + position_offset);
  return true;
}

void Session::Run::fed(int32_t token) {
  s.after_feed(token, row);
  ++row;
}

void Session::Run::feed_one(int32_t token) {
  if (!stage(token)) return;
  graphs->step->replay();
  fed(token);
}

void Session::Run::next() { going = emit(s.sample_step(*graphs, sampler, params)); }

GenerationResult Session::Run::finish() {
  res.text = stream.text();
  res.decode_seconds = seconds_since(t_decode) - first_token_seconds;
  return std::move(res);
}

std::unique_ptr<Session::Run> Session::start(const Prompt& prompt, const GenerationParams& params,
                                             const StepCallback& on_step, const CancelCheck& cancelled, bool first_token) {
  params.validate();
  auto run = std::make_unique<Run>(*this, prompt, params, on_step);
  GenerationResult& res = run->res;
  res.prompt_tokens = prompt.ids;
  run->prep = prepare(prompt, cancelled);
  res.cached_tokens = run->prep.reused;
  res.prefill_tokens = run->prep.computed;
  res.image_seconds = run->prep.image_seconds;
  res.prefill_seconds = run->prep.prefill_seconds;
  run->t_decode = std::chrono::steady_clock::now();
  if (run->prep.cancelled) {
    res.finish_reason = "cancelled";
    return run;
  }
  // A rotating cache's positions go on past its rows: the RoPE table covers the whole answer.
  if (rotating_) ensure_rope(rope_long_, prompt.next_position + int64_t(params.max_tokens) + 1);
  run->graphs = record_graphs(prompt, params);
  run->position_offset = prompt.next_position - prompt.size();
  run->row = prompt.size();
  run->t_decode = std::chrono::steady_clock::now();
  res.finish_reason = "length";
  if (first_token && params.max_tokens > 0) run->next();
  return run;
}

GenerationResult Session::generate(const Prompt& prompt, const GenerationParams& params, const StepCallback& on_step,
                                   const CancelCheck& cancelled, const Speculation& speculation) {
  const bool speculative = speculation.draft || params.lookup_ngram > 0;
  if (speculation.draft && !speculation.draft_prompt) fail("internal: a draft session needs the draft's prompt");
  if (speculation.draft == this) fail("internal: a session cannot draft for itself");
  const auto& rope = model_.config().text.rope;
  const int64_t N = prompt.size();
  const int64_t V = model_.config().text.vocab_size;
  auto run = start(prompt, params, on_step, cancelled, !speculative);
  if (run->res.finish_reason == "cancelled") return run->finish();
  GenerationResult& res = run->res;
  int64_t& row = run->row;
  auto& graphs = run->graphs;
  Sampler& sampler = run->sampler;
  auto emit = [&](StepOutput out) { return run->emit(std::move(out)); };
  auto feed_one = [&](int32_t token) { run->feed_one(token); };
  const int64_t position_offset = run->position_offset;

  if (!speculative) {
    while (run->going) {
      run->feed_one(res.tokens.back());
      run->next();
    }
  } else if (params.max_tokens > 0) {
    const int D = params.num_draft_tokens;
    // Verification passes by row count (the drafts and the token before them), recorded when
    // first needed: a round with fewer drafts computes fewer rows.
    std::vector<std::unique_ptr<VerifyGraph>> verifies(size_t(D + 2));
    SamplingParams draft_sampling = params.sampling;
    draft_sampling.seed = params.sampling.seed + 1;
    Sampler draft_sampler(draft_sampling);
    if (speculation.draft) speculation.draft->draft_begin(*speculation.draft_prompt);
    // The context prompt lookup searches: the prompt's text tokens, then what is generated.
    std::vector<int32_t> context;
    if (params.lookup_ngram > 0)
      for (int64_t r = 0; r < N; ++r) context.push_back(prompt.keys[size_t(r)] == text_key(prompt.ids[size_t(r)]) ? prompt.ids[size_t(r)] : -1);
    const double penalty = params.sampling.repeat_penalty;
    bool going = emit(sample_step(*graphs, sampler, params));  // the first token, from the prefill's logits
    while (going) {
      const int32_t x = res.tokens.back();  // chosen, not yet fed
      // Drafts, when the verification pass fits the context and the RoPE factors stay.
      std::vector<int32_t> drafts;
      std::vector<std::vector<double>> q;
      const bool room = row + D + 1 < capacity_ && rope.uses_long_factors(row + D + 1) == rope_long_ &&
                        int64_t(res.tokens.size()) < params.max_tokens;
      if (room && speculation.draft && speculation.draft->draft_can_feed(res.tokens.size() + size_t(D))) {
        std::vector<int32_t> seq = res.tokens;
        for (int i = 0; i < D; ++i) {
          q.push_back(draft_sampler.distribution(speculation.draft->draft_logits(seq)));
          drafts.push_back(draft_sampler.draw(q.back()));
          seq.push_back(drafts.back());
        }
      } else if (room && params.lookup_ngram > 0) {
        context.push_back(x);
        drafts = lookup_drafts(context, params.lookup_ngram, D);
        context.pop_back();
        for (int32_t d : drafts) {
          q.emplace_back(size_t(V), 0.0);
          if (d >= 0 && d < V) q.back()[size_t(d)] = 1.0;
        }
      }
      if (drafts.empty()) {  // one plain step
        feed_one(x);
        if (params.lookup_ngram > 0) context.push_back(x);
        going = emit(sample_step(*graphs, sampler, params));
        continue;
      }
      // Verify x and the drafts in one pass: row i's logits follow x, d_1 .. d_i.
      const int R = int(drafts.size()) + 1;
      auto& verify = verifies[size_t(R)];
      if (!verify) verify = record_verify(R);
      std::vector<int32_t> ids(size_t(R), 0);
      ids[0] = x;
      for (size_t i = 0; i < drafts.size(); ++i) ids[i + 1] = drafts[i] >= 0 && drafts[i] < V ? drafts[i] : 0;
      const int comps = prompt.position_components;
      std::vector<int32_t> pos(size_t(R * comps));
      for (int i = 0; i < R; ++i)
        for (int c = 0; c < comps; ++c) pos[size_t(i * comps + c)] = int32_t(row + i + position_offset);
      const int32_t first_row = int32_t(row);
      ctx_.upload(verify->ids, ids.data(), ids.size() * 4);
      ctx_.upload(verify->kv_row, &first_row, 4);
      ctx_.upload(verify->positions, pos.data(), pos.size() * 4);
      verify->rec->replay();
      const std::vector<float> logits = ctx_.read<float>(verify->logits);  // [R, V]
      // The model's distribution after each prefix, the repetition penalty counting the drafts
      // before it (as if they had been fed one at a time).
      std::vector<std::vector<double>> p;
      std::set<int32_t> seen = graphs->seen;
      for (size_t i = 0; i <= drafts.size(); ++i) {
        seen.insert(ids[i]);
        std::vector<float> r(logits.begin() + int64_t(i) * V, logits.begin() + int64_t(i + 1) * V);
        if (penalty != 1.0)
          for (int32_t id : seen)
            if (id >= 0 && id < V) r[size_t(id)] = r[size_t(id)] < 0 ? r[size_t(id)] * float(penalty) : r[size_t(id)] / float(penalty);
        p.push_back(sampler.distribution(r));
      }
      const std::vector<int32_t> chosen = speculative_accept(p, q, drafts, sampler);
      const size_t accepted = chosen.size() - 1;
      res.draft_tokens += int64_t(drafts.size());
      res.accepted_tokens += int64_t(accepted);
      // x's row is now in the cache; so is each accepted draft's, once the one after it is emitted.
      auto commit = [&](int32_t token) {
        cached_keys_.push_back(text_key(token));
        note_seen(*graphs, token);
        if (params.lookup_ngram > 0) context.push_back(token);
        ++row;
      };
      commit(x);
      for (size_t i = 0; i < chosen.size() && going; ++i) {
        StepOutput out;
        out.token = chosen[i];
        if (params.logprobs || params.top_logprobs || params.top_logits) {
          const float* raw = logits.data() + int64_t(i) * V;
          const double lse = log_sum_exp(raw, V);
          out.logprob = float(double(raw[out.token]) - lse);
          const int k = std::max(params.top_logprobs, params.top_logits);
          std::vector<int32_t> order(static_cast<size_t>(V));
          std::iota(order.begin(), order.end(), 0);
          std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
            return raw[a] > raw[b] || (raw[a] == raw[b] && a < b);
          });
          for (int j = 0; j < params.top_logprobs; ++j)
            out.top_logprobs.push_back({order[size_t(j)], float(double(raw[order[size_t(j)]]) - lse)});
          for (int j = 0; j < params.top_logits; ++j) out.top_logits.push_back({order[size_t(j)], raw[order[size_t(j)]]});
        }
        going = emit(out);
        if (going && i < accepted) commit(chosen[i]);
      }
    }
  }
  return run->finish();
}

}  // namespace vkvlm
