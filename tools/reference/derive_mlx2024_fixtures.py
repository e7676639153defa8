#!/usr/bin/env python3
"""Derives checkpoints laid out as the mlx-community repos converted in 2024 were, and their
reference outputs.

The 2024 conversions (mlx-vlm of that year) differ from today's in ways a loader must take: every
weight cast to float16, scales and biases in float16, the vision tower's and the projector's
Linears quantized too (and every nn.Embedding, SigLIP's position embedding included), SigLIP's
MLP zero-padded to a multiple of the group size with vision_config.intermediate_size rewritten,
and a `quantization` block of {group_size, bits} alone. This script writes such a checkpoint
from a bf16 fixture, then makes its reference with make_fixture.py --weights-from (the current
transformers, float64, on the checkpoint's own weights, dequantized) for two of the fixture's cases:

  tools/reference/run derive_mlx2024_fixtures.py tests/data/fixtures tests/data/derived
"""
import json
import os
import shutil
import struct
import sys

import numpy as np

import make_fixture

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I32": np.int32, "U32": np.uint32}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def write_safetensors(path, tensors, metadata=None):
    names = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32"}
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        raw = arr.tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)


def quantize(w, bits, group):
    """MLX affine quantization of w [n, k]: uint32 words (lowest bits first), float16 scales and
    biases per group."""
    n, k = w.shape
    g = w.reshape(n, k // group, group).astype(np.float64)
    lo, hi = g.min(axis=2), g.max(axis=2)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).astype(np.float16)
    bias = lo.astype(np.float16)
    s64, b64 = scale.astype(np.float64)[..., None], bias.astype(np.float64)[..., None]
    q = np.where(s64 != 0, np.rint((g - b64) / np.where(s64 != 0, s64, 1)), 0)
    q = np.clip(q, 0, levels).astype(np.uint32).reshape(n, k)
    per_word = 32 // bits
    words = np.zeros((n, k // per_word), dtype=np.uint32)
    for j in range(per_word):
        words |= q[:, j::per_word] << np.uint32(bits * j)
    return words, scale, bias


def derive(src, out, bits, group, vision_names, pad_mlp_to):
    """src fixture folder -> out, the 2024-style checkpoint."""
    os.makedirs(out, exist_ok=True)
    index = os.path.join(src, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    hf = {}
    for f in files:
        hf.update(read_safetensors(os.path.join(src, f)))
    config = json.load(open(os.path.join(src, "config.json")))
    if pad_mlp_to:
        # Zero rows for fc1 (and its bias), zero columns for fc2: the same function.
        old = config["vision_config"]["intermediate_size"]
        for name in list(hf):
            if name.endswith("mlp.fc1.weight") and "vision" in name:
                hf[name] = np.concatenate([hf[name], np.zeros((pad_mlp_to - old, hf[name].shape[1]), np.float32)])
            elif name.endswith("mlp.fc1.bias") and "vision" in name:
                hf[name] = np.concatenate([hf[name], np.zeros(pad_mlp_to - old, np.float32)])
            elif name.endswith("mlp.fc2.weight") and "vision" in name:
                hf[name] = np.concatenate([hf[name], np.zeros((hf[name].shape[0], pad_mlp_to - old), np.float32)], axis=1)
        config["vision_config"]["intermediate_size"] = pad_mlp_to
    mlx = {}
    for name, w in hf.items():
        mlx_name = vision_names(name)
        is_conv = w.ndim in (4, 5)
        if is_conv:  # MLX keeps convolutions channels-last
            mlx[mlx_name] = np.moveaxis(w, 1, -1).astype(np.float16)
        elif w.ndim == 2 and name.endswith(".weight") and w.shape[1] % group == 0 and "norm" not in name:
            base = mlx_name[: -len(".weight")]
            mlx[base + ".weight"], mlx[base + ".scales"], mlx[base + ".biases"] = quantize(w, bits, group)
        else:
            mlx[mlx_name] = w.astype(np.float16)
    write_safetensors(os.path.join(out, "model.safetensors"), mlx, {"format": "mlx"})
    config["quantization"] = {"group_size": group, "bits": bits}
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float16"
    json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=4)
    for f in os.listdir(src):
        if f.endswith(".json") and f not in ("config.json", "model.safetensors.index.json", "cases.json"):
            shutil.copy(os.path.join(src, f), os.path.join(out, f))


def reference(src, out, cases):
    """The reference on the derived checkpoint's own weights (dequantized, SigLIP's padding cut
    off again) for the given cases of the source fixture: make_fixture.py --weights-from."""
    make_fixture.main([src, os.path.join(src, "cases.json"), out, "--weights-from", out, "--only", ",".join(cases),
                       "--pixel-budget", "0"])  # the source fixture has the pixels
    meta = json.load(open(os.path.join(out, "cases.json")))
    meta["derived_from"] = os.path.basename(src)
    meta["reference"] += "; checkpoint written by tools/reference/derive_mlx2024_fixtures.py"
    json.dump(meta, open(os.path.join(out, "cases.json"), "w"), indent=1, ensure_ascii=False)


def main():
    fixtures, out_root = sys.argv[1], sys.argv[2]
    # PaliGemma as mlx-community/paligemma-3b-mix-448-8bit was made: 8-bit, every Linear and
    # Embedding, SigLIP's MLP padded (here 128 -> 192).
    src = os.path.join(fixtures, "paligemma-bf16")
    out = os.path.join(out_root, "paligemma-mlx8-2024")
    derive(src, out, 8, 64, lambda n: n, 192)
    reference(src, out, ["describe", "gray"])
    # Qwen2-VL as mlx-community/Qwen2-VL-2B-Instruct-4bit was made: 4-bit, the vision tower and
    # merger quantized too, mlx-vlm's names.
    src = os.path.join(fixtures, "qwen2vl-bf16")
    out = os.path.join(out_root, "qwen2vl-mlx4-2024")
    rename = lambda n: ("vision_tower." + n[len("visual."):]) if n.startswith("visual.") else ("language_model." + n)
    derive(src, out, 4, 64, rename, 0)
    reference(src, out, ["describe", "two_images"])


if __name__ == "__main__":
    main()
