#!/usr/bin/python3
"""Reference logits with a quantized KV cache (mlx-lm's QuantizedKVCache, `--kv-bits`), from Hugging
Face transformers in float64 (../shared/tools/hf-reference).

Every K and V row the model caches is replaced, before any attention reads it (the prompt's own
rows included), by its MLX affine quantization: per group of GROUP values along each head, the
endpoint of larger magnitude is the bias, the scale spans the range in 2^BITS - 1 steps (MLX's
affine_quantize, mlx/ops.cpp), both rounded to f16, values rounded half to even. The sequence
(the prompt, then the given generated tokens, fed one at a time as decoding does) is teacher-forced,
so every step's logits are comparable with vkvlm's even where a near-tie makes the tokens differ.

  PYTHONPATH=~/hf-reference/site HF_HUB_OFFLINE=1 /usr/bin/python3 tools/quantized_kv_reference.py \
      MODEL_DIR RUN.json BITS GROUP [--weights-from MLX_DIR] IMAGE... > tests/data/quantized_kv/NAME.json

--weights-from: an mlx-community twin of MODEL_DIR (same architecture, its language model in MLX
affine quantization, e.g. qwen2vl-mlx4 for qwen2vl-bf16): the language model's weights are that
twin's, dequantized (W = scale * q + bias), which transformers cannot load itself.

RUN.json: `vkvlm generate --json` output (prompt_tokens and tokens). Writes, per step (the
prompt's last row, then each generated token's row), the five largest logits as [id, value].
Qwen2-VL and PaliGemma checkpoints; images as the case gives them.
"""
import json
import struct
import sys

import numpy as np
import torch
import transformers as T
from PIL import Image
from transformers.cache_utils import DynamicCache


def quantize_dequantize(x, bits, group):
    """x [..., D]: MLX affine quantization per group along the last axis, back to float64."""
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
    scale = scale.to(torch.float16).to(x.dtype)
    bias = bias.to(torch.float16).to(x.dtype)
    q = torch.clamp(torch.round((g - bias) / scale), 0, n_bins)
    return (q * scale + bias).reshape(shape)


class QuantizedCache(DynamicCache):
    def __init__(self, bits, group):
        super().__init__()
        self.bits, self.group = bits, group

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        return super().update(quantize_dequantize(key_states, self.bits, self.group),
                              quantize_dequantize(value_states, self.bits, self.group), layer_idx, cache_kwargs)


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b = data[t["data_offsets"][0]:t["data_offsets"][1]]
        if t["dtype"] == "BF16":
            a = (np.frombuffer(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(b, dtype={"U32": np.uint32, "F16": np.float16, "F32": np.float32}[t["dtype"]])
        out[name] = a.reshape(t["shape"])
    return out


def load_mlx_language_model(model, mlx_dir):
    """Overwrites model's language-model weights with the MLX twin's, dequantized."""
    q = json.load(open(mlx_dir + "/config.json"))["quantization"]
    bits, group = q["bits"], q["group_size"]
    tensors = {}
    for f in json.load(open(mlx_dir + "/model.safetensors.index.json"))["weight_map"].values():
        if f not in tensors:
            tensors[f] = read_safetensors(mlx_dir + "/" + f)
    mlx = {k: v for t in tensors.values() for k, v in t.items()}
    state = model.state_dict()
    replaced = 0
    for name in state:
        if name.startswith("visual.") or name.startswith("vision_tower.") or name.startswith("multi_modal_projector."):
            continue
        mlx_name = "language_model." + name if not name.startswith("language_model.") else name
        base = mlx_name[:-len(".weight")] if mlx_name.endswith(".weight") else None
        if base and base + ".scales" in mlx:
            words = mlx[mlx_name]
            per = 32 // bits
            codes = (words[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & ((1 << bits) - 1)
            codes = codes.reshape(words.shape[0], -1).astype(np.float64)
            scales = np.repeat(mlx[base + ".scales"].astype(np.float64), group, axis=1)
            biases = np.repeat(mlx[base + ".biases"].astype(np.float64), group, axis=1)
            value = codes * scales + biases
        elif mlx_name in mlx:
            value = mlx[mlx_name].astype(np.float64)
        else:
            continue
        assert tuple(value.shape) == tuple(state[name].shape), name
        state[name].copy_(torch.from_numpy(value))
        replaced += 1
    assert replaced > 0, "no language-model weights found in " + mlx_dir


def main():
    args = sys.argv[1:]
    weights_from = None
    if "--weights-from" in args:
        i = args.index("--weights-from")
        weights_from = args[i + 1]
        del args[i:i + 2]
    model_dir, run_file, bits, group = args[0], args[1], int(args[2]), int(args[3])
    images = [Image.open(p).convert("RGB") for p in args[4:]]  # as the fixtures were made
    run = json.load(open(run_file))
    prompt, generated = run["prompt_tokens"], run["tokens"]
    config = json.load(open(model_dir + "/config.json"))
    qwen = config["model_type"] == "qwen2_vl"
    cls = T.Qwen2VLForConditionalGeneration if qwen else T.PaliGemmaForConditionalGeneration
    model = cls.from_pretrained(model_dir, torch_dtype=torch.float64).eval()
    if weights_from:
        with torch.no_grad():
            load_mlx_language_model(model, weights_from)
    extra = {}
    if images:
        pixels = T.AutoImageProcessor.from_pretrained(model_dir)(images=images, return_tensors="pt")
        extra["pixel_values"] = pixels["pixel_values"].to(torch.float64)
        if qwen:
            extra["image_grid_thw"] = pixels["image_grid_thw"]
    ids = torch.tensor([prompt])
    cache = QuantizedCache(bits, group)
    steps = []

    def top5(logits):
        values, idx = torch.topk(logits[0, -1].double(), 5)
        return [[int(i), float(v)] for v, i in zip(values, idx)]

    with torch.no_grad():
        mask = torch.ones_like(ids)
        if qwen:
            positions, deltas = model.get_rope_index(ids, extra.get("image_grid_thw"), None, mask)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                        **extra)
        else:  # PaliGemma: the prompt (image and prefix) attends to itself whole
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                        cache_position=torch.arange(len(prompt)), **extra)
        steps.append(top5(out.logits))
        for i, token in enumerate(generated[:-1]):
            n = len(prompt) + i  # the token's index in the sequence
            mask = torch.ones((1, n + 1), dtype=torch.long)
            tok = torch.tensor([[token]])
            if qwen:
                pos = (torch.tensor([[[n]]]) + deltas.reshape(1, 1, 1)).expand(3, 1, 1)
                out = model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            else:
                out = model(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True,
                            cache_position=torch.tensor([n]))
            steps.append(top5(out.logits))
    json.dump({"bits": bits, "group_size": group, "prompt_tokens": prompt, "tokens": generated, "top5": steps},
              sys.stdout)


if __name__ == "__main__":
    main()
