#include "host/hub_cache.h"

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>

#include <nlohmann/json.hpp>

#include "base/json.h"
#include "base/error.h"
#include "base/files.h"
#include "host/hub_download.h"

namespace vkvlm {
namespace fs = std::filesystem;

std::string hub_env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

bool parse_repo_id(const std::string& s, RepoId& out) {
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

std::string hub_saved_token() {
  fs::path path = hub_env("HF_TOKEN_PATH");
  if (path.empty()) {
    fs::path home = hub_env("HF_HOME");
    if (home.empty()) {
      const std::string xdg = hub_env("XDG_CACHE_HOME");
      home = (xdg.empty() ? fs::path(hub_env("HOME")) / ".cache" : fs::path(xdg)) / "huggingface";
    }
    path = home / "token";
  }
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return "";
  std::string token = read_file_bounded(path.string(), 4096, "Hugging Face token file");
  const size_t b = token.find_first_not_of(" \t\r\n"), e = token.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? "" : token.substr(b, e - b + 1);
}

std::string hub_cache_dir() {
  if (std::string v = hub_env("HF_HUB_CACHE"); !v.empty()) return v;
  if (std::string v = hub_env("HUGGINGFACE_HUB_CACHE"); !v.empty()) return v;  // the older name
  if (std::string v = hub_env("HF_HOME"); !v.empty()) return (fs::path(v) / "hub").string();
  if (std::string v = hub_env("XDG_CACHE_HOME"); !v.empty()) return (fs::path(v) / "huggingface" / "hub").string();
  return (fs::path(hub_env("HOME")) / ".cache" / "huggingface" / "hub").string();
}

namespace {

// Whether a snapshot holds a whole checkpoint: config.json and its weights (every shard its
// index names, or a .safetensors file), so that a download cut short is finished, not used.
bool snapshot_complete(const fs::path& snapshot) {
  std::error_code ec;
  if (!fs::exists(snapshot / "config.json", ec)) return false;
  const fs::path index = snapshot / "model.safetensors.index.json";
  if (fs::exists(index, ec)) {
    try {
      const auto j = parse_json(read_file_bounded(index.string(), 64 << 20, "weights index"));
      for (const auto& [tensor, file] : j.at("weight_map").items())
        if (!file.is_string() || !fs::exists(snapshot / file.get<std::string>(), ec)) return false;
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }
  for (const auto& e : fs::directory_iterator(snapshot, ec))
    if (e.path().extension() == ".safetensors" && fs::exists(e.path(), ec)) return true;
  return false;
}

}  // namespace

bool hub_offline() {
  std::string v = hub_env("HF_HUB_OFFLINE");
  for (char& c : v) c = char(std::tolower(static_cast<unsigned char>(c)));
  return v == "1" || v == "true" || v == "yes" || v == "on";
}

std::string cached_model_folder(const RepoId& repo, std::string* why) {
  std::error_code ec;
  const fs::path dir = fs::path(hub_cache_dir()) / repo.cache_folder();
  const std::string name = repo.id() + (repo.revision == "main" ? "" : "@" + repo.revision);
  auto missing = [&](const std::string& what) {
    if (why) *why = "model " + name + " " + what + " (looked in " + dir.string() + ")";
    return std::string();
  };
  if (!fs::is_directory(dir, ec)) return missing("is neither a folder nor in the Hugging Face cache");
  std::string commit;
  const fs::path ref = dir / "refs" / repo.revision;
  if (fs::is_regular_file(ref, ec)) {
    commit = read_file_bounded(ref.string(), 4096, "revision reference");
    while (!commit.empty() && std::isspace(static_cast<unsigned char>(commit.back()))) commit.pop_back();
    if (!is_commit_hash(commit)) fail("the Hugging Face cache's reference ", ref.string(), " does not hold a commit hash");
  } else if (is_commit_hash(repo.revision)) {
    commit = repo.revision;
  } else {
    return missing("has no revision '" + repo.revision + "' in the Hugging Face cache");
  }
  const fs::path snapshot = dir / "snapshots" / commit;
  if (!fs::is_directory(snapshot, ec))
    return missing("has no snapshot " + commit + " of revision '" + repo.revision + "' in the Hugging Face cache");
  if (!snapshot_complete(snapshot))
    return missing("has an incomplete snapshot " + snapshot.string() + " (no config.json or weights: a download cut short?)");
  // Every link in it must lead into the repository's blobs: one that leads elsewhere was planted.
  const fs::path blobs = fs::weakly_canonical(dir / "blobs", ec);
  std::error_code walk;
  for (auto it = fs::recursive_directory_iterator(snapshot, walk); !walk && it != fs::recursive_directory_iterator();
       it.increment(walk)) {
    if (!it->is_symlink(ec)) continue;
    const fs::path target = fs::weakly_canonical(it->path(), ec);
    if (!path_inside(target, blobs))
      fail("the Hugging Face cache's ", it->path().string(), " links outside the cache's blobs (to ", target.string(),
           "); remove it, or run `vkvlm download ", repo.id(), "` to fetch the file again");
  }
  return snapshot.string();
}

std::string resolve_model_folder(const std::string& name) {
  std::error_code ec;
  if (fs::is_directory(name, ec)) return name;
  RepoId repo;
  if (!parse_repo_id(name, repo)) {
    if (fs::exists(name, ec)) {
      const bool gguf = name.size() > 5 && name.compare(name.size() - 5, 5, ".gguf") == 0;
      fail("model ", name, gguf ? " is a GGUF file, which vkvlm does not read" : " is a file, not a model",
           ": give a Hugging Face or mlx-community checkpoint (a folder with config.json and .safetensors weights) "
           "or its repository id ORG/NAME");
    }
    fail("model folder ", name, " does not exist (give a folder with config.json and .safetensors weights, or a "
         "repository id ORG/NAME)");
  }
  std::string why;
  const std::string found = cached_model_folder(repo, &why);
  if (!found.empty()) return found;
  if (hub_offline()) fail(why, "; HF_HUB_OFFLINE is set, so nothing is downloaded (`vkvlm download ", name, "` fetches it)");
  const HubOptions o = HubOptions::from_environment();
  std::fprintf(stderr, "vkvlm: downloading %s from %s into %s\n", name.c_str(), o.endpoint.c_str(), o.cache.c_str());
  return hub_download(name, o).snapshot;
}

}  // namespace vkvlm
