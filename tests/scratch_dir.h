#pragma once
// One folder per test process for the files tests write (models, caches, inputs), removed when
// the process exits, so that runs leave nothing behind in the temporary directory.
#include <unistd.h>

#include <filesystem>
#include <string>

namespace vkvlm::test {

inline const std::filesystem::path& scratch_dir() {
  static const struct Dir {
    std::filesystem::path path;
    Dir() {
      path = std::filesystem::temp_directory_path() / ("vkvlm-test-" + std::to_string(::getpid()));
      std::filesystem::create_directories(path);
    }
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  } dir;
  return dir.path;
}

}  // namespace vkvlm::test
