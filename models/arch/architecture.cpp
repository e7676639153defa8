#include "models/arch/architecture.h"

#include "base/error.h"

namespace vkvlm::arch {

Prompt expand_image_tokens(const std::vector<int32_t>& ids, int32_t image_token, std::vector<ImagePlan> images,
                           std::string text, int position_components) {
  PromptBuilder b(position_components);
  std::vector<int32_t> run;  // text since the last placeholder
  size_t seen = 0;
  for (int32_t id : ids) {
    if (id != image_token) {
      run.push_back(id);
      continue;
    }
    if (seen >= images.size())
      fail("the prompt has more image placeholders than the ", images.size(), " image(s) given");
    b.text(run);
    run.clear();
    b.image(seen, images[seen], image_token);
    ++seen;
  }
  b.text(run);
  if (seen != images.size())
    fail("the prompt has ", seen, " image placeholder(s) after the chat template, but ", images.size(), " image(s) were given");
  return b.finish(std::move(text), std::move(images));
}

gpu::Tensor upload_pixels(gpu::Recorder& rec, const ProcessedImage& px) {
  const bool crops = px.layout == ProcessedImage::Layout::Crops;
  gpu::Tensor t = crops ? rec.scratch(gpu::DType::F32, {px.rows, 3, px.size, px.size}, "pixels")
                        : rec.scratch(gpu::DType::F32, {px.rows, px.patch_values}, "patches");
  if (size_t(t.numel()) != px.pixels.size()) fail("internal: processed image of ", px.pixels.size(), " values for ", t.shape_string());
  rec.context().upload(t, px.pixels.data(), px.pixels.size() * 4);
  return t;
}

void gather_rows(gpu::Recorder& rec, const gpu::Tensor& table, int64_t rows, int64_t width, const std::vector<int32_t>& order,
                 const gpu::Mat& dst) {
  for (int32_t r : order)
    if (r < 0 || r >= rows) fail("internal: feature row ", r, " outside ", rows, " rows");
  gpu::Weight t;
  t.format = gpu::WeightFormat::F32;
  t.n = rows;
  t.k = width;
  t.data = table;
  t.name = "image feature rows";
  gpu::Tensor ids = rec.scratch(gpu::DType::I32, {int64_t(order.size())}, "image feature order");
  rec.context().upload(ids, order.data(), order.size() * 4);
  gpu::get_rows(rec, t, ids, 0, int64_t(order.size()), dst);
}

size_t count_substrings(const std::string& text, const std::string& needle) {
  if (needle.empty()) return 0;
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + needle.size())) ++n;
  return n;
}

std::string content_text(const Messages& content) {
  if (content.is_string()) return content.get<std::string>();
  std::string out;
  if (content.is_array())
    for (auto& part : content)
      if (part.is_object() && part.value("type", "") == "text" && part.contains("text") && part["text"].is_string())
        out += part["text"].get<std::string>();
  return out;
}

}  // namespace vkvlm::arch
