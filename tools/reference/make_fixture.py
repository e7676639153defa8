#!/usr/bin/env python3
"""Makes a fixture folder in the format of the shared fixtures (their README) from a model folder
and a case list, with the current Hugging Face transformers on the CPU in float64:

    tools/reference/run make_fixture.py MODEL_DIR CASES.json OUT_DIR [--images DIR] [--steps 12]

CASES.json: {"cases": [{"name", "images": [file names in --images], "messages": [...] (a chat, as
apply_chat_template takes it) or "prefix": TEXT (PaliGemma), "template_kwargs": {...}}]}; an
existing fixture's cases.json is such a list (its other fields are ignored and written anew).

OUT_DIR gets the model's files (links to MODEL_DIR's), cases.json with every field the README lists,
and expected.safetensors: per case the prompt ids after image expansion, the processor's pixels
(and their per-row/per-channel stats), the projector's image features, the logits at the last
prompt position, and 12 greedy steps (their top-10 ids and logits), each step re-running the whole
sequence without a KV cache, as the shared fixtures were made. Qwen2-VL adds image_grid_thw and the
M-RoPE position_ids. The greedy tokens are also checked against generate() with a KV cache.

Architectures: llava, llava_next, qwen2_vl, paligemma (what transformers itself defines).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.numpy import save_file

# Pixel tensors larger than this are summarized by their stats alone (the fixtures' size budget).
PIXEL_BUDGET = 8 << 20


def load(model_dir):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    # Images through PIL (resampling on the 8-bit image, as the shared fixtures were made), not
    # the torchvision backend transformers 5 picks by default; video processors keep theirs.
    images = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    processor = transformers.AutoProcessor.from_pretrained(model_dir, image_processor=images)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="eager").eval()
    return config, processor, model


def prompt_of(processor, config, case):
    """The rendered prompt text, as the processor is then given it."""
    if config.model_type == "paligemma":
        return case["prefix"]
    return processor.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False,
                                         **case.get("template_kwargs", {}))


def model_inputs(processor, config, case, images_dir):
    images = [Image.open(images_dir / name) for name in case["images"]]
    images = [im.convert("RGB") for im in images]
    text = prompt_of(processor, config, case)
    kw = {"text": [text], "return_tensors": "pt"}
    if images:
        kw["images"] = images
    inputs = dict(processor(**kw))
    inputs.pop("labels", None)  # only for training: it would make the forward pass compute a loss
    return text, inputs


def per_token(inputs, ids):
    """The processor's per-token inputs (which token is an image's) for the sequence ids: the
    prompt's, then zeros (text) for the tokens generated after it."""
    out = {}
    for k in ("mm_token_type_ids",):
        if k in inputs:
            v = inputs[k]
            out[k] = torch.cat([v, v.new_zeros((v.shape[0], ids.shape[1] - v.shape[1]))], 1)
    return out


def rope_positions(model, inputs, ids):
    """Qwen2-VL's M-RoPE positions (3, L) for the sequence ids, and its rope delta."""
    pos, delta = model.model.get_rope_index(input_ids=ids, image_grid_thw=inputs.get("image_grid_thw"),
                                            attention_mask=torch.ones_like(ids), **per_token(inputs, ids))
    return pos, int(delta.reshape(-1)[0])


def forward(model, config, inputs, ids):
    """Logits (float64) of the whole sequence ids, the images re-encoded, no KV cache."""
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    kw.update(per_token(inputs, ids))
    kw["input_ids"] = ids
    kw["attention_mask"] = torch.ones_like(ids)
    if config.model_type == "qwen2_vl":
        kw["position_ids"] = rope_positions(model, inputs, ids)[0]
    if config.model_type == "paligemma":
        # The prompt (prefix) attends bidirectionally; generated tokens causally.
        n_prompt = inputs["input_ids"].shape[1]
        kw["token_type_ids"] = (torch.arange(ids.shape[1]) >= n_prompt).long().unsqueeze(0)
    with torch.no_grad():
        out = model(**kw, use_cache=False)
    return out.logits[0].to(torch.float64)


def image_features(model, config, inputs):
    """The projector's output, one row per image token, float32 (None without images)."""
    if "pixel_values" not in inputs:
        return None
    kw = {"pixel_values": inputs["pixel_values"]}
    if config.model_type == "qwen2_vl":
        kw["image_grid_thw"] = inputs["image_grid_thw"]
    if config.model_type == "llava_next":
        kw["image_sizes"] = inputs["image_sizes"]
    with torch.no_grad():
        feats = model.model.get_image_features(**kw)
    if hasattr(feats, "pooler_output") and feats.pooler_output is not None:
        feats = feats.pooler_output
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1]).to(torch.float32).numpy()


def pixel_stats(pv, model_type):
    """Per crop and channel (per patch row for Qwen2-VL): mean and mean |x|."""
    pv = pv.to(torch.float64)
    if model_type == "qwen2_vl":
        return torch.stack([pv.mean(-1), pv.abs().mean(-1)], -1).to(torch.float32).numpy()
    flat = pv.reshape(*pv.shape[:-2], -1)
    return torch.stack([flat.mean(-1), flat.abs().mean(-1)], -1).to(torch.float32).numpy()


def run_case(model, processor, config, case, images_dir, steps):
    text, inputs = model_inputs(processor, config, case, images_dir)
    ids = inputs["input_ids"]
    tensors, meta = {}, {"prompt_text": text, "n_prompt_tokens": int(ids.shape[1])}
    if config.model_type == "paligemma":
        # The processor writes the image tokens, BOS and newline around the prefix itself.
        meta["prompt_text"] = processor.tokenizer.decode(ids[0])
        meta["image_tokens"] = [int((ids[0] == config.image_token_id).sum())] if case["images"] else []
    tensors["input_ids"] = ids[0].to(torch.int32).numpy()
    if "pixel_values" in inputs:
        pv = inputs["pixel_values"]
        tensors["pixel_stats"] = pixel_stats(pv, config.model_type)
        if pv.numel() * 4 <= PIXEL_BUDGET:
            tensors["pixel_values"] = pv.to(torch.float32).numpy()
        feats = image_features(model, config, inputs)
        tensors["image_features"] = feats
    if config.model_type == "qwen2_vl":
        thw = inputs.get("image_grid_thw")
        thw = thw if thw is not None else torch.zeros((0, 3), dtype=torch.int64)
        if len(thw):
            tensors["image_grid_thw"] = thw.to(torch.int32).numpy().reshape(-1, 3)
        pos, delta = rope_positions(model, inputs, ids)
        tensors["position_ids"] = pos[:, 0].to(torch.int32).numpy()
        merge = config.vision_config.spatial_merge_size ** 2
        meta["image_tokens"] = [int(t * h * w // merge) for t, h, w in thw.tolist()]
        meta["image_grid_thw"] = thw.tolist()
        meta["rope_delta"] = delta
    top_ids, top_logits, greedy, margins = [], [], [], []
    seq = ids
    for step in range(steps):
        logits = forward(model, config, inputs, seq)[-1]
        if step == 0:
            tensors["logits_last"] = logits.to(torch.float32).numpy()
        values, order = torch.sort(logits, descending=True)
        top_ids.append(order[:10].to(torch.int32).numpy())
        top_logits.append(values[:10].to(torch.float32).numpy())
        margins.append(float(values[0] - values[1]))
        greedy.append(int(order[0]))
        seq = torch.cat([seq, order[:1].reshape(1, 1)], 1)
    tensors["top10_ids"] = np.stack(top_ids)
    tensors["top10_logits"] = np.stack(top_logits)
    tensors["greedy_ids"] = np.array(greedy, dtype=np.int32)
    meta["greedy_text"] = processor.tokenizer.decode(greedy)
    meta["min_top2_margin"] = min(margins)
    # The same tokens from generate() with a KV cache.
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    cached = out.sequences[0, ids.shape[1]:].tolist()
    diffs = []
    for step, l in enumerate(out.logits[:len(greedy)]):
        l = l[0].to(torch.float64)
        diffs.append(float((l[top_ids[step]] - torch.from_numpy(top_logits[step]).to(torch.float64)).abs().max()))
    meta["kv_cache_generate"] = {"same_tokens": cached == greedy, "max_abs_top10_logit_diff": max(diffs)}
    return tensors, meta


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("cases", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--images", type=Path, default=None, help="the case images' folder (default: CASES.json's "
                                                              "folder's ../images, as in the shared fixtures)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--only", default="", help="comma-separated case names (default: all)")
    a = p.parse_args()
    torch.manual_seed(0)
    images_dir = a.images or a.cases.resolve().parent.parent / "images"
    config, processor, model = load(a.model_dir)
    if config.model_type not in ("llava", "llava_next", "qwen2_vl", "paligemma"):
        sys.exit(f"make_fixture: model_type '{config.model_type}' is not one this tool knows")
    listed = json.loads(a.cases.read_text())
    cases = [c for c in listed["cases"] if not a.only or c["name"] in a.only.split(",")]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(a.model_dir.iterdir()):
        dest = a.out_dir / f.name
        if f.name not in ("cases.json", "expected.safetensors") and not dest.exists():
            dest.symlink_to(f.resolve())
    tensors, out_cases = {}, []
    for case in cases:
        print(f"make_fixture: {case['name']}", file=sys.stderr)
        t, meta = run_case(model, processor, config, case, images_dir, a.steps)
        tensors.update({f"{case['name']}.{k}": np.ascontiguousarray(v) for k, v in t.items()})
        keep = {k: case[k] for k in ("name", "images", "messages", "prefix", "template_kwargs") if k in case}
        out_cases.append({**keep, **meta})
    header = {"model": a.model_dir.name, "arch": config.model_type,
              "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, float64, eager "
                           "attention, no KV cache (each step re-runs the whole sequence)",
              "steps": a.steps}
    (a.out_dir / "cases.json").write_text(json.dumps({**header, "cases": out_cases}, indent=1, ensure_ascii=False) + "\n")
    save_file(tensors, str(a.out_dir / "expected.safetensors"))


if __name__ == "__main__":
    main()
