#pragma once
// What the kernel and end-to-end benches share: the device's buffer-copy bandwidth, measured in
// the same run as the figures it is the yardstick for.
#include <algorithm>
#include <cstdint>

#include "gpu/context.h"
#include "gpu/recorder.h"

namespace vkvlm::bench {

// Bytes read plus bytes written per second by a device-local buffer copy of `bytes` (capped at an
// eighth of device memory), timed with GPU timestamps where the device has them.
inline double copy_bandwidth(gpu::Context& ctx, uint64_t bytes, int reps = 5) {
  bytes = std::min<uint64_t>(bytes, ctx.profile().device_local_bytes / 8);
  auto a = ctx.tensor(gpu::DType::U8, {int64_t(bytes)}, "copy source");
  auto b = ctx.tensor(gpu::DType::U8, {int64_t(bytes)}, "copy destination");
  ctx.fill_bytes(a, 1);
  {
    gpu::Recorder warm(ctx);
    warm.copy(a, 0, b, 0, bytes);
    warm.submit();
  }
  gpu::Recorder rec(ctx);
  const int t0 = rec.timestamp();
  for (int i = 0; i < reps; ++i) rec.copy(a, 0, b, 0, bytes);
  const int t1 = rec.timestamp();
  rec.submit();
  const double ns = (t0 >= 0 && t1 >= 0) ? rec.elapsed_ns(t0, t1) : rec.cpu_ns();
  return 2.0 * double(bytes) / (ns * 1e-9 / reps);
}

}  // namespace vkvlm::bench
