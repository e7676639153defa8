#!/usr/bin/env python3
"""Reference logits with a quantized KV cache (mlx-lm's QuantizedKVCache, vkvlm's `--kv-bits`):
transformers in float64, every K and V row the model caches replaced, before any attention reads
it (the prompt's own rows included), by its MLX affine quantization, for tests/data/quantized_kv/:

    tools/reference/run quantized_kv_reference.py FIXTURE_DIR CASE BITS GROUP [--source DIR] \
        > tests/data/quantized_kv/FIXTURE.CASE.qBITSgGROUP.json

FIXTURE_DIR: a fixture folder (its cases.json gives the case's chat and images, its
expected.safetensors the prompt ids, which the processor must give again). An mlx-community twin
needs --source, the folder it was converted from (the architecture and processor), and its own
weights are then used, dequantized (mlx_weights.py).

MLX's affine quantization per group of GROUP values along each head (mlx/ops.cpp
affine_quantize): the endpoint of larger magnitude is the bias, the scale spans the range in
2^BITS - 1 steps, both rounded to float16, codes computed with the unrounded ones, rounded half to
even. Decoding is greedy, 12 steps, with generate()'s KV cache; per step (the prompt's last row,
then each generated token's) the five largest logits as [id, value].
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.cache_utils import DynamicCache

from make_fixture import load, model_inputs

STEPS = 12


def quantize_dequantize(x, bits, group):
    """x [..., D]: MLX affine quantization per group along the last axis, back to x's dtype."""
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    n_bins = float(2 ** bits - 1)
    low_edge = lo.abs() > hi.abs()
    scale = ((hi - lo) / n_bins).clamp(min=1e-7)
    scale = torch.where(low_edge, scale, -scale)
    edge = torch.where(low_edge, lo, hi)
    q0 = torch.round(edge / scale)
    scale = torch.where(q0 != 0, edge / q0, scale)
    bias = torch.where(q0 == 0, torch.zeros_like(edge), edge)
    q = torch.clamp(torch.round((g - bias) / scale), 0, n_bins)
    scale = scale.to(torch.float16).to(x.dtype)
    bias = bias.to(torch.float16).to(x.dtype)
    return (q * scale + bias).reshape(shape)


class QuantizedCache(DynamicCache):
    """A KV cache that keeps every row as its quantized-then-dequantized value."""

    def __init__(self, bits, group, **kwargs):
        super().__init__(**kwargs)
        self.bits, self.group = bits, group

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(quantize_dequantize(key_states, self.bits, self.group),
                              quantize_dequantize(value_states, self.bits, self.group), layer_idx, *args, **kwargs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("fixture", type=Path)
    p.add_argument("case")
    p.add_argument("bits", type=int)
    p.add_argument("group", type=int)
    p.add_argument("--source", type=Path, default=None,
                   help="for an mlx-community twin: the folder it was converted from")
    a = p.parse_args()
    twin = a.source is not None
    config, processor, model = load(a.source or a.fixture, a.fixture if twin else None)
    case = next((c for c in json.loads((a.fixture / "cases.json").read_text())["cases"] if c["name"] == a.case), None)
    if case is None:
        sys.exit(f"quantized_kv_reference: no case '{a.case}' in {a.fixture / 'cases.json'}")
    _, inputs = model_inputs(processor, config, case, a.fixture.parent / "images")
    prompt = inputs["input_ids"][0].tolist()
    with safe_open(str(a.fixture / "expected.safetensors"), "pt") as f:
        fixture_ids = f.get_tensor(a.case + ".input_ids").tolist()
    if prompt != fixture_ids:
        sys.exit("quantized_kv_reference: the processor's prompt ids are not the fixture's")
    cache = QuantizedCache(a.bits, a.group, config=model.config)
    with torch.no_grad():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    # generate() hands its logits back in float32: each step's row again in float64 is not needed,
    # the tests compare within 2e-3 relative.
    top5 = []
    for logits in out.logits:
        values, ids = torch.topk(logits[0].to(torch.float64), 5)
        top5.append([[int(i), float(v)] for v, i in zip(values, ids)])
    tokens = out.sequences[0, len(prompt):].tolist()
    json.dump({"bits": a.bits, "group_size": a.group, "prompt_tokens": prompt, "tokens": tokens, "top5": top5},
              sys.stdout)


if __name__ == "__main__":
    main()
