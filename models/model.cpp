#include "models/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "gpu/error.h"
#include "host/unicode.h"

namespace vkvlm {
namespace fs = std::filesystem;
using gpu::Mat;
using gpu::Tensor;

namespace {

constexpr int64_t k_prefill_chunk = 512;  // tokens per prefill forward pass
constexpr int k_candidates = 64;          // top candidates read back per sampled step

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

nlohmann::ordered_json read_json_file(const fs::path& p) {
  std::ifstream in(p);
  if (!in) fail("cannot read ", p.string());
  try {
    return nlohmann::ordered_json::parse(in);
  } catch (const std::exception& e) {
    fail(p.string(), " is not valid JSON: ", e.what());
  }
}

// A special token in tokenizer_config.json: a string, or {"content": "..."}.
std::optional<std::string> token_string(const nlohmann::ordered_json& cfg, const char* key) {
  if (!cfg.contains(key)) return std::nullopt;
  const auto& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

// Identity of a prompt position for KV reuse: text tokens by id, image positions by image and offset.
uint64_t text_key(int32_t id) { return uint64_t(uint32_t(id)); }
uint64_t image_key(uint64_t image_hash, int64_t offset) {
  uint64_t h = image_hash ^ (uint64_t(offset) * 0x9E3779B97F4A7C15ull);
  h ^= h >> 29;
  return h | (1ull << 63);
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
  if (max_tokens < 0) fail("max_tokens must be >= 0, not ", max_tokens);
  sampling.validate();
  if (top_logprobs < 0 || top_logprobs > 20) fail("top_logprobs must be between 0 and 20, not ", top_logprobs);
  if (top_logits < 0 || top_logits > 64) fail("top_logits must be between 0 and 64, not ", top_logits);
  for (auto& s : stop)
    if (s.empty()) fail("stop strings must not be empty");
}

// ---------------------------------------------------------------------------------------------
// Model

Model::Model(gpu::Context& ctx, const std::string& dir, LoadOptions options) : ctx_(ctx) {
  cfg_ = load_model_config(dir);
  const fs::path d(dir);
  std::error_code ec;
  if (!fs::exists(d / "tokenizer.json", ec)) fail("model folder ", dir, " has no tokenizer.json");
  tok_ = std::make_unique<Tokenizer>(Tokenizer::from_file((d / "tokenizer.json").string()));

  // Chat template: chat_template.jinja, then chat_template.json, then tokenizer_config.json.
  nlohmann::ordered_json tcfg = nlohmann::ordered_json::object();
  if (fs::exists(d / "tokenizer_config.json", ec)) tcfg = read_json_file(d / "tokenizer_config.json");
  std::string source, where;
  if (fs::exists(d / "chat_template.jinja", ec)) {
    std::ifstream in(d / "chat_template.jinja");
    source.assign(std::istreambuf_iterator<char>(in), {});
    where = "chat_template.jinja";
  } else if (fs::exists(d / "chat_template.json", ec)) {
    auto j = read_json_file(d / "chat_template.json");
    if (j.contains("chat_template") && j["chat_template"].is_string()) source = j["chat_template"].get<std::string>();
    where = "chat_template.json";
  } else if (tcfg.contains("chat_template")) {
    const auto& t = tcfg["chat_template"];
    if (t.is_string()) {
      source = t.get<std::string>();
    } else if (t.is_array()) {
      for (auto& e : t)
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template")) source = e["template"].get<std::string>();
    }
    where = "tokenizer_config.json chat_template";
  }
  if (!source.empty()) template_ = std::make_unique<jinja::Template>(source, (d / where).string());
  for (const char* k : {"bos_token", "eos_token", "unk_token", "pad_token"})
    if (auto s = token_string(tcfg, k)) template_tokens_[k] = jinja::Value(*s);

  for (auto id : cfg_.eos_token_ids) eos_.push_back(int32_t(id));
  if (eos_.empty())
    if (auto s = token_string(tcfg, "eos_token"))
      if (int32_t id = tok_->token_to_id(*s); id >= 0) eos_.push_back(id);
  add_special_tokens_ = cfg_.is_vlm();

  store_ = std::make_unique<TensorStore>(TensorStore::open_directory(dir));
  WeightLoader loader(ctx_, *store_, cfg_, options);
  lm_ = std::make_unique<LanguageModel>(ctx_, cfg_, loader);
  if (cfg_.is_vlm()) vision_ = std::make_unique<VisionModel>(ctx_, cfg_, loader);
  loader.finish_progress();
  if (tok_->vocab_size() > cfg_.text.vocab_size)
    fail("tokenizer.json of ", dir, " has ", tok_->vocab_size(), " tokens but the model's vocabulary is ",
         cfg_.text.vocab_size);
}

Model::~Model() = default;

uint64_t Model::weight_bytes() const { return lm_->weight_bytes() + (vision_ ? vision_->weight_bytes() : 0); }

std::string Model::render_chat(const Messages& messages, bool add_generation_prompt) const {
  if (!template_)
    fail("model ", cfg_.dir, " has no chat template (no chat_template.jinja, chat_template.json or chat_template in "
         "tokenizer_config.json)");
  std::map<std::string, jinja::Value> vars = template_tokens_;
  vars["messages"] = jinja::Value::from_json(messages);
  vars["add_generation_prompt"] = jinja::Value(add_generation_prompt);
  return template_->render(vars);
}

Prompt Model::build_raw_prompt(const std::string& text) const {
  Prompt p;
  p.text = text;
  p.ids = tok_->encode(text, true);
  for (auto id : p.ids) p.keys.push_back(text_key(id));
  return p;
}

Prompt Model::build_prompt(const Messages& messages, const std::vector<Image>& images) const {
  if (!messages.is_array() || messages.empty()) fail("messages must be a non-empty list");
  // Count image parts and put them in the form the chat template expects.
  Messages norm = Messages::array();
  size_t image_parts = 0;
  const bool phi3v = cfg_.model_type == "phi3_v";
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    if (!m.is_object()) fail("message ", i, " is not an object");
    if (!m.contains("role") || !m["role"].is_string()) fail("message ", i, " has no role string");
    Messages out = m;
    if (m.contains("content") && m["content"].is_array()) {
      Messages parts = Messages::array();
      std::string flat;  // Phi-3-Vision's template wants one string with <|image_N|> tags
      for (size_t k = 0; k < m["content"].size(); ++k) {
        const auto& part = m["content"][k];
        if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
          fail("message ", i, " content part ", k, " has no type");
        const std::string type = part["type"].get<std::string>();
        if (type == "text") {
          if (!part.contains("text") || !part["text"].is_string()) fail("message ", i, " text part ", k, " has no text string");
          parts.push_back(part);
          flat += part["text"].get<std::string>();
        } else if (type == "image" || type == "image_url") {
          ++image_parts;
          parts.push_back(Messages{{"type", "image"}});
          flat += "<|image_" + std::to_string(image_parts) + "|>\n";
        } else {
          fail("message ", i, " content part ", k, " has unsupported type '", type, "' (text, image, image_url)");
        }
      }
      if (phi3v) out["content"] = flat;
      else out["content"] = parts;
    } else if (m.contains("content") && !m["content"].is_string() && !m["content"].is_null()) {
      fail("message ", i, " content must be a string or a list of parts");
    }
    norm.push_back(out);
  }
  if (!images.empty() && !vision_) fail("model ", cfg_.dir, " is a text model and cannot take images");
  // Phi-3-Vision prompts may also carry <|image_N|> tags in plain text; those are checked below.
  if (image_parts != images.size() && !(phi3v && image_parts == 0))
    fail("the conversation has ", image_parts, " image part(s) but ", images.size(), " image(s) were given");

  Prompt p;
  p.text = render_chat(norm, true);
  for (auto& img : images) p.images.push_back(vision_->process(img));

  if (phi3v) {
    // The prompt splits at <|image_N|> tags; each text chunk is tokenized on its own with its BOS
    // (as Phi3VProcessor does), and image N takes its token count of positions.
    static const std::regex tag(R"(<\|image_(\d+)\|>)");
    std::vector<std::string> chunks;
    std::vector<int> tags;
    auto begin = std::sregex_iterator(p.text.begin(), p.text.end(), tag);
    size_t last = 0;
    for (auto it = begin; it != std::sregex_iterator(); ++it) {
      chunks.push_back(p.text.substr(last, size_t(it->position()) - last));
      tags.push_back(std::stoi((*it)[1].str()));
      last = size_t(it->position() + it->length());
    }
    chunks.push_back(p.text.substr(last));
    std::set<int> unique(tags.begin(), tags.end());
    if (unique.size() != images.size() || (!unique.empty() && (*unique.begin() != 1 || *unique.rbegin() != int(images.size()))))
      fail("the prompt has image tags for ", unique.size(), " image(s) (<|image_1|> ... in order) but ", images.size(),
           " image(s) were given");
    for (size_t c = 0; c < chunks.size(); ++c) {
      for (int32_t id : tok_->encode(chunks[c], true)) {
        p.ids.push_back(id);
        p.keys.push_back(text_key(id));
      }
      if (c < tags.size()) {
        const size_t k = size_t(tags[c] - 1);
        ImageSpan s{int64_t(p.ids.size()), p.images[k].tokens, k};
        for (int64_t t = 0; t < s.length; ++t) {
          p.ids.push_back(-int32_t(k) - 1);
          p.keys.push_back(image_key(p.images[k].hash, t));
        }
        p.spans.push_back(s);
      }
    }
    return p;
  }

  std::vector<int32_t> ids = tok_->encode(p.text, add_special_tokens_);
  const int32_t image_token = int32_t(cfg_.image_token_index);
  size_t seen = 0;
  for (int32_t id : ids) {
    if (vision_ && id == image_token) {
      if (seen >= images.size())
        fail("the prompt has more image placeholders than the ", images.size(), " image(s) given");
      ImageSpan s{int64_t(p.ids.size()), p.images[seen].tokens, seen};
      for (int64_t t = 0; t < s.length; ++t) {
        p.ids.push_back(image_token);
        p.keys.push_back(image_key(p.images[seen].hash, t));
      }
      p.spans.push_back(s);
      ++seen;
    } else {
      p.ids.push_back(id);
      p.keys.push_back(text_key(id));
    }
  }
  if (seen != images.size() || image_parts != images.size())
    fail("the conversation has ", image_parts, " image part(s) and the prompt ", seen, " image placeholder(s), but ",
         images.size(), " image(s) were given");
  return p;
}

std::string Model::info(int64_t context_tokens) const {
  std::ostringstream os;
  const auto& t = cfg_.text;
  auto gb = [](uint64_t b) {
    std::ostringstream s;
    s.precision(3);
    s << double(b) / 1e9 << " GB";
    return s.str();
  };
  os << "model: " << cfg_.dir << "\n";
  os << "architecture: " << cfg_.model_type << (cfg_.architecture.empty() ? "" : " (" + cfg_.architecture + ")") << "\n";
  os << "language model: " << t.model_type << ", " << t.num_layers << " layers, hidden " << t.hidden_size << ", MLP "
     << t.intermediate_size << ", " << t.num_heads << " heads (" << t.num_kv_heads << " KV) of " << t.head_dim
     << ", vocabulary " << t.vocab_size << ", max positions " << t.max_position << ", rope " << t.rope.type
     << " theta " << t.rope.theta << (t.sliding_window ? ", sliding window " + std::to_string(t.sliding_window) : "")
     << "\n";
  if (cfg_.vision) {
    const auto& v = *cfg_.vision;
    os << "vision tower: CLIP ViT, " << v.num_layers << " layers, width " << v.hidden_size << ", " << v.num_heads
       << " heads, " << v.image_size << " px, patch " << v.patch_size << ", feature layer " << cfg_.vision_feature_layer
       << "\n";
  }
  os << "weights: " << lm_->format_summary() << " (language model); " << gb(weight_bytes()) << " on the GPU\n";
  if (cfg_.quantization.bits) os << "checkpoint quantization: MLX " << cfg_.quantization.bits << "-bit, group " << cfg_.quantization.group_size << "\n";
  const uint64_t kv = uint64_t(t.num_layers) * 2 * uint64_t(context_tokens) * uint64_t(t.num_kv_heads) * uint64_t(t.head_dim) * 2;
  os << "KV cache: " << gb(kv) << " for " << context_tokens << " tokens (f16)\n";
  os << "memory needed: about " << gb(weight_bytes() + kv) << " plus activations\n";
  os << "tokenizer: " << tok_->vocab_size() << " tokens; chat template: " << (template_ ? "yes" : "no") << "\n";
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// Session

// The recordings replayed during generation: the sampling tail alone (after a prefill), and a
// whole decode step (embed the token, one forward pass, the sampling tail).
struct Session::Graphs {
  std::unique_ptr<gpu::Recorder> tail, step;
  Tensor raw_vals, raw_ids, raw_lse;    // top raw logits (for logprobs / top_logits) and log Z
  Tensor cand_vals, cand_ids, cand_lse; // sampling candidates and log Z at the temperature
  Tensor penalty_ids;                   // i32 [vocab], -1 where unused
  Tensor work;                          // penalized logits (or logits_ itself)
  int raw_k = 0, cand_k = 1;
  bool penalty = false, want_lse = false;
};

Session::Session(Model& model, int64_t context_tokens) : model_(model), ctx_(model.context()) {
  const auto& t = model.config().text;
  if (context_tokens < 2) fail("the context must hold at least 2 tokens, not ", context_tokens);
  // Like the reference, positions past max_position_embeddings are allowed (RoPE extends to
  // them); the CLI warns when a context goes beyond what the model was trained for.
  capacity_ = context_tokens;
  cache_ = KvCache::create(ctx_, t, capacity_);
  step_ = ctx_.host_tensor(gpu::DType::I32, {1}, "step", gpu::MemoryKind::Upload);
  token_ = ctx_.host_tensor(gpu::DType::I32, {1}, "token", gpu::MemoryKind::Upload);
  logits_ = ctx_.tensor(gpu::DType::F32, {1, t.vocab_size}, "logits");
  ensure_rope(false);
}

Session::~Session() = default;

void Session::reset() { cached_keys_.clear(); }

void Session::ensure_rope(bool long_factors) {
  if (rope_table_.valid() && long_factors == rope_long_) return;
  const auto& r = model_.config().text.rope;
  const int64_t seq = long_factors ? r.original_max_position + 1 : 1;
  auto table = gpu::rope_table(capacity_, r.rot_dim, r.theta, r.factors_for(seq), r.attention_factor);
  if (!rope_table_.valid()) rope_table_ = ctx_.tensor(gpu::DType::F32, {capacity_, r.rot_dim / 2, 2}, "rope table");
  ctx_.upload(rope_table_, table.data(), table.size() * 4);
  rope_long_ = long_factors;
}

void Session::prefill(const Prompt& prompt, const std::vector<Tensor>& features, int64_t from, int64_t to) {
  const auto& lm = model_.lm();
  const int64_t E = lm.config().hidden_size;
  for (int64_t c0 = from; c0 < to; c0 += k_prefill_chunk) {
    const int64_t n = std::min(k_prefill_chunk, to - c0);
    gpu::Recorder rec(ctx_);
    std::vector<int32_t> ids(prompt.ids.begin() + c0, prompt.ids.begin() + c0 + n);
    for (auto& id : ids)
      if (id < 0 || id >= lm.config().vocab_size) id = 0;  // image positions: overwritten below
    Tensor idt = rec.scratch(gpu::DType::I32, {n}, "prompt ids");
    ctx_.upload(idt, ids.data(), ids.size() * 4);
    Mat x = Mat::of(rec.scratch(gpu::DType::F32, {n, E}, "embeddings"));
    lm.embed(rec, idt, 0, n, x);
    for (auto& s : prompt.spans) {
      const int64_t a = std::max(s.position, c0), b = std::min(s.position + s.length, c0 + n);
      if (a >= b) continue;
      rec.copy(features[s.image], uint64_t(a - s.position) * E * 4, x.t, uint64_t(a - c0) * E * 4, uint64_t(b - a) * E * 4);
    }
    int32_t past = int32_t(c0);
    ctx_.upload(step_, &past, 4);
    Mat logits = Mat::of(logits_);
    lm.forward(rec, cache_, x, step_, 0, rope_table_, c0 + n == to ? &logits : nullptr);
    rec.submit();
  }
}

Session::Prepared Session::prepare(const Prompt& prompt) {
  const int64_t N = int64_t(prompt.ids.size());
  if (N == 0) fail("the prompt is empty");
  if (N >= capacity_)
    fail("the prompt is ", N, " tokens long, which does not fit the context of ", capacity_,
         " tokens (raise the context size, e.g. --ctx)");
  if (prompt.keys.size() != prompt.ids.size()) fail("internal: prompt keys and ids differ in length");
  Prepared p;
  // Reuse the longest cached prefix (at least the last prompt token is recomputed for logits).
  const bool need_long = model_.config().text.rope.uses_long_factors(N);
  int64_t common = 0;
  while (common < int64_t(cached_keys_.size()) && common < N && cached_keys_[size_t(common)] == prompt.keys[size_t(common)]) ++common;
  if (need_long != rope_long_) common = 0;  // cached keys were rotated with the other factors
  p.reused = std::min(common, N - 1);
  p.computed = N - p.reused;
  ensure_rope(need_long);

  auto t_img = std::chrono::steady_clock::now();
  p.features.resize(prompt.images.size());
  for (auto& s : prompt.spans)
    if (s.position + s.length > p.reused && !p.features[s.image].valid())
      p.features[s.image] = model_.vision()->encode(prompt.images[s.image]);
  p.image_seconds = seconds_since(t_img);

  auto t0 = std::chrono::steady_clock::now();
  cached_keys_.resize(size_t(p.reused));
  prefill(prompt, p.features, p.reused, N);
  cached_keys_.assign(prompt.keys.begin(), prompt.keys.end());
  p.prefill_seconds = seconds_since(t0);
  return p;
}

std::vector<float> Session::prompt_logits(const Prompt& prompt) {
  prepare(prompt);
  return ctx_.read<float>(logits_);
}

GenerationResult Session::generate(const Prompt& prompt, const GenerationParams& params, const StepCallback& on_step) {
  params.validate();
  const auto& cfg = model_.config();
  const auto& tok = model_.tokenizer();
  const auto& rope = cfg.text.rope;
  const int64_t N = int64_t(prompt.ids.size());
  GenerationResult res;
  res.prompt_tokens = prompt.ids;
  Prepared prep = prepare(prompt);
  std::vector<Tensor>& features = prep.features;
  res.cached_tokens = prep.reused;
  res.prefill_tokens = prep.computed;
  res.image_seconds = prep.image_seconds;
  res.prefill_seconds = prep.prefill_seconds;

  // Record the sampling tail and the decode step once; they are replayed for every token.
  const int64_t V = cfg.text.vocab_size;
  Graphs g;
  const auto& sp = params.sampling;
  g.raw_k = std::max({params.top_logprobs, params.top_logits, params.logprobs ? 1 : 0});
  g.cand_k = sp.greedy() ? 1 : k_candidates;
  g.penalty = sp.repeat_penalty != 1.0f;
  g.want_lse = !sp.greedy();
  auto host = [&](gpu::DType dt, int64_t n, const char* name) { return ctx_.host_tensor(dt, {1, n}, name, gpu::MemoryKind::Readback); };
  if (g.raw_k) {
    g.raw_vals = host(gpu::DType::F32, g.raw_k, "raw top values");
    g.raw_ids = host(gpu::DType::U32, g.raw_k, "raw top ids");
    g.raw_lse = host(gpu::DType::F32, 1, "raw log z");
  }
  g.cand_vals = host(gpu::DType::F32, g.cand_k, "candidate values");
  g.cand_ids = host(gpu::DType::U32, g.cand_k, "candidate ids");
  g.cand_lse = host(gpu::DType::F32, 1, "candidate log z");
  std::set<int32_t> seen;
  std::vector<int32_t> penalty_list(size_t(V), -1);
  size_t penalty_count = 0;
  if (g.penalty) {
    g.penalty_ids = ctx_.host_tensor(gpu::DType::I32, {V}, "penalty ids", gpu::MemoryKind::Upload);
    for (int32_t id : prompt.ids)
      if (id >= 0 && id < V && seen.insert(id).second) penalty_list[penalty_count++] = id;
    ctx_.upload(g.penalty_ids, penalty_list.data(), penalty_list.size() * 4);
    g.work = ctx_.tensor(gpu::DType::F32, {1, V}, "penalized logits");
  } else {
    g.work = logits_;
  }
  auto record_tail = [&](gpu::Recorder& rec) {
    if (g.raw_k) {
      gpu::topk(rec, Mat::of(logits_), g.raw_k, g.raw_vals, g.raw_ids);
      gpu::logsumexp(rec, Mat::of(logits_), 1.0f, g.raw_lse);
    }
    if (g.penalty) {
      rec.copy(logits_, 0, g.work, 0, logits_.bytes());
      gpu::repeat_penalty(rec, Mat::of(g.work), g.penalty_ids, V, sp.repeat_penalty);
    }
    gpu::topk(rec, Mat::of(g.work), g.cand_k, g.cand_vals, g.cand_ids);
    if (g.want_lse) gpu::logsumexp(rec, Mat::of(g.work), 1.0f / sp.temperature, g.cand_lse);
  };
  auto record_graphs = [&]() {
    g.tail = std::make_unique<gpu::Recorder>(ctx_);
    record_tail(*g.tail);
    g.tail->submit();  // evaluates the prefill's logits
    g.step = std::make_unique<gpu::Recorder>(ctx_);
    const auto& lm = model_.lm();
    Mat x = Mat::of(g.step->scratch(gpu::DType::F32, {1, lm.config().hidden_size}, "token embedding"));
    lm.embed(*g.step, token_, 0, 1, x);
    Mat logits = Mat::of(logits_);
    lm.forward(*g.step, cache_, x, step_, 0, rope_table_, &logits);
    record_tail(*g.step);
  };
  record_graphs();

  Sampler sampler(sp);
  StreamingDetokenizer detok(tok, true);
  std::string emitted;  // text already handed out (stop strings held back)
  size_t max_stop = 0;
  for (auto& s : params.stop) max_stop = std::max(max_stop, s.size());
  std::set<int32_t> eos(model_.eos_ids().begin(), model_.eos_ids().end());
  int64_t n_past = N;  // tokens in the cache
  auto t_decode = std::chrono::steady_clock::now();
  double first_token_seconds = 0;
  res.finish_reason = "length";

  for (int step = 0; step < params.max_tokens; ++step) {
    // Read this step's candidates and sample.
    Candidates c;
    c.values = ctx_.read<float>(g.cand_vals);
    auto ids = ctx_.read<uint32_t>(g.cand_ids);
    c.ids.assign(ids.begin(), ids.end());
    for (auto& id : c.ids)
      if (uint32_t(id) == 0xFFFFFFFFu) id = -1;
    if (g.want_lse) c.log_norm = ctx_.read<float>(g.cand_lse)[0];
    const int32_t token = sampler.sample(c, [&] { return ctx_.read<float>(g.work); });
    if (step == 0) first_token_seconds = seconds_since(t_decode);

    StepOutput out;
    out.token = token;
    if (g.raw_k) {
      auto rv = ctx_.read<float>(g.raw_vals);
      auto ri = ctx_.read<uint32_t>(g.raw_ids);
      const float lse = ctx_.read<float>(g.raw_lse)[0];
      float raw = NAN;
      for (int i = 0; i < g.raw_k; ++i)
        if (int32_t(ri[size_t(i)]) == token) raw = rv[size_t(i)];
      if (std::isnan(raw)) ctx_.download(logits_, &raw, 4, uint64_t(token) * 4);
      out.logprob = raw - lse;
      for (int i = 0; i < params.top_logprobs; ++i) out.top_logprobs.push_back({int32_t(ri[size_t(i)]), rv[size_t(i)] - lse});
      for (int i = 0; i < params.top_logits; ++i) out.top_logits.push_back({int32_t(ri[size_t(i)]), rv[size_t(i)]});
    }
    res.tokens.push_back(token);
    const bool is_eos = eos.count(token) && !params.ignore_eos;
    bool stop_now = is_eos;
    if (!is_eos) detok.push(token);
    const bool last = step + 1 == params.max_tokens || n_past + 1 >= capacity_;
    if (is_eos || last) detok.flush();
    // Stop strings: cut the text at the first one; hold back what could still become one.
    std::string full = detok.text();
    size_t cut = std::string::npos;
    for (auto& s : params.stop) {
      size_t f = full.find(s, emitted.size() > s.size() ? emitted.size() - s.size() : 0);
      if (f != std::string::npos && f < cut) cut = f;
    }
    size_t safe = full.size();
    if (cut != std::string::npos) {
      safe = cut;
      stop_now = true;
    } else if (!(is_eos || last)) {
      for (size_t k = std::min(max_stop, full.size()); k > 0; --k) {
        bool prefix_of_stop = false;
        for (auto& s : params.stop) prefix_of_stop = prefix_of_stop || (s.size() >= k && full.compare(full.size() - k, k, s, 0, k) == 0);
        if (prefix_of_stop) {
          safe = full.size() - k;
          break;
        }
      }
      safe = unicode::complete_prefix(std::string_view(full).substr(0, safe));
    }
    if (safe > emitted.size()) {
      out.text = full.substr(emitted.size(), safe - emitted.size());
      emitted += out.text;
    }
    const bool keep_going = on_step ? on_step(out) : true;
    if (params.logprobs || params.top_logprobs || params.top_logits) res.steps.push_back(out);
    else res.steps.push_back({out.token, out.text, 0, {}, {}});
    if (stop_now) {
      res.finish_reason = "stop";
      break;
    }
    if (!keep_going) {
      res.finish_reason = "cancelled";
      break;
    }
    if (last) break;

    // Feed the token: one replay of the decode step.
    if (g.penalty && seen.insert(token).second) {
      penalty_list[penalty_count] = token;
      ctx_.upload(g.penalty_ids, &token, 4, uint64_t(penalty_count) * 4);
      ++penalty_count;
    }
    const bool long_now = rope.uses_long_factors(n_past + 1);
    if (long_now != rope_long_) {
      // The reference recomputes the whole sequence with the long factors once it is longer than
      // the original context: do the same, once.
      Prompt all = prompt;
      for (int32_t t : res.tokens) {
        all.ids.push_back(t);
        all.keys.push_back(text_key(t));
      }
      for (size_t k = 0; k < features.size(); ++k)
        if (!features[k].valid()) features[k] = model_.vision()->encode(prompt.images[k]);
      ensure_rope(long_now);
      prefill(all, features, 0, int64_t(all.ids.size()));
      cached_keys_ = all.keys;
      record_graphs();
      n_past = int64_t(all.ids.size());
      continue;
    }
    ctx_.upload(token_, &token, 4);
    int32_t past = int32_t(n_past);
    ctx_.upload(step_, &past, 4);
    g.step->replay();
    cached_keys_.push_back(text_key(token));
    ++n_past;
  }
  res.text = emitted;
  res.decode_seconds = seconds_since(t_decode) - first_token_seconds;
  return res;
}

}  // namespace vkvlm
