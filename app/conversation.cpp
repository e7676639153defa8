#include "app/conversation.h"

#include "base/error.h"

namespace vkvlm {
namespace {

struct SlotCounts {
  size_t parts = 0, placeholders = 0;
};

SlotCounts count(const std::vector<ImageSlot>& slots) {
  SlotCounts c;
  for (auto& s : slots) {
    c.parts += s.kind == ImageSlot::Kind::Part;
    c.placeholders += s.kind == ImageSlot::Kind::Placeholder;
  }
  return c;
}

// Image parts that only carry the images of as many text placeholders take them alone.
bool parts_carry(const SlotCounts& c, size_t supplied) { return c.parts && c.parts == c.placeholders && supplied == c.parts; }

}  // namespace

std::string check_supplied_images(const std::vector<ImageSlot>& slots, size_t supplied, const std::string& what) {
  const SlotCounts c = count(slots);
  if (parts_carry(c, supplied) || supplied == c.parts + c.placeholders) return "";
  return what + " " + std::to_string(supplied) + " image(s), but the conversation has " + std::to_string(c.parts) +
         " {\"type\": \"image\"} part(s) and " + std::to_string(c.placeholders) + " image placeholder(s) in its text";
}

Image image_from_url(const std::string& url, bool allow_files) {
  if (url.empty()) fail("an image_url part has no url");
  if (url.rfind("data:", 0) == 0) return decode_data_url(url);
  if (url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0)
    fail("image URL ", url.substr(0, 200), " is remote; vkvlm fetches nothing: download it and pass the file");
  if (!allow_files) fail("image_url must be a data: URL");
  return load_image_file(url.rfind("file://", 0) == 0 ? url.substr(7) : url);
}

std::vector<Image> conversation_images(const std::vector<ImageSlot>& slots, std::vector<Image> supplied, bool allow_files) {
  const std::string why = check_supplied_images(slots, supplied.size(), "given");
  if (!why.empty()) fail(why);
  const bool carry = parts_carry(count(slots), supplied.size());
  std::vector<Image> images;
  size_t next = 0;
  for (auto& s : slots) {
    if (s.kind == ImageSlot::Kind::Url) images.push_back(image_from_url(s.url, allow_files));
    else if (!(carry && s.kind == ImageSlot::Kind::Placeholder)) images.push_back(std::move(supplied[next++]));
  }
  return images;
}

}  // namespace vkvlm
