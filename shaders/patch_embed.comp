#version 450
// Vision patch embedding: a convolution with kernel = stride = P over CHW pixels, then the class
// token first and position embeddings added:
//   y[b, 0, e]     = class[e] + pos[0, e]                          (with a class token)
//   y[b, 1 + q, e] = sum_{c,ky,kx} px[b, c, py*P + ky, px*P + kx] * w[e, c, ky, kx] (+ conv_bias[e]) + pos[1 + q, e]
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(local_size_x_id = 0) in;

#define PUSH_PATCH_EMBED
#include "push_constants.h"

layout(binding = 0) readonly buffer PixBuf { float px[]; };
layout(binding = 1) readonly buffer WBuf { float w[]; };
layout(binding = 2) readonly buffer ClassBuf { float cls[]; };
layout(binding = 3) readonly buffer PosBuf { float pos[]; };
layout(binding = 4) readonly buffer ConvBiasBuf { float conv_bias[]; };
layout(binding = 5) writeonly buffer YBuf { float ys[]; };

void main() {
  const uint e = gl_GlobalInvocationID.x;
  const uint tok = gl_GlobalInvocationID.y;
  const uint b = gl_GlobalInvocationID.z;
  const bool has_class = (p.flags & 1u) != 0u;
  const uint n_tokens = p.n_patches + (has_class ? 1u : 0u);
  if (e >= p.E || tok >= n_tokens || b >= p.B) return;
  float v;
  if (has_class && tok == 0u) {
    v = cls[e];
  } else {
    const uint q = has_class ? tok - 1u : tok;
    const uint py = q / p.grid_w, pxx = q % p.grid_w;
    v = (p.flags & 2u) != 0u ? conv_bias[e] : 0.0;
    for (uint c = 0; c < p.C; ++c) {
      for (uint ky = 0; ky < p.P; ++ky) {
        const uint prow = ((b * p.C + c) * p.H + py * p.P + ky) * p.W + pxx * p.P;
        const uint wrow = ((e * p.C + c) * p.P + ky) * p.P;
        for (uint kx = 0; kx < p.P; ++kx) v += px[prow + kx] * w[wrow + kx];
      }
    }
  }
  ys[p.y_off + (b * n_tokens + tok) * p.y_stride + e] = v + pos[tok * p.E + e];
}
