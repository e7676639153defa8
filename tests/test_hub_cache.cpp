// Models named by Hugging Face repo id, found in a Hugging Face cache laid out as huggingface_hub
// lays it out (refs/REV holding the commit, snapshots/COMMIT/ with symlinks into blobs/): the
// cache folder's environment variables in their order, branches, tags and commits, and an error
// naming the name and the folder for everything missing.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "host/hub_cache.h"
#include "tests/expect_error.h"
#include "tests/scoped_env.h"
#include "tests/scratch_dir.h"

namespace vkvlm::test {
namespace {
namespace fs = std::filesystem;

const std::string k_commit = "0123456789abcdef0123456789abcdef01234567";
const std::string k_other = "fedcba9876543210fedcba9876543210fedcba98";

// A cache holding models--acme--tiny-vlm at two commits: main -> k_commit, v1 -> k_other; the
// snapshot files are symlinks into blobs/, as the hub library makes them.
fs::path make_cache(const std::string& tag) {
  const fs::path root = scratch_dir() / ("hub-" + tag);
  fs::remove_all(root);
  const fs::path repo = root / "models--acme--tiny-vlm";
  fs::create_directories(repo / "blobs");
  fs::create_directories(repo / "refs");
  std::ofstream(repo / "blobs" / "aaa") << "{\"model_type\": \"llava\"}";
  std::ofstream(repo / "blobs" / "bbb") << "weights";
  for (const auto& c : {k_commit, k_other}) {
    fs::create_directories(repo / "snapshots" / c);
    fs::create_symlink("../../blobs/aaa", repo / "snapshots" / c / "config.json");
    fs::create_symlink("../../blobs/bbb", repo / "snapshots" / c / "model.safetensors");
  }
  std::ofstream(repo / "refs" / "main") << k_commit;  // no newline, as huggingface_hub writes it
  std::ofstream(repo / "refs" / "v1") << k_other << "\n";
  fs::create_directories(repo / "snapshots" / "1111111111111111111111111111111111111111");  // a download cut short
  std::ofstream(repo / "refs" / "partial") << "1111111111111111111111111111111111111111";
  return root;
}

TEST(HubCache, RepoIdsResolveToTheirSnapshot) {
  const fs::path root = make_cache("resolve");
  Env cache("HF_HUB_CACHE", root.string()), legacy("HUGGINGFACE_HUB_CACHE", "");
  const fs::path snaps = root / "models--acme--tiny-vlm" / "snapshots";
  EXPECT_EQ(resolve_model_folder("acme/tiny-vlm"), (snaps / k_commit).string());
  EXPECT_EQ(resolve_model_folder("acme/tiny-vlm@main"), (snaps / k_commit).string());
  EXPECT_EQ(resolve_model_folder("acme/tiny-vlm@v1"), (snaps / k_other).string());
  EXPECT_EQ(resolve_model_folder("acme/tiny-vlm@" + k_other), (snaps / k_other).string());
  // The snapshot's files are readable through their links.
  std::ifstream in(fs::path(resolve_model_folder("acme/tiny-vlm")) / "config.json");
  std::string text((std::istreambuf_iterator<char>(in)), {});
  EXPECT_EQ(text, "{\"model_type\": \"llava\"}");
  // A folder of that name wins over the cache.
  const fs::path here = root / "acme" / "tiny-vlm";
  fs::create_directories(here);
  EXPECT_EQ(resolve_model_folder(here.string()), here.string());
  fs::remove_all(root);
}

TEST(HubCache, TheCacheFolderFollowsTheHubLibrarysVariables) {
  Env a("HF_HUB_CACHE", "/x/hub-cache"), b("HUGGINGFACE_HUB_CACHE", ""), c("HF_HOME", "/y/hf-home"),
      d("XDG_CACHE_HOME", "/z/xdg"), e("HOME", "/home/someone");
  EXPECT_EQ(hub_cache_dir(), "/x/hub-cache");
  ::unsetenv("HF_HUB_CACHE");
  EXPECT_EQ(hub_cache_dir(), "/y/hf-home/hub");
  ::unsetenv("HF_HOME");
  EXPECT_EQ(hub_cache_dir(), "/z/xdg/huggingface/hub");
  ::unsetenv("XDG_CACHE_HOME");
  EXPECT_EQ(hub_cache_dir(), "/home/someone/.cache/huggingface/hub");
}

TEST(HubCache, MissingModelsRevisionsAndFilesAreNamed) {
  const fs::path root = make_cache("errors");
  // Offline: nothing is downloaded (test_hub_download.cpp covers downloading what is missing).
  Env cache("HF_HUB_CACHE", root.string()), legacy("HUGGINGFACE_HUB_CACHE", ""), offline("HF_HUB_OFFLINE", "1");
  expect_error([] { resolve_model_folder("acme/other"); },
               {"acme/other", "models--acme--other", "HF_HUB_OFFLINE is set", "vkvlm download acme/other"});
  expect_error([] { resolve_model_folder("acme/tiny-vlm@v2"); }, {"acme/tiny-vlm@v2", "no revision 'v2'"});
  expect_error([] { resolve_model_folder("acme/tiny-vlm@" + std::string(40, 'e')); }, {"no snapshot"});
  expect_error([] { resolve_model_folder("acme/tiny-vlm@partial"); }, {"no config.json", "incomplete"});
  // A snapshot whose weights are missing (a download cut short) is not used either.
  fs::remove(root / "models--acme--tiny-vlm" / "blobs" / "bbb");
  expect_error([] { resolve_model_folder("acme/tiny-vlm"); }, {"incomplete snapshot", "weights"});
  // Not repo ids: paths, traversal, three parts; they are folders that do not exist.
  for (const char* name : {"../acme/tiny-vlm", "acme/tiny-vlm/extra", "acme/tiny-vlm@../../etc", "/nonexistent/model", ".hidden/x"})
    expect_error([&] { resolve_model_folder(name); }, {name});
  expect_error([] { resolve_model_folder("/nonexistent/model"); }, {"does not exist"});
  fs::remove_all(root);
}

}  // namespace
}  // namespace vkvlm::test
