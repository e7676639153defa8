#pragma once
// The fixture models (tests/data/fixtures and tests/data/derived) and their conversations, for
// the model tests: loaded once per process on the test context.
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/session.h"
#include "tests/kernel_harness.h"
#include "tests/test_paths.h"

namespace vkvlm::test {

// Where the reference's best and second logits are closer than this, an engine's rounding may
// swap them, and every later greedy step may differ: token comparisons stop there.
constexpr double kReferenceNearTie = 0.05;

// A fixture model's folder under tests/data: the shared fixtures, and the checkpoints derived
// from them in other layouts (tests/data/derived, made by tools/reference/derive_mlx2024_fixtures.py).
inline std::string model_dir(const std::string& name) {
  return test_data_dir() + (name.find("-2024") != std::string::npos ? "/derived/" : "/fixtures/") + name;
}

// A model folder, loaded once per process.
inline Model& fixture_model_at(const std::string& dir) {
  // The context first, so it outlives the models at exit.
  gpu::Context& c = ctx();
  static std::map<std::string, std::unique_ptr<Model>> models;
  auto& m = models[dir];
  if (!m) m = std::make_unique<Model>(c, dir);
  return *m;
}

inline Model& fixture_model(const std::string& name) { return fixture_model_at(model_dir(name)); }

// A fixture model's reference outputs (expected.safetensors), by "case.name".
struct Expected {
  TensorStore store;
  explicit Expected(const std::string& model) : store(TensorStore::open_file(model_dir(model) + "/expected.safetensors")) {}
  std::vector<float> f32(const std::string& name) const { return store.get(name).to_f32(); }
  std::vector<int32_t> i32(const std::string& name) const {
    auto v = store.get(name).to_f32();
    return std::vector<int32_t>(v.begin(), v.end());
  }
  bool has(const std::string& name) const { return store.has(name); }
  std::vector<int64_t> shape(const std::string& name) const { return store.get(name).shape; }
};

// A case of a fixture model's cases.json, by name.
inline nlohmann::ordered_json fixture_case(const std::string& model, const std::string& name) {
  std::ifstream in(model_dir(model) + "/cases.json");
  auto cases = nlohmann::ordered_json::parse(in);
  for (auto& c : cases["cases"])
    if (c["name"] == name) return c;
  return nullptr;
}

inline std::vector<Image> case_images(const nlohmann::ordered_json& c) {
  std::vector<Image> images;
  for (auto& f : c["images"]) images.push_back(load_image_file(fixtures_dir() + "/images/" + f.get<std::string>()));
  return images;
}

// The chat template's extra variables a case was rendered with (null when none).
inline nlohmann::json case_template_vars(const nlohmann::ordered_json& c) {
  return c.contains("template_kwargs") ? nlohmann::json(c["template_kwargs"]) : nlohmann::json();
}

// The conversation of a case: its messages, or (PaliGemma) one user turn holding the image and
// the task prefix.
inline Messages case_messages(const nlohmann::ordered_json& c) {
  if (c.contains("messages")) return c["messages"];
  Messages content = Messages::array();
  for (size_t i = 0; i < c["images"].size(); ++i) content.push_back({{"type", "image"}});
  content.push_back({{"type", "text"}, {"text", c["prefix"]}});
  return Messages::array({{{"role", "user"}, {"content", content}}});
}

}  // namespace vkvlm::test
