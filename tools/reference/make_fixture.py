#!/usr/bin/env python3
"""Makes a fixture folder in the format of the shared fixtures (their README) from a model folder
and a case list, with the current Hugging Face transformers on the CPU in float64:

    tools/reference/run make_fixture.py MODEL_DIR CASES.json OUT_DIR [--images DIR] [--steps 12]
        [--weights-from MLX_DIR]

CASES.json: {"cases": [{"name", "images": [file names in --images], "messages": [...] (a chat, as
apply_chat_template takes it) or "prefix": TEXT (PaliGemma), "template_kwargs": {...}}]}; an
existing fixture's cases.json is such a list (its other fields are ignored and written anew).

OUT_DIR gets the model's files (links to MODEL_DIR's), cases.json with every field the README lists,
and expected.safetensors: per case the prompt ids after image expansion, the processor's pixels
(and their per-row/per-channel stats), the projector's image features, the logits at the last
prompt position, and 12 greedy steps (their top-10 ids and logits), each step re-running the whole
sequence without a KV cache, as the shared fixtures were made. Qwen2-VL adds image_grid_thw and the
M-RoPE position_ids. The greedy tokens are also checked against generate() with a KV cache.

--weights-from MLX_DIR: the fixture of an mlx-community twin of MODEL_DIR (what mlx_vlm.convert
wrote from it): OUT_DIR links MLX_DIR's files and every weight is the twin's, dequantized exactly
(mlx_weights.py), which transformers cannot load itself; MODEL_DIR gives the architecture and the
processor (the converter's processor_config.json is not one transformers reads back, see README).

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

from mlx_weights import load_mlx_weights

# Pixel tensors larger than this are summarized by their stats alone (the fixtures' size budget).
PIXEL_BUDGET = 8 << 20


def load(model_dir, weights_from=None):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    # Images through PIL (resampling on the 8-bit image, as the shared fixtures were made), not
    # the torchvision backend transformers 5 picks by default; video processors keep theirs.
    images = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    processor = transformers.AutoProcessor.from_pretrained(model_dir, image_processor=images)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="eager").eval()
    if weights_from:
        load_mlx_weights(model, weights_from)
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


def placeholder_ids(config):
    """The token ids the processor expands for images and videos."""
    return {getattr(config, k) for k in ("image_token_id", "image_token_index", "video_token_id")
            if getattr(config, k, None) is not None}


def forward(model, config, inputs, ids):
    """Logits (float64) of the whole sequence ids, the images re-encoded, no KV cache."""
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    kw.update(per_token(inputs, ids))
    kw["attention_mask"] = torch.ones_like(ids)
    n_prompt = inputs["input_ids"].shape[1]
    if config.model_type == "qwen2_vl":
        kw["position_ids"] = rope_positions(model, inputs, ids)[0]
    if config.model_type == "paligemma":
        # The prompt (prefix) attends bidirectionally; generated tokens causally.
        kw["token_type_ids"] = (torch.arange(ids.shape[1]) >= n_prompt).long().unsqueeze(0)
    generated = ids[0, n_prompt:].tolist()
    if "pixel_values" in inputs and placeholder_ids(config) & set(generated):
        # A generated token that is an image placeholder is text (as generate() with a KV cache,
        # and an engine, treat it); the model would count it as an image's, so the sequence goes
        # in as embeddings: the prompt's image rows the projected features, the rest looked up.
        embeds = model.get_input_embeddings()(ids).clone()
        is_image = torch.isin(ids[0], torch.tensor(sorted(placeholder_ids(config))))
        is_image[n_prompt:] = False
        embeds[0, is_image] = projected_features(model, config, inputs).to(embeds.dtype)
        for k in ("pixel_values", "image_grid_thw", "image_sizes", "pixel_values_videos", "video_grid_thw"):
            kw.pop(k, None)
        kw["inputs_embeds"] = embeds
    else:
        kw["input_ids"] = ids
    with torch.no_grad():
        out = model(**kw, use_cache=False)
    return out.logits[0].to(torch.float64)


def projected_features(model, config, inputs):
    """The projector's output as the model places it at its image tokens: one row per image
    token, float64."""
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
    return feats.reshape(-1, feats.shape[-1])


def image_features(model, config, inputs):
    """The fixtures' image_features: the projector's output, one row per image token, float32
    (None without images). PaliGemma's are divided by sqrt(text hidden_size), which Gemma's
    embedding scale multiplies back (transformers 4 divided there; 5 scales the text embeddings
    alone), as the shared fixtures' README defines them."""
    if "pixel_values" not in inputs:
        return None
    feats = projected_features(model, config, inputs)
    if config.model_type == "paligemma":
        feats = feats / config.text_config.hidden_size ** 0.5
    return feats.to(torch.float32).numpy()


def pixel_stats(pv, model_type):
    """Per crop and channel (per patch row for Qwen2-VL): mean and mean |x|."""
    pv = pv.to(torch.float64)
    if model_type == "qwen2_vl":
        return torch.stack([pv.mean(-1), pv.abs().mean(-1)], -1).to(torch.float32).numpy()
    flat = pv.reshape(*pv.shape[:-2], -1)
    return torch.stack([flat.mean(-1), flat.abs().mean(-1)], -1).to(torch.float32).numpy()


def run_case(model, processor, config, case, images_dir, steps, pixel_budget):
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
        if pv.numel() * 4 <= pixel_budget:
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("cases", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--images", type=Path, default=None, help="the case images' folder (default: CASES.json's "
                                                              "folder's ../images, as in the shared fixtures)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--only", default="", help="comma-separated case names (default: all)")
    p.add_argument("--pixel-budget", type=int, default=PIXEL_BUDGET,
                   help="pixel tensors larger than this many bytes are kept as their stats alone")
    p.add_argument("--weights-from", type=Path, default=None,
                   help="an mlx-community twin of MODEL_DIR: its files and its weights, dequantized")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    images_dir = a.images or a.cases.resolve().parent.parent / "images"
    config, processor, model = load(a.model_dir, a.weights_from)
    if config.model_type not in ("llava", "llava_next", "qwen2_vl", "paligemma"):
        sys.exit(f"make_fixture: model_type '{config.model_type}' is not one this tool knows")
    listed = json.loads(a.cases.read_text())
    cases = [c for c in listed["cases"] if not a.only or c["name"] in a.only.split(",")]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted((a.weights_from or a.model_dir).iterdir()):
        dest = a.out_dir / f.name
        if f.name not in ("cases.json", "expected.safetensors") and not dest.exists():
            dest.symlink_to(f.resolve())
    tensors, out_cases = {}, []
    for case in cases:
        print(f"make_fixture: {case['name']}", file=sys.stderr)
        t, meta = run_case(model, processor, config, case, images_dir, a.steps, a.pixel_budget)
        tensors.update({f"{case['name']}.{k}": np.ascontiguousarray(v) for k, v in t.items()})
        keep = {k: case[k] for k in ("name", "images", "messages", "prefix", "template_kwargs") if k in case}
        out_cases.append({**keep, **meta})
    header = {"model": (a.weights_from or a.model_dir).name, "arch": config.model_type,
              "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, float64, eager "
                           "attention, no KV cache (each step re-runs the whole sequence)"
                           + (", on the dequantized weights" if a.weights_from else ""),
              "steps": a.steps}
    if a.weights_from:
        twin = json.loads((a.weights_from / "config.json").read_text())
        header["source_fixture"] = a.model_dir.name
        header["quantization"] = twin.get("quantization")
    (a.out_dir / "cases.json").write_text(json.dumps({**header, "cases": out_cases}, indent=1, ensure_ascii=False) + "\n")
    save_file(tensors, str(a.out_dir / "expected.safetensors"))


if __name__ == "__main__":
    main()
