#pragma once
// Models named as on the Hugging Face hub (ORG/NAME[@REVISION]), found in the local Hugging Face
// cache exactly as the Python tools lay it out, so a model downloaded with huggingface-cli or
// transformers is used where it is, with no copy:
//   $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
//   ~/.cache/huggingface/hub; then models--ORG--NAME/refs/REVISION (a commit hash) and
//   models--ORG--NAME/snapshots/COMMIT/ (files there are symlinks into ../../blobs/).
#include <string>

namespace vkvlm {

// The folder a model name stands for: an existing folder as it is; otherwise, for a name of the
// form ORG/NAME[@REVISION] (REVISION: a branch, tag or commit; default main), its snapshot in
// the cache, downloaded from the hub first when the cache lacks it (host/hub_download.h) unless
// HF_HUB_OFFLINE is set. Throws, naming the name and where it looked, when it cannot be had.
std::string resolve_model_folder(const std::string& name);

// The cache folder the rules above choose (it need not exist).
std::string hub_cache_dir();
// The token `huggingface-cli login` saved: the file $HF_TOKEN_PATH, else $HF_HOME/token (HF_HOME
// defaulting to $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface); "" when there is none.
std::string hub_saved_token();
// HF_HUB_OFFLINE is set (1, true, yes, on): nothing is downloaded.
bool hub_offline();
// An environment variable of the hub's (HF_ENDPOINT, HF_TOKEN, ...), "" when unset.
std::string hub_env(const char* name);

// A hub repository id: ORG/NAME, each of letters, digits, '-', '_' and '.', not starting with
// '.' or '-' (so no path can pose as one), and an optional @REVISION (default main).
struct RepoId {
  std::string org, name, revision;
  std::string id() const { return org + "/" + name; }
  std::string cache_folder() const { return "models--" + org + "--" + name; }
};
bool parse_repo_id(const std::string& s, RepoId& out);
bool is_commit_hash(const std::string& s);

// The snapshot of `repo` in the cache when it holds the whole checkpoint (config.json and every
// weight file); otherwise "" and, in *why, what is missing and where it looked.
std::string cached_model_folder(const RepoId& repo, std::string* why = nullptr);

}  // namespace vkvlm
