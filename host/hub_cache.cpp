#include "host/hub_cache.h"

#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>

#include "base/error.h"
#include "base/files.h"

namespace vkvlm {
namespace fs = std::filesystem;

namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

// A hub repository id: ORG/NAME, each of letters, digits, '-', '_' and '.', not starting with
// '.' or '-' (so no path can pose as one), and an optional @REVISION of the same characters and '/'.
struct RepoName {
  std::string org, name, revision;
};
bool parse_repo_name(const std::string& s, RepoName& out) {
  static const std::regex re(R"(^([A-Za-z0-9_][A-Za-z0-9_.\-]{0,95})/([A-Za-z0-9_][A-Za-z0-9_.\-]{0,95})(?:@([A-Za-z0-9_][A-Za-z0-9_.\-/]{0,199}))?$)");
  std::smatch m;
  if (!std::regex_match(s, m, re)) return false;
  out.org = m[1];
  out.name = m[2];
  out.revision = m[3].matched ? std::string(m[3]) : "main";
  return out.revision.find("..") == std::string::npos;
}

bool is_commit_hash(const std::string& s) {
  static const std::regex re("^[0-9a-f]{40}$");
  return std::regex_match(s, re);
}

}  // namespace

std::string hub_cache_dir() {
  if (std::string v = env("HF_HUB_CACHE"); !v.empty()) return v;
  if (std::string v = env("HUGGINGFACE_HUB_CACHE"); !v.empty()) return v;  // the older name
  if (std::string v = env("HF_HOME"); !v.empty()) return (fs::path(v) / "hub").string();
  if (std::string v = env("XDG_CACHE_HOME"); !v.empty()) return (fs::path(v) / "huggingface" / "hub").string();
  return (fs::path(env("HOME")) / ".cache" / "huggingface" / "hub").string();
}

std::string resolve_model_folder(const std::string& name) {
  std::error_code ec;
  if (fs::is_directory(name, ec)) return name;
  RepoName repo;
  if (!parse_repo_name(name, repo)) {
    if (fs::exists(name, ec)) fail("model ", name, " is not a folder");
    fail("model folder ", name, " does not exist");
  }
  const fs::path root = hub_cache_dir();
  const fs::path dir = root / ("models--" + repo.org + "--" + repo.name);
  const std::string where = " (looked in " + dir.string() + "; download it with `huggingface-cli download " + repo.org +
                            "/" + repo.name + "`)";
  if (!fs::is_directory(dir, ec)) fail("model ", name, " is neither a folder nor in the Hugging Face cache", where);
  std::string commit;
  const fs::path ref = dir / "refs" / repo.revision;
  if (fs::is_regular_file(ref, ec)) {
    commit = read_file_bounded(ref.string(), 4096, "revision reference");
    while (!commit.empty() && std::isspace(static_cast<unsigned char>(commit.back()))) commit.pop_back();
    if (!is_commit_hash(commit)) fail("the Hugging Face cache's reference ", ref.string(), " does not hold a commit hash");
  } else if (is_commit_hash(repo.revision)) {
    commit = repo.revision;
  } else {
    fail("model ", name, ": the Hugging Face cache has no revision '", repo.revision, "'", where);
  }
  const fs::path snapshot = dir / "snapshots" / commit;
  if (!fs::is_directory(snapshot, ec))
    fail("model ", name, ": the Hugging Face cache has no snapshot ", commit, " of revision '", repo.revision, "'", where);
  if (!fs::exists(snapshot / "config.json", ec))
    fail("model ", name, ": its snapshot ", snapshot.string(), " has no config.json (an incomplete download?)", where);
  return snapshot.string();
}

}  // namespace vkvlm
