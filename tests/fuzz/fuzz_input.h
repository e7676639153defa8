#pragma once
// Helpers the fuzz harnesses share: an input split into the files a harness needs, and a
// scratch folder per process to write them into.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace vkvlm::fuzz {

// The parts of an input, separated by this line (the seed corpus uses it; mutations may move
// or break it, which only changes how the bytes are cut).
inline constexpr const char* k_separator = "\n--vkvlm-fuzz-part--\n";

inline std::vector<std::string> split_parts(const uint8_t* data, size_t size, size_t max_parts) {
  const std::string all(reinterpret_cast<const char*>(data), size);
  const std::string sep = k_separator;
  std::vector<std::string> parts;
  size_t at = 0;
  while (parts.size() + 1 < max_parts) {
    const size_t next = all.find(sep, at);
    if (next == std::string::npos) break;
    parts.push_back(all.substr(at, next - at));
    at = next + sep.size();
  }
  parts.push_back(all.substr(at));
  return parts;
}

// A folder of its own for this process (removed and made again for each input, and at exit).
inline std::filesystem::path fresh_dir() {
  static const struct Dir {
    std::filesystem::path path = std::filesystem::temp_directory_path() / ("vkvlm-fuzz-" + std::to_string(::getpid()));
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  } owner;
  const std::filesystem::path& dir = owner.path;
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  std::filesystem::create_directories(dir);
  return dir;
}

inline void write_file(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
}

}  // namespace vkvlm::fuzz
