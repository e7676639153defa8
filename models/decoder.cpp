#include "models/decoder.h"

#include <algorithm>
#include <cmath>

#include "gpu/error.h"

namespace vkvlm {

using gpu::Mat;
using gpu::Tensor;

std::string KvFormat::describe() const {
  if (!quantized()) return "f16";
  std::string s = "q" + std::to_string(bits) + " group " + std::to_string(group_size);
  if (quantized_start > 0) s += " after " + std::to_string(quantized_start) + " f16 rows";
  return s;
}

std::string KvFormat::tag() const {
  if (!quantized()) return "f16";
  std::string s = "q" + std::to_string(bits) + "g" + std::to_string(group_size);
  if (quantized_start > 0) s += "s" + std::to_string(quantized_start);
  return s;
}

void KvFormat::check(const TextConfig& cfg) const {
  if (bits != 16 && bits != 8 && bits != 4) fail("--kv-bits ", bits, " is not 4 or 8");
  if (!quantized()) return;
  if (group_size != 32 && group_size != 64 && group_size != 128)
    fail("--kv-group-size ", group_size, " is not 32, 64 or 128");
  if (cfg.head_dim % group_size)
    fail("--kv-group-size ", group_size, " does not divide the model's head_dim ", cfg.head_dim,
         " (groups run along each head, as in mlx-lm)");
  if (quantized_start < 0) fail("--quantized-kv-start ", quantized_start, " is negative");
}

uint64_t KvFormat::bytes(const TextConfig& cfg, int64_t rows) const {
  const uint64_t width = uint64_t(cfg.num_kv_heads) * uint64_t(cfg.head_dim);
  const uint64_t f16 = uint64_t(f16_rows(rows)), q_rows = uint64_t(rows) - f16;
  const uint64_t q_row_bytes = quantized() ? width * uint64_t(bits) / 8 + width / uint64_t(group_size) * 4 : 0;
  return 2 * uint64_t(cfg.num_layers) * (f16 * width * 2 + q_rows * q_row_bytes);
}

KvCache KvCache::create(gpu::Context& ctx, const TextConfig& cfg, int64_t rows, const KvFormat& format) {
  format.check(cfg);
  KvCache c;
  c.rows = rows;
  c.format = format;
  const int64_t width = int64_t(cfg.num_kv_heads) * cfg.head_dim;
  const int64_t f16_rows = format.f16_rows(rows), q_rows = rows - f16_rows;
  auto segments = [&](const std::string& name) {
    gpu::KvRows r;
    if (f16_rows > 0) r.push_back(gpu::Mat::of(ctx.tensor(gpu::DType::F16, {f16_rows, width}, name)));
    if (q_rows > 0) {
      gpu::Tensor data = ctx.tensor(gpu::DType::U32, {q_rows, width * format.bits / 32}, name + " quantized");
      gpu::Tensor params = ctx.tensor(gpu::DType::U32, {q_rows, width / format.group_size}, name + " scales and biases");
      r.push_back(gpu::KvMat::quantized(data, params, format.bits, format.group_size, width));
    }
    return r;
  };
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    c.k.push_back(segments("kv cache k" + std::to_string(l)));
    c.v.push_back(segments("kv cache v" + std::to_string(l)));
  }
  return c;
}

uint64_t KvCache::bytes() const {
  uint64_t b = 0;
  for (const auto* side : {&k, &v})
    for (const gpu::KvRows& layer : *side)
      for (const gpu::KvMat& seg : layer) b += seg.data.t.bytes() + (seg.bits ? seg.params.t.bytes() : 0);
  return b;
}

LanguageModel::LanguageModel(gpu::Context& ctx, const TextConfig& cfg, WeightLoader& loader) : ctx_(ctx), cfg_(cfg) {
  const auto& store = loader.store();
  // Where the decoder's tensors live, by naming scheme.
  std::string prefix;
  for (const char* p : {"model.language_model.", "language_model.model.", "model.", ""}) {
    if (store.has(std::string(p) + "embed_tokens.weight")) {
      prefix = p;
      break;
    }
    if (std::string(p).empty())
      fail("no language model embedding found in ", store.where(),
           " (looked for model.language_model.embed_tokens, language_model.model.embed_tokens, model.embed_tokens)");
  }
  const int64_t E = cfg_.hidden_size, I = cfg_.intermediate_size, V = cfg_.vocab_size;
  const int64_t qd = int64_t(cfg_.num_heads) * cfg_.head_dim, kvd = int64_t(cfg_.num_kv_heads) * cfg_.head_dim;
  embed_ = loader.linear(prefix + "embed_tokens", V, E, true);
  const bool fused = store.has(prefix + "layers.0.self_attn.qkv_proj.weight");
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    const std::string p = prefix + "layers." + std::to_string(l) + ".";
    DecoderLayer L;
    L.attn_norm = loader.f32(p + "input_layernorm.weight", {E});
    L.ffn_norm = loader.f32(p + "post_attention_layernorm.weight", {E});
    if (fused) {
      L.qkv = loader.projection({p + "self_attn.qkv_proj"}, {qd + 2 * kvd}, E, true, true);
      L.gate_up = loader.projection({p + "mlp.gate_up_proj"}, {2 * I}, E, true, false);
    } else {
      L.qkv = loader.projection({p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"}, {qd, kvd, kvd},
                                E, true, cfg_.attention_bias);
      L.gate_up = loader.projection({p + "mlp.gate_proj", p + "mlp.up_proj"}, {I, I}, E, true, false);
    }
    L.o = loader.projection({p + "self_attn.o_proj"}, {E}, qd, true, false);
    L.down = loader.projection({p + "mlp.down_proj"}, {E}, I, true, false);
    layers_.push_back(std::move(L));
  }
  final_norm_ = loader.f32(prefix + "norm.weight", {E});
  std::string head;
  for (const char* h : {"lm_head", "language_model.lm_head", "model.lm_head"})
    if (store.has(std::string(h) + ".weight")) {
      head = h;
      break;
    }
  if (!head.empty() && !cfg_.tie_embeddings) {
    lm_head_ = loader.linear(head, V, E, true);
  } else if (cfg_.tie_embeddings || head.empty()) {
    if (!cfg_.tie_embeddings)
      fail("the checkpoint in ", store.where(), " has no lm_head and tie_word_embeddings is false");
    lm_head_ = embed_;  // tied: the same GPU weight
  }
}

uint64_t LanguageModel::weight_bytes() const {
  uint64_t b = embed_.bytes() + final_norm_.bytes();
  if (lm_head_.data.buffer() != embed_.data.buffer()) b += lm_head_.bytes();
  for (auto& L : layers_)
    b += L.attn_norm.bytes() + L.ffn_norm.bytes() + L.qkv.bytes() + L.o.bytes() + L.gate_up.bytes() + L.down.bytes();
  return b;
}

std::string LanguageModel::format_summary() const {
  const auto& w = layers_.empty() ? embed_ : layers_[0].qkv.parts[0];
  std::string s = gpu::weight_format_name(w.format);
  if (w.quantized()) s += " group " + std::to_string(w.group_size);
  return s;
}

void LanguageModel::embed(gpu::Recorder& rec, const Tensor& ids, int64_t offset, int64_t n, const Mat& out) const {
  gpu::get_rows(rec, embed_, ids, offset, n, out);
}

void LanguageModel::forward(gpu::Recorder& rec, const KvCache& cache, const Mat& x, const ForwardRows& rows,
                            const Tensor& rope_table, const Mat* logits) const {
  run_layers(rec, {SequenceRows{&cache, &rows, &rope_table, 0, x.rows}}, x, rows.as_decode_steps, logits);
}

void LanguageModel::forward_batch(gpu::Recorder& rec, const std::vector<Sequence>& sequences, const Mat& x,
                                  const Mat& logits) const {
  if (int64_t(sequences.size()) != x.rows || logits.rows != x.rows)
    fail("internal: a batched step has ", sequences.size(), " sequences for ", x.rows, " rows");
  std::vector<SequenceRows> parts;
  for (size_t b = 0; b < sequences.size(); ++b)
    parts.push_back({sequences[b].cache, &sequences[b].rows, sequences[b].rope_table, int64_t(b), 1});
  run_layers(rec, parts, x, /*as_decode_steps=*/true, &logits);
}

void LanguageModel::run_layers(gpu::Recorder& rec, const std::vector<SequenceRows>& parts, const Mat& x, bool as_decode_steps,
                               const Mat* logits) const {
  const int64_t T = x.rows, E = cfg_.hidden_size, I = cfg_.intermediate_size;
  const int H = cfg_.num_heads, KV = cfg_.num_kv_heads, D = cfg_.head_dim;
  const int64_t qd = int64_t(H) * D, kvd = int64_t(KV) * D;
  if (x.cols != E) fail("internal: forward input has ", x.cols, " columns, the model is ", E, " wide");
  // The gated MLP's [rows, 2 I] intermediate is the largest activation: it runs in row chunks so
  // that a long prefill (a whole prefix-LM prompt) needs no more than this many rows of it.
  constexpr int64_t k_mlp_rows = 512;
  const int64_t mlp_rows = std::min(T, k_mlp_rows);

  Mat h = Mat::of(rec.scratch(gpu::DType::F32, {T, E}, "normed"));                 // [T, E]
  Mat qkv = Mat::of(rec.scratch(gpu::DType::F32, {T, qd + 2 * kvd}, "qkv"));       // [T, (H + 2 KV) D]
  Mat attn = Mat::of(rec.scratch(gpu::DType::F32, {T, qd}, "attention"));          // [T, H D]
  Mat gu = Mat::of(rec.scratch(gpu::DType::F32, {mlp_rows, 2 * I}, "gate_up"));    // [chunk, 2 I]
  Mat act = Mat::of(rec.scratch(gpu::DType::F32, {mlp_rows, I}, "activation"));   // [chunk, I]
  Mat q = qkv.col_range(0, qd), k = qkv.col_range(qd, kvd), v = qkv.col_range(qd + kvd, kvd);

  const auto sections = cfg_.rope.sections.empty() ? gpu::RopeSections{}
                                                   : gpu::RopeSections::of_sizes(cfg_.rope.sections, cfg_.rope.rot_dim);
  const float eps = float(cfg_.rms_eps);
  // Each span's attention parameters: its rows are the whole pass as far as its cache knows.
  std::vector<gpu::AttentionParams> aps;
  for (const SequenceRows& s : parts) {
    gpu::AttentionParams ap;
    ap.heads = H;
    ap.kv_heads = KV;
    ap.head_dim = D;
    ap.causal = true;
    ap.scale = float(1.0 / std::sqrt(double(D)));
    ap.T_total = s.count;
    ap.spans = s.rows->spans;
    ap.spans_row = s.rows->spans_row;
    if (s.rows->rotating) {  // mlx-lm's RotatingKVCache: the kept rows stay visible
      if (s.count != 1) fail("internal: a rotating cache decodes one row at a time");
      ap.rotating = true;
    }
    aps.push_back(ap);
  }
  gpu::Variant var;
  if (as_decode_steps) {
    var.matmul = gpu::decode_matmul(rec.context());
    var.attention = gpu::Variant::Attention::Rows;
  }

  // Gemma scales its input embeddings (image features included) by sqrt(hidden).
  if (cfg_.embed_scale != 1.0) gpu::unary(rec, gpu::UnaryOp::Identity, x, x, float(cfg_.embed_scale));
  for (size_t l = 0; l < layers_.size(); ++l) {
    const DecoderLayer& L = layers_[l];
    const LayerTraits& traits = cfg_.layers[l];
    // A rotating cache's decode step sees every row it kept: no window mask.
    for (gpu::AttentionParams& ap : aps) ap.window = ap.rotating ? 0 : traits.window;
    const gpu::BinaryOp glu =
        traits.activation == MlpActivation::GeluTanh ? gpu::BinaryOp::GeluTanhMul : gpu::BinaryOp::SiluMul;
    gpu::rmsnorm(rec, x, L.attn_norm, eps, cfg_.norm_plus_one, h);
    L.qkv.run(rec, h, qkv, false, var);
    // Each step for every sequence before the next step: their dispatches touch disjoint rows,
    // so a batch needs three barriers here whatever its size.
    for (const SequenceRows& s : parts) {
      const ForwardRows& r = *s.rows;
      gpu::rope(rec, q.row_range(s.first, s.count), H, D, cfg_.rope.rot_dim, gpu::RopeMode::RotateHalf, *s.rope_table,
                r.positions, r.positions_row, sections);
      gpu::rope(rec, k.row_range(s.first, s.count), KV, D, cfg_.rope.rot_dim, gpu::RopeMode::RotateHalf, *s.rope_table,
                r.positions, r.positions_row, sections);
    }
    for (const SequenceRows& s : parts) {
      gpu::kv_append(rec, k.row_range(s.first, s.count), s.cache->k[l], s.rows->kv_row, s.rows->kv_row_index);
      gpu::kv_append(rec, v.row_range(s.first, s.count), s.cache->v[l], s.rows->kv_row, s.rows->kv_row_index);
    }
    for (size_t i = 0; i < parts.size(); ++i) {
      const SequenceRows& s = parts[i];
      gpu::attention(rec, q.row_range(s.first, s.count), s.cache->k[l], s.cache->v[l], attn.row_range(s.first, s.count),
                     s.rows->kv_row, s.rows->kv_row_index, aps[i], var);
    }
    L.o.run(rec, attn, x, /*accumulate=*/true, var);  // x += attn W_o^T
    gpu::rmsnorm(rec, x, L.ffn_norm, eps, cfg_.norm_plus_one, h);
    for (int64_t r0 = 0; r0 < T; r0 += mlp_rows) {
      const int64_t n = std::min(mlp_rows, T - r0);
      Mat g = gu.row_range(0, n), a = act.row_range(0, n);
      L.gate_up.run(rec, h.row_range(r0, n), g, false, var);
      gpu::binary(rec, glu, g.col_range(0, I), g.col_range(I, I), a);
      L.down.run(rec, a, x.row_range(r0, n), /*accumulate=*/true, var);  // x += act W_down^T
    }
  }
  if (logits) {
    const int64_t R = logits->rows;
    Mat last = x.row_range(T - R, R);
    Mat normed = h.row_range(0, R);
    gpu::rmsnorm(rec, last, final_norm_, eps, cfg_.norm_plus_one, normed);
    gpu::matmul(rec, normed, lm_head_, nullptr, *logits, false, var);
  }
}

}  // namespace vkvlm
