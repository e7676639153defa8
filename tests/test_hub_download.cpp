// Downloads from a hub (tests/fake_hub.h: a local server answering as the Hugging Face hub does)
// into a temporary Hugging Face cache: the layout huggingface_hub writes (blobs by ETag, the
// snapshot's links into them, refs), only the files vkvlm reads, nothing fetched twice,
// resumption of a transfer cut short, a lock between concurrent downloads, and an error that
// says what happened for every failure: no such repository or revision, a gated one, no
// network, a full disk, a checksum mismatch, offline mode.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "host/hub_cache.h"
#include "host/hub_download.h"
#include "tests/expect_error.h"
#include "tests/fake_hub.h"
#include "tests/scoped_env.h"
#include "tests/scratch_dir.h"

namespace vkvlm::test {
namespace {
namespace fs = std::filesystem;

const std::string k_commit = "4c0ffee4c0ffee4c0ffee4c0ffee4c0ffee4c0ff";

fs::path temp_dir(const std::string& tag) {
  const fs::path p = scratch_dir() / ("dl-" + tag);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

// A model folder: what vkvlm reads (a config, a tokenizer, 600 KB of "weights") and what it does
// not (a README, a PyTorch checkpoint, a file in a subfolder).
fs::path model_folder(const std::string& tag) {
  const fs::path d = temp_dir(tag + "-src");
  std::ofstream(d / "config.json") << R"({"model_type": "llava"})";
  std::ofstream(d / "tokenizer.json") << R"({"model": {}})";
  std::string weights(600000, '\0');
  std::mt19937 rng(3);
  for (auto& c : weights) c = char(rng());
  std::ofstream(d / "model.safetensors", std::ios::binary) << weights;
  std::ofstream(d / "README.md") << "# a model";
  std::ofstream(d / "pytorch_model.bin") << "not read";
  fs::create_directories(d / "extra");
  std::ofstream(d / "extra" / "notes.json") << "{}";
  return d;
}

HubOptions options(const FakeHub& hub, const fs::path& cache) {
  HubOptions o;
  o.endpoint = hub.endpoint();
  o.cache = cache.string();
  return o;
}

TEST(HubDownload, FetchesWhatVkvlmReadsIntoTheHubCacheLayout) {
  FakeHub hub;
  const fs::path src = model_folder("layout"), cache = temp_dir("layout-cache");
  hub.add("acme/tiny", src, k_commit);
  const HubDownloadResult r = hub_download("acme/tiny", options(hub, cache));
  const fs::path repo = cache / "models--acme--tiny", snap = repo / "snapshots" / k_commit;
  EXPECT_EQ(r.snapshot, snap.string());
  EXPECT_EQ(r.commit, k_commit);
  EXPECT_EQ(r.fetched.size(), 3u);
  EXPECT_EQ(slurp(repo / "refs" / "main"), k_commit);
  for (const char* f : {"config.json", "tokenizer.json", "model.safetensors"}) {
    ASSERT_TRUE(fs::is_symlink(snap / f)) << f;
    EXPECT_EQ(fs::read_symlink(snap / f).parent_path(), fs::path("../../blobs")) << f;
    EXPECT_EQ(slurp(snap / f), slurp(src / f)) << f;
  }
  // LFS files' blobs are named by their SHA-256, as huggingface_hub names them.
  EXPECT_TRUE(fs::exists(repo / "blobs" / sha256_hex(slurp(src / "model.safetensors"))));
  for (const char* f : {"README.md", "pytorch_model.bin", "extra/notes.json"}) EXPECT_FALSE(fs::exists(snap / f)) << f;

  // Again: only the file list is asked for; nothing is downloaded twice.
  const int before = hub.requests();
  const HubDownloadResult again = hub_download("acme/tiny", options(hub, cache));
  EXPECT_TRUE(again.fetched.empty());
  EXPECT_EQ(hub.requests() - before, 1);
  // The model is then found by name with no network at all.
  Env c("HF_HUB_CACHE", cache.string()), e("HF_ENDPOINT", "http://127.0.0.1:1"), off("HF_HUB_OFFLINE", "");
  EXPECT_EQ(resolve_model_folder("acme/tiny"), snap.string());
  EXPECT_EQ(resolve_model_folder("acme/tiny@" + k_commit), snap.string());
}

TEST(HubDownload, MissingModelsAreDownloadedByNameUnlessOffline) {
  FakeHub hub;
  const fs::path src = model_folder("byname"), cache = temp_dir("byname-cache");
  hub.add("acme/tiny", src, k_commit);
  Env c("HF_HUB_CACHE", cache.string()), e("HF_ENDPOINT", hub.endpoint()), t("HF_TOKEN", "");
  {
    Env off("HF_HUB_OFFLINE", "1");
    expect_error([] { resolve_model_folder("acme/tiny"); }, {"acme/tiny", "HF_HUB_OFFLINE", "vkvlm download"});
    EXPECT_EQ(hub.requests(), 0) << "offline touches no network";
  }
  Env off("HF_HUB_OFFLINE", "");
  EXPECT_EQ(resolve_model_folder("acme/tiny"), (cache / "models--acme--tiny" / "snapshots" / k_commit).string());
}

TEST(HubDownload, AnInterruptedTransferResumesWhereItStopped) {
  FakeHub hub;
  const fs::path src = model_folder("resume"), cache = temp_dir("resume-cache");
  hub.add("acme/tiny", src, k_commit).drop_after = 200000;
  expect_error([&] { hub_download("acme/tiny", options(hub, cache)); },
               {"model.safetensors", "stopped after", "of 600000 bytes", "run again to resume"});
  const std::string sha = sha256_hex(slurp(src / "model.safetensors"));
  const fs::path part = cache / "models--acme--tiny" / "blobs" / (sha + ".incomplete");
  ASSERT_TRUE(fs::exists(part));
  EXPECT_GE(fs::file_size(part), 200000u);
  EXPECT_FALSE(fs::exists(cache / "models--acme--tiny" / "snapshots" / k_commit / "model.safetensors"));
  const HubDownloadResult r = hub_download("acme/tiny", options(hub, cache));
  EXPECT_EQ(hub.ranged_requests(), 1) << "the second run asked for the rest only";
  EXPECT_LT(r.bytes, 600000u);
  EXPECT_EQ(slurp(fs::path(r.snapshot) / "model.safetensors"), slurp(src / "model.safetensors"));
  EXPECT_FALSE(fs::exists(part));
}

// Four at once: every file is written once, and all four succeed (each links the snapshot to
// the blobs; a link is replaced atomically, never removed and re-created).
TEST(HubDownload, ConcurrentDownloadsShareOneBlobAndAllSucceed) {
  FakeHub hub;
  const fs::path src = model_folder("lock"), cache = temp_dir("lock-cache");
  hub.add("acme/tiny", src, k_commit);
  std::vector<HubDownloadResult> results(4);
  std::vector<std::string> errors(4);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < results.size(); ++i)
    threads.emplace_back([&, i] {
      try {
        results[i] = hub_download("acme/tiny", options(hub, cache));
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  size_t fetched = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    EXPECT_EQ(errors[i], "") << "download " << i;
    fetched += results[i].fetched.size();
  }
  EXPECT_EQ(fetched, 3u) << "each file was written once";
  EXPECT_EQ(slurp(fs::path(results[0].snapshot) / "model.safetensors"), slurp(src / "model.safetensors"));
}

// A transient server error's body never lands in the file being downloaded: the run fails naming
// the status, and the next one downloads the file whole.
TEST(HubDownload, AServerErrorsBodyNeverEndsUpInTheFile) {
  FakeHub hub;
  const fs::path src = model_folder("error500"), cache = temp_dir("error500-cache");
  hub.add("acme/tiny", src, k_commit).fail_once = {"tokenizer.json"};
  expect_error([&] { hub_download("acme/tiny", options(hub, cache)); }, {"tokenizer.json", "HTTP 500"});
  const fs::path blobs = cache / "models--acme--tiny" / "blobs";
  for (const auto& e : fs::directory_iterator(blobs))
    EXPECT_EQ(slurp(e.path()).find("Internal Server Error"), std::string::npos) << e.path();
  const HubDownloadResult r = hub_download("acme/tiny", options(hub, cache));
  EXPECT_EQ(slurp(fs::path(r.snapshot) / "tokenizer.json"), slurp(src / "tokenizer.json"));
}

// What an interrupted run left is checked, not trusted: a whole .incomplete (killed while it was
// being checked) is checked and moved into place without a request for bytes past its end (a
// 416); a wrong one, and a corrupt small file in the cache, are downloaded anew.
TEST(HubDownload, WhatAnEarlierRunLeftIsCheckedNotTrusted) {
  FakeHub hub;
  const fs::path src = model_folder("leftover"), cache = temp_dir("leftover-cache");
  hub.add("acme/tiny", src, k_commit);
  const fs::path repo = cache / "models--acme--tiny", blobs = repo / "blobs", snap = repo / "snapshots" / k_commit;
  const std::string weights = slurp(src / "model.safetensors"), tokenizer = slurp(src / "tokenizer.json");
  const fs::path weights_blob = blobs / sha256_hex(weights), tokenizer_blob = blobs / git_blob_sha1(tokenizer);
  hub_download("acme/tiny", options(hub, cache));
  ASSERT_TRUE(fs::exists(tokenizer_blob)) << "small files' blobs are named by their git SHA-1, as the hub's ETag";

  // The whole weights file left as .incomplete, its link gone.
  fs::remove(snap / "model.safetensors");
  fs::rename(weights_blob, weights_blob.string() + ".incomplete");
  const int ranged = hub.ranged_requests();
  HubDownloadResult r = hub_download("acme/tiny", options(hub, cache));
  EXPECT_EQ(hub.ranged_requests(), ranged) << "no Range past the end";
  EXPECT_EQ(r.bytes, 0u);
  EXPECT_EQ(slurp(snap / "model.safetensors"), weights);

  // A .incomplete of the right size but the wrong bytes: downloaded anew.
  fs::remove(snap / "model.safetensors");
  fs::remove(weights_blob);
  std::ofstream(weights_blob.string() + ".incomplete", std::ios::binary) << std::string(weights.size(), 'x');
  r = hub_download("acme/tiny", options(hub, cache));
  EXPECT_EQ(slurp(snap / "model.safetensors"), weights);

  // A corrupt tokenizer blob of the right size (an earlier version cached error pages): found by
  // its git SHA-1 and downloaded anew.
  fs::remove(tokenizer_blob);
  std::ofstream(tokenizer_blob, std::ios::binary) << std::string(tokenizer.size(), '?');
  r = hub_download("acme/tiny", options(hub, cache));
  EXPECT_EQ(r.fetched, std::vector<std::string>{"tokenizer.json"});
  EXPECT_EQ(slurp(snap / "tokenizer.json"), tokenizer);
}

// What a hub or a proxy answers that vkvlm did not ask for: a file list gzip-encoded (not
// inflated: refused), one that goes on past 32 MB (refused, not held), and redirects to relative
// URLs (followed from the folder that answered, as a browser would).
TEST(HubDownload, UnaskedEncodingsEndlessAnswersAndRelativeRedirects) {
  FakeHub hub;
  const fs::path src = model_folder("answers"), cache = temp_dir("answers-cache");
  hub.add("acme/gzip", src, k_commit).gzip_listing = true;
  expect_error([&] { hub_download("acme/gzip", options(hub, cache)); }, {"content coding", "gzip"});
  hub.add("acme/endless", src, k_commit).listing_padding = int64_t(40) << 20;
  expect_error([&] { hub_download("acme/endless", options(hub, cache)); }, {"more than 32 MB"});
  // A file list of another shape is named as such, with the hub and the repository.
  hub.add("acme/shape", src, k_commit).raw_listing = R"({"sha": 5, "siblings": []})";
  expect_error([&] { hub_download("acme/shape", options(hub, cache)); }, {"acme/shape", "another shape", "'sha'"});
  hub.add("acme/shape2", src, k_commit).raw_listing = R"({"sha": ")" + k_commit + R"(", "siblings": [{"rfilename": 3}]})";
  expect_error([&] { hub_download("acme/shape2", options(hub, cache)); }, {"acme/shape2", "another shape", "rfilename"});
  hub.add("acme/moved", src, k_commit).relative_redirects = true;
  const HubDownloadResult r = hub_download("acme/moved", options(hub, cache));
  EXPECT_EQ(slurp(fs::path(r.snapshot) / "tokenizer.json"), slurp(src / "tokenizer.json"));
}

// refs/main is replaced atomically: a process resolving the model while another download
// rewrites it never reads an empty or partial ref.
TEST(HubDownload, RefsAreNeverSeenHalfWritten) {
  FakeHub hub;
  const fs::path src = model_folder("refs"), cache = temp_dir("refs-cache");
  hub.add("acme/tiny", src, k_commit);
  hub_download("acme/tiny", options(hub, cache));
  const fs::path ref = cache / "models--acme--tiny" / "refs" / "main";
  std::atomic<bool> done{false};
  std::atomic<int> bad{0}, reads{0};
  std::thread reader([&] {
    while (!done) {
      if (slurp(ref) != k_commit) ++bad;
      ++reads;
    }
  });
  for (int i = 0; i < 20; ++i) hub_download("acme/tiny", options(hub, cache));
  done = true;
  reader.join();
  EXPECT_GT(reads.load(), 0);
  EXPECT_EQ(bad.load(), 0) << "of " << reads.load() << " reads";
}

TEST(HubDownload, FailuresSayWhatHappened) {
  FakeHub hub;
  const fs::path src = model_folder("errors"), cache = temp_dir("errors-cache");
  hub.add("acme/tiny", src, k_commit);
  hub.add("acme/gated", src, k_commit).token = "hf_right";
  hub.add("acme/corrupt", src, k_commit).wrong_checksum = true;
  hub.add("acme/portal", src, k_commit).html_listing = true;
  hub.add("acme/stripped", src, k_commit).no_etag = true;
  HubOptions o = options(hub, cache);
  expect_error([&] { hub_download("acme/portal", o); }, {"file list of acme/portal", "not JSON", hub.endpoint().c_str()});
  expect_error([&] { hub_download("acme/stripped", o); }, {"no usable ETag and size", "acme/stripped"});
  expect_error([&] { hub_download("acme/missing", o); }, {"no repository acme/missing", hub.endpoint().c_str()});
  expect_error([&] { hub_download("acme/tiny@v9", o); }, {"acme/tiny", "no revision 'v9'"});
  expect_error([&] { hub_download("not a repo", o); }, {"not a Hugging Face repository id"});
  expect_error([&] { hub_download("acme/gated", o); }, {"acme/gated", "needs permission", "401", "set HF_TOKEN"});
  o.token = "hf_wrong";
  expect_error([&] { hub_download("acme/gated", o); }, {"acme/gated", "403", "gated", "HF_TOKEN given has no access"});
  o.token = "hf_right";
  EXPECT_EQ(hub_download("acme/gated", o).fetched.size(), 3u);
  o.token.clear();
  expect_error([&] { hub_download("acme/corrupt", o); }, {"checksum mismatch", "model.safetensors", "removed"});
  EXPECT_FALSE(fs::exists(cache / "models--acme--corrupt" / "snapshots" / k_commit / "model.safetensors"));
  HubOptions dead = o;
  dead.endpoint = "http://127.0.0.1:1";
  expect_error([&] { hub_download("acme/tiny", dead); }, {"cannot reach http://127.0.0.1:1", "HF_HUB_OFFLINE"});

  // A disk that fills up: writes past 100 KB fail (the file-size limit stands in for a full
  // disk; its signal is ignored so that the write returns the error instead).
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit old_limit{};
  ::getrlimit(RLIMIT_FSIZE, &old_limit);
  rlimit small = old_limit;
  small.rlim_cur = 100000;
  ::setrlimit(RLIMIT_FSIZE, &small);
  std::string message;
  try {
    hub_download("acme/tiny", options(hub, temp_dir("full-cache")));
  } catch (const std::exception& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_NE(message.find("cannot write"), std::string::npos) << message;
  EXPECT_NE(message.find("disk full"), std::string::npos) << message;
}

// A hub that drips, one that announces an absurd size, and links planted in the cache: each fails
// with what happened, and nothing outside the cache is read, written or removed.
TEST(HubDownload, DripsAbsurdSizesAndPlantedLinks) {
  FakeHub hub;
  const fs::path src = model_folder("hostile"), cache = temp_dir("hostile-cache");
  HubOptions o = options(hub, cache);
  o.stall_seconds = 1;
  o.stall_bytes = 1024;
  hub.add("acme/drip", src, k_commit).drip_ms = 100;  // 10 bytes a second
  const auto t0 = std::chrono::steady_clock::now();
  expect_error([&] { hub_download("acme/drip", o); }, {"fewer than 1024 bytes in 1 s", "/api/models/acme/drip"});
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10)) << "the stall was noticed";

  hub.add("acme/huge", src, k_commit).announced_size = uint64_t(1) << 45;  // 32 TiB
  expect_error([&] { hub_download("acme/huge", o); }, {"not enough free space", "model.safetensors", "35184372088832 bytes"});
  for (const auto& e : fs::directory_iterator(cache / "models--acme--huge" / "blobs"))
    EXPECT_LT(fs::file_size(e.path()), 1000u) << e.path() << ": only the small files came, nothing of the weights";

  // A snapshot link planted to a file outside the cache: the download replaces the link and leaves
  // the file alone; offline resolution refuses it.
  hub.add("acme/tiny", src, k_commit);
  const fs::path outside = temp_dir("hostile-outside");
  std::ofstream(outside / "secret.json") << R"({"secret": true})";
  const fs::path snapshot = cache / "models--acme--tiny" / "snapshots" / k_commit;
  fs::create_directories(snapshot);
  fs::create_directories(cache / "models--acme--tiny" / "refs");
  std::ofstream(cache / "models--acme--tiny" / "refs" / "main") << k_commit;
  hub_download("acme/tiny", o);
  fs::remove(snapshot / "config.json");
  fs::create_symlink(outside / "secret.json", snapshot / "config.json");
  {
    Env c("HF_HUB_CACHE", cache.string()), off("HF_HUB_OFFLINE", "1");
    expect_error([&] { resolve_model_folder("acme/tiny"); }, {"config.json", "links outside the cache's blobs", "vkvlm download acme/tiny"});
  }
  hub_download("acme/tiny", o);
  EXPECT_EQ(slurp(snapshot / "config.json"), slurp(src / "config.json"));
  EXPECT_EQ(slurp(outside / "secret.json"), R"({"secret": true})") << "the planted link's target was not touched";

  // A blob's partial file planted as a link: the download never writes through it.
  const fs::path blobs = cache / "models--acme--weights" / "blobs";
  hub.add("acme/weights", src, k_commit);
  fs::create_directories(blobs);
  std::ofstream(outside / "victim") << "unchanged";
  const std::string etag = sha256_hex(slurp(src / "model.safetensors"));
  fs::create_symlink(outside / "victim", blobs / (etag + ".incomplete"));
  const HubDownloadResult r = hub_download("acme/weights", o);
  EXPECT_EQ(slurp(fs::path(r.snapshot) / "model.safetensors"), slurp(src / "model.safetensors"));
  EXPECT_EQ(slurp(outside / "victim"), "unchanged");
}

// A sharded checkpoint brings the shards its index names and no other *.safetensors; without an
// index, model.safetensors alone; an index naming a shard the repository lacks is an error.
TEST(HubDownload, TheShardsTheIndexNamesAndNoOtherWeights) {
  FakeHub hub;
  const fs::path src = temp_dir("shards-src"), cache = temp_dir("shards-cache");
  std::ofstream(src / "config.json") << R"({"model_type": "llava"})";
  for (const char* f : {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors"})
    std::ofstream(src / f) << "weights of " << f;
  std::ofstream(src / "model.safetensors.index.json")
      << R"({"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                           "b.weight": "model-00002-of-00002.safetensors",
                                           "c.weight": "model-00001-of-00002.safetensors"}})";
  hub.add("acme/sharded", src, k_commit);
  HubDownloadResult r = hub_download("acme/sharded", options(hub, cache));
  std::set<std::string> fetched(r.fetched.begin(), r.fetched.end());
  EXPECT_EQ(fetched, (std::set<std::string>{"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                            "model-00002-of-00002.safetensors"}));
  EXPECT_FALSE(fs::exists(fs::path(r.snapshot) / "consolidated.safetensors"));

  const fs::path single = temp_dir("single-src");
  std::ofstream(single / "config.json") << "{}";
  std::ofstream(single / "model.safetensors") << "the weights";
  std::ofstream(single / "adapter_model.safetensors") << "an adapter";
  hub.add("acme/single", single, k_commit);
  r = hub_download("acme/single", options(hub, cache));
  fetched = std::set<std::string>(r.fetched.begin(), r.fetched.end());
  EXPECT_EQ(fetched, (std::set<std::string>{"config.json", "model.safetensors"}));

  std::ofstream(src / "model.safetensors.index.json") << R"({"weight_map": {"a.weight": "model-00003-of-00003.safetensors"}})";
  hub.add("acme/broken-index", src, k_commit);
  expect_error([&] { hub_download("acme/broken-index", options(hub, temp_dir("broken-cache"))); },
               {"weight index of acme/broken-index", "model-00003-of-00003.safetensors", "does not hold"});
}

// Without HF_TOKEN, the token `huggingface-cli login` saved is used: $HF_TOKEN_PATH, else $HF_HOME/token.
TEST(HubDownload, TheTokenHuggingFaceCliLoginSaved) {
  FakeHub hub;
  const fs::path src = model_folder("saved-token"), home = temp_dir("hf-home");
  hub.add("acme/gated", src, k_commit).token = "hf_saved";
  std::ofstream(home / "token") << "hf_saved\n";
  Env t("HF_TOKEN", ""), old("HUGGING_FACE_HUB_TOKEN", ""), path("HF_TOKEN_PATH", ""), hf_home("HF_HOME", home.string());
  EXPECT_EQ(hub_saved_token(), "hf_saved");
  HubOptions o = HubOptions::from_environment();
  EXPECT_EQ(o.token, "hf_saved");
  o.endpoint = hub.endpoint();
  o.cache = temp_dir("saved-token-cache").string();
  EXPECT_EQ(hub_download("acme/gated", o).fetched.size(), 3u);
  // HF_TOKEN_PATH names the file elsewhere; HF_TOKEN, when set, wins over both.
  std::ofstream(home / "other") << "  hf_other  ";
  Env p2("HF_TOKEN_PATH", (home / "other").string());
  EXPECT_EQ(HubOptions::from_environment().token, "hf_other");
  Env t2("HF_TOKEN", "hf_env");
  EXPECT_EQ(HubOptions::from_environment().token, "hf_env");
}

TEST(HubDownload, OnlyTheFilesVkvlmReads) {
  for (const char* f : {"config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
                        "chat_template.jinja", "model.safetensors", "model-00001-of-00002.safetensors",
                        "model.safetensors.index.json"})
    EXPECT_TRUE(hub_file_needed(f)) << f;
  for (const char* f : {"README.md", "pytorch_model.bin", "tf_model.h5", "onnx/model.safetensors", ".gitattributes",
                        "config.json.bak", "original/config.json"})
    EXPECT_FALSE(hub_file_needed(f)) << f;
}

}  // namespace
}  // namespace vkvlm::test
