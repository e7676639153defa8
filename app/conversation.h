#pragma once
// The images of a conversation, in the order the model takes them: image_url parts bring their
// own (data: URLs; local paths where the caller allows files), the others are taken in order from
// what the caller supplies (--image files, the C API's buffers).
#include <string>
#include <vector>

#include "host/image.h"
#include "models/model.h"

namespace vkvlm {

// Why the supplied images do not fit a conversation's slots, or "" when they do. `supplied`:
// how many images the caller gives for the image parts and text placeholders.
std::string check_supplied_images(const std::vector<ImageSlot>& slots, size_t supplied, const std::string& what);

// The conversation's images: image_url parts decoded (data: URLs, and local paths when
// `allow_files`; remote URLs are refused: vkvlm fetches nothing), the others from `supplied`.
std::vector<Image> conversation_images(const std::vector<ImageSlot>& slots, std::vector<Image> supplied, bool allow_files);

// An image_url's image: a data: URL, or (allow_files) a file path or file:// URL.
Image image_from_url(const std::string& url, bool allow_files);

}  // namespace vkvlm
