#pragma once
// vkvlm-bench --model-shape NAME | --model DIR: the end-to-end benchmark (bench/bench_model.cpp).
namespace vkvlm::bench {

// Parses the end-to-end bench's flags from argv and runs it; returns the exit code.
int run_model_bench(int argc, char** argv);

}  // namespace vkvlm::bench
