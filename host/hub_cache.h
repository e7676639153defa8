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
// the cache. Throws, naming the name and where it looked, when neither is there.
std::string resolve_model_folder(const std::string& name);

// The cache folder the rules above choose (it need not exist).
std::string hub_cache_dir();

}  // namespace vkvlm
