#pragma once
// Reading files a user or a model folder names: only regular files (a FIFO would block forever,
// /dev/zero never ends), opened without blocking, and never more than a stated number of bytes.
#include <cstdint>
#include <filesystem>
#include <string>

namespace vkvlm {

// The whole file, when it is a regular file of at most max_bytes; errors name `what` and the path.
std::string read_file_bounded(const std::string& path, uint64_t max_bytes, const std::string& what);

// Opens a regular file for reading without blocking on special files; returns the descriptor and
// its size. The caller closes it.
int open_regular_file(const std::string& path, const std::string& what, uint64_t& size);

// Whether `path` lies inside the folder `root` (both already resolved: canonical), not the folder itself.
bool path_inside(const std::filesystem::path& path, const std::filesystem::path& root);

}  // namespace vkvlm
