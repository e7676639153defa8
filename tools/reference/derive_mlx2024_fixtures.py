#!/usr/bin/env python3
"""Derives checkpoints laid out as the mlx-community repos converted in 2024 were, and their
reference outputs.

The 2024 conversions (mlx-vlm of that year) differ from today's in ways a loader must take: every
weight cast to float16, scales and biases in float16, the vision tower's and the projector's
Linears quantized too (and every nn.Embedding, SigLIP's position embedding included), SigLIP's
MLP zero-padded to a multiple of the group size with vision_config.intermediate_size rewritten,
and a `quantization` block of {group_size, bits} alone. This script writes such a checkpoint
from a bf16 fixture, then runs the Hugging Face reference (transformers 4.45.1, float64) on the
dequantized weights for the fixture's cases, keeping everything that does not depend on the
weights (prompt ids, positions, pixel statistics) from the fixture.

usage (the reference as ../shared/tools/hf-reference/README.md sets it up):
  PYTHONPATH=~/hf-reference/site HF_HUB_OFFLINE=1 /usr/bin/python3 tools/derive_mlx2024_fixtures.py \\
      tests/data/fixtures tests/data/derived
"""
import json
import os
import shutil
import struct
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

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
    biases per group; returns them and the values they stand for (float64)."""
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
    deq = (s64 * q.reshape(n, k // group, group) + b64).reshape(n, k)
    return words, scale, bias, deq


def derive(src, out, arch, bits, group, vision_names, pad_mlp_to):
    """src fixture folder -> out (the 2024-style checkpoint) and the dequantized float64 weights
    under their Hugging Face names."""
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
    mlx, deq = {}, {}
    for name, w in hf.items():
        mlx_name = vision_names(name)
        is_conv = w.ndim in (4, 5)
        if is_conv:  # MLX keeps convolutions channels-last
            mlx[mlx_name] = np.moveaxis(w, 1, -1).astype(np.float16)
            deq[name] = mlx[mlx_name].astype(np.float64)
            deq[name] = np.moveaxis(deq[name], -1, 1)
        elif w.ndim == 2 and name.endswith(".weight") and w.shape[1] % group == 0 and "norm" not in name:
            base = mlx_name[: -len(".weight")]
            words, scale, bias, values = quantize(w, bits, group)
            mlx[base + ".weight"], mlx[base + ".scales"], mlx[base + ".biases"] = words, scale, bias
            deq[name] = values
        else:
            mlx[mlx_name] = w.astype(np.float16)
            deq[name] = mlx[mlx_name].astype(np.float64)
    write_safetensors(os.path.join(out, "model.safetensors"), mlx, {"format": "mlx"})
    config["quantization"] = {"group_size": group, "bits": bits}
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float16"
    json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=4)
    for f in os.listdir(src):
        if f.endswith(".json") and f not in ("config.json", "model.safetensors.index.json", "cases.json"):
            shutil.copy(os.path.join(src, f), os.path.join(out, f))
    return config, deq


def reference(arch, config, deq, src, out, case_names):
    """The reference's outputs on the dequantized weights, for the given cases of the source
    fixture."""
    import transformers as T

    work = tempfile.mkdtemp()
    ref_config = dict(config)
    ref_config.pop("quantization")
    ref_config["torch_dtype"] = "float64"
    json.dump(ref_config, open(os.path.join(work, "config.json"), "w"))
    write_safetensors(os.path.join(work, "model.safetensors"), {k: v.astype(np.float32) for k, v in deq.items()}, {"format": "pt"})
    cls = T.PaliGemmaForConditionalGeneration if arch == "paligemma" else T.Qwen2VLForConditionalGeneration
    model = cls.from_pretrained(work, torch_dtype=torch.float32).to(torch.float64).eval()
    # The float32 file rounds nothing: every value came from float16 or float16 * integer + float16.
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if name in deq:
                param.copy_(torch.from_numpy(deq[name]))
    expected_src = read_safetensors(os.path.join(src, "expected.safetensors"))
    cases = json.load(open(os.path.join(src, "cases.json")))
    pre = json.load(open(os.path.join(src, "preprocessor_config.json")))
    proc = (T.SiglipImageProcessor if arch == "paligemma" else T.Qwen2VLImageProcessor)(**{k: v for k, v in pre.items() if k not in ("image_processor_type", "processor_class")})
    images_dir = os.path.join(os.path.dirname(src), "images")
    out_tensors, out_cases = {}, []
    for case in cases["cases"]:
        if case["name"] not in case_names:
            continue
        p = case["name"] + "."
        ids = torch.from_numpy(expected_src[p + "input_ids"].astype(np.int64))[None]
        imgs = [Image.open(os.path.join(images_dir, f)).convert("RGB") for f in case["images"]]
        kw = {}
        if imgs:
            px = proc(images=imgs, return_tensors="pt")
            kw["pixel_values"] = px["pixel_values"].to(torch.float64)
            if arch == "qwen2_vl":
                kw["image_grid_thw"] = px["image_grid_thw"]
        for key in ("input_ids", "pixel_stats", "position_ids", "image_grid_thw"):
            if p + key in expected_src:
                out_tensors[p + key] = expected_src[p + key]
        with torch.no_grad():
            if imgs and arch == "paligemma":
                feats = model.multi_modal_projector(model.vision_tower(kw["pixel_values"]).last_hidden_state)
                out_tensors[p + "image_features"] = (feats[0] / config["hidden_size"] ** 0.5).float().numpy()
            elif imgs:
                feats = model.visual(kw["pixel_values"], grid_thw=kw["image_grid_thw"])
                out_tensors[p + "image_features"] = feats.float().numpy()
            seq, tops, top_ids, greedy = ids, [], [], []
            for step in range(12):
                fkw = dict(kw)
                if arch == "paligemma":
                    n_prompt = ids.shape[1]
                    tt = torch.cat([torch.zeros(n_prompt, dtype=torch.long), torch.ones(seq.shape[1] - n_prompt, dtype=torch.long)])[None]
                    # 4.45 builds the prefix-LM mask from token_type_ids when labels (and a mask) are given.
                    fkw.update(token_type_ids=tt, labels=torch.full_like(seq, -100), attention_mask=torch.ones_like(seq))
                else:
                    pos, _ = model.get_rope_index(seq, kw.get("image_grid_thw"), None, torch.ones_like(seq))
                    fkw["position_ids"] = pos
                logits = model(input_ids=seq, **fkw).logits[0, -1].to(torch.float64)
                if step == 0:
                    out_tensors[p + "logits_last"] = logits.float().numpy()
                v, i = torch.topk(logits, 10)
                tops.append(v.float().numpy())
                top_ids.append(i.int().numpy())
                greedy.append(int(i[0]))
                seq = torch.cat([seq, i[:1][None]], dim=1)
        out_tensors[p + "top10_logits"] = np.stack(tops)
        out_tensors[p + "top10_ids"] = np.stack(top_ids).astype(np.int32)
        out_tensors[p + "greedy_ids"] = np.array(greedy, dtype=np.int32)
        margins = [float(t[0] - t[1]) for t in tops]
        out_cases.append(dict(case, min_top2_margin=min(margins)))
    write_safetensors(os.path.join(out, "expected.safetensors"), out_tensors)
    meta = {k: v for k, v in cases.items() if k != "cases"}
    meta.update(model=os.path.basename(out), derived_from=os.path.basename(src),
                reference="transformers 4.45.1, float64, eager attention, on the dequantized weights; made by "
                          "tools/derive_mlx2024_fixtures.py", cases=out_cases)
    json.dump(meta, open(os.path.join(out, "cases.json"), "w"), indent=1, ensure_ascii=False)
    shutil.rmtree(work)


def main():
    fixtures, out_root = sys.argv[1], sys.argv[2]
    # PaliGemma as mlx-community/paligemma-3b-mix-448-8bit was made: 8-bit, every Linear and
    # Embedding, SigLIP's MLP padded (here 128 -> 192).
    src = os.path.join(fixtures, "paligemma-bf16")
    out = os.path.join(out_root, "paligemma-mlx8-2024")
    config, deq = derive(src, out, "paligemma", 8, 64, lambda n: n, 192)
    reference("paligemma", config, deq, src, out, {"describe", "gray"})
    # Qwen2-VL as mlx-community/Qwen2-VL-2B-Instruct-4bit was made: 4-bit, the vision tower and
    # merger quantized too, mlx-vlm's names.
    src = os.path.join(fixtures, "qwen2vl-bf16")
    out = os.path.join(out_root, "qwen2vl-mlx4-2024")
    rename = lambda n: ("vision_tower." + n[len("visual."):]) if n.startswith("visual.") else ("language_model." + n)
    config, deq = derive(src, out, "qwen2_vl", 4, 64, rename, 0)
    reference("qwen2_vl", config, deq, src, out, {"describe", "two_images"})


if __name__ == "__main__":
    main()
