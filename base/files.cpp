#include "base/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "base/error.h"

namespace vkvlm {

int open_regular_file(const std::string& path, const std::string& what, uint64_t& size) {
  if (path.find('\0') != std::string::npos) fail(what, " path holds a NUL byte");
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) fail(what, " ", path, " does not exist");
    fail("cannot read ", what, " ", path, ": ", std::strerror(errno));
  }
  if (S_ISDIR(st.st_mode)) fail(what, " ", path, " is a folder");
  if (!S_ISREG(st.st_mode)) fail(what, " ", path, " is not a regular file");
  // O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening does not hang.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail("cannot read ", what, " ", path, ": ", std::strerror(errno));
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(what, " ", path, " is not a regular file");
  }
  size = uint64_t(st.st_size);
  return fd;
}

std::string read_file_bounded(const std::string& path, uint64_t max_bytes, const std::string& what) {
  uint64_t size = 0;
  const int fd = open_regular_file(path, what, size);
  if (size > max_bytes) {
    ::close(fd);
    fail(what, " ", path, " is ", size, " bytes, more than the limit of ", max_bytes);
  }
  std::string out(size, '\0');
  size_t got = 0;
  while (got < size) {
    const ssize_t n = ::read(fd, out.data() + got, size - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // the file shrank while being read
    got += size_t(n);
  }
  ::close(fd);
  out.resize(got);
  return out;
}

bool path_inside(const std::filesystem::path& path, const std::filesystem::path& root) {
  if (root.empty()) return false;
  const std::filesystem::path rel = path.lexically_relative(root);
  return !rel.empty() && rel != "." && *rel.begin() != ".." && !rel.is_absolute();
}

}  // namespace vkvlm
