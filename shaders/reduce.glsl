// Workgroup-wide reductions over gl_WorkGroupSize.x invocations (a power of two). With
// USE_SUBGROUP they reduce inside each subgroup first, whatever its size, then across
// subgroups; without it they use a shared-memory tree. Every invocation of the workgroup must
// call them in uniform control flow; every invocation gets the result.

shared float red_sh[gl_WorkGroupSize.x];

float wg_sum(float v) {
#ifdef USE_SUBGROUP
  v = subgroupAdd(v);
  if (subgroupElect()) red_sh[gl_SubgroupID] = v;
  barrier();
  float r = 0.0;
  for (uint i = 0; i < gl_NumSubgroups; ++i) r += red_sh[i];
  barrier();
  return r;
#else
  const uint tid = gl_LocalInvocationID.x;
  red_sh[tid] = v;
  barrier();
  for (uint s = gl_WorkGroupSize.x / 2; s > 0; s >>= 1) {
    if (tid < s) red_sh[tid] += red_sh[tid + s];
    barrier();
  }
  float r = red_sh[0];
  barrier();
  return r;
#endif
}

float wg_max(float v) {
#ifdef USE_SUBGROUP
  v = subgroupMax(v);
  if (subgroupElect()) red_sh[gl_SubgroupID] = v;
  barrier();
  float r = red_sh[0];
  for (uint i = 1; i < gl_NumSubgroups; ++i) r = max(r, red_sh[i]);
  barrier();
  return r;
#else
  const uint tid = gl_LocalInvocationID.x;
  red_sh[tid] = v;
  barrier();
  for (uint s = gl_WorkGroupSize.x / 2; s > 0; s >>= 1) {
    if (tid < s) red_sh[tid] = max(red_sh[tid], red_sh[tid + s]);
    barrier();
  }
  float r = red_sh[0];
  barrier();
  return r;
#endif
}
