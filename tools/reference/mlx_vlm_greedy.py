#!/usr/bin/env python3
"""The seed's own greedy tokens: runs mlx-vlm (MLX's CPU backend) on mlx-community-layout fixture
folders, every case of their cases.json, and writes what it generated, for tests/test_mlx_vlm.cpp:

    tools/reference/run mlx_vlm_greedy.py FIXTURE_DIR... > tests/data/mlx_vlm/greedy.json

Per case: the prompt length mlx-vlm saw, its greedy tokens (mlx_vlm.stream_generate, temperature
0, 12 tokens unless it stops), and at every step the gap between its best and second log-probability,
so a test can tell mlx-vlm's own near-ties (it computes in the checkpoint's bf16/f16 and f32)
from a real disagreement; then the same with the model's float tensors in float32 (tokens_f32,
top2_margins_f32): the same weights, computed without bf16's rounding. The prompt is the fixture's rendered prompt_text (PaliGemma: its
prefix, which the processor wraps), the images its files.
"""
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx_vlm
from mlx_vlm import load
from mlx.utils import tree_map
from mlx_vlm.generate import stream_generate

STEPS = 12


def model_only(fixture, scratch):
    """The fixture's model files alone (links), since mlx-vlm loads every *.safetensors of a folder
    without an index, expected.safetensors too."""
    folder = Path(scratch) / fixture.name
    folder.mkdir()
    for f in fixture.iterdir():
        if f.name not in ("cases.json", "expected.safetensors"):
            (folder / f.name).symlink_to(f.resolve())
    return folder


# Tokenizer arguments mlx-vlm's own LLaVA processor (0.7.10) forwards to the image processor too,
# which transformers 5 refuses (ImagesKwargs is strict); they mean nothing to an image processor.
TOKENIZER_ONLY_ARGS = ("padding", "padding_side", "add_special_tokens", "truncation", "max_length")


def image_processor_without_tokenizer_args(processor):
    """Drops TOKENIZER_ONLY_ARGS on the way into the processor's image processor: only the
    arguments change, the pixels it computes are its own."""
    images = getattr(processor, "image_processor", None)
    if images is None:
        return
    preprocess = images.preprocess

    def filtered(*args, **kwargs):
        return preprocess(*args, **{k: v for k, v in kwargs.items() if k not in TOKENIZER_ONLY_ARGS})
    images.preprocess = filtered


def llava_processor_settings(processor, config):
    """A LLaVA folder without processor_config.json (llava15-mlx4, as older conversions) leaves
    mlx-vlm's processor without patch_size, so it cannot count image tokens; give it the values
    llava-hf's processor_config.json holds, from the model's own config (CLIP's CLS token is the
    one additional token, which the "default" strategy drops again)."""
    if config["model_type"] == "llava" and getattr(processor, "patch_size", 0) is None:
        processor.patch_size = config["vision_config"]["patch_size"]
        processor.num_additional_image_tokens = 1
        processor.vision_feature_select_strategy = config.get("vision_feature_select_strategy", "default")


def greedy(model, processor, prompt, images):
    """mlx-vlm's greedy tokens, its top-2 log-probability gap at each step, the prompt length it
    saw and its finish reason."""
    tokens, margins, prompt_tokens, finish = [], [], 0, None
    for r in stream_generate(model, processor, prompt, image=images or None, max_tokens=STEPS, temperature=0.0):
        finish = r.finish_reason or finish
        if r.token is None or r.generation_tokens <= len(tokens):
            continue  # no token, or the closing result that repeats the last one
        tokens.append(int(r.token))
        lp = mx.array(r.logprobs).astype(mx.float32).reshape(-1)
        top2 = mx.sort(lp)[-2:].tolist()
        margins.append(top2[1] - top2[0])
        prompt_tokens = r.prompt_tokens
    return {"prompt_tokens": prompt_tokens, "tokens": tokens, "top2_margins": margins, "finish_reason": finish}


def in_float32(model):
    """The model's float tensors (scales and biases of quantized layers included) in float32, the
    packed codes unchanged: the same weights (bf16 -> f32 is exact), computed in float32."""
    model.update(tree_map(lambda x: x.astype(mx.float32) if isinstance(x, mx.array) and
                          mx.issubdtype(x.dtype, mx.floating) else x, model.parameters()))


def run(fixture):
    with tempfile.TemporaryDirectory() as scratch:
        model, processor = load(str(model_only(fixture, scratch)))
    config = json.loads((fixture / "config.json").read_text())
    image_processor_without_tokenizer_args(processor)
    llava_processor_settings(processor, config)
    images_dir = fixture.parent / "images"
    cases = []
    listed = json.loads((fixture / "cases.json").read_text())["cases"]
    for precision in ("checkpoint", "float32"):
        if precision == "float32":
            in_float32(model)
        for i, case in enumerate(listed):
            prompt = case["prefix"] if config["model_type"] == "paligemma" else case["prompt_text"]
            images = [str(images_dir / name) for name in case["images"]]
            if precision == "checkpoint":
                cases.append({"name": case["name"]})
            elif "error" in cases[i]:
                continue
            try:
                result = greedy(model, processor, prompt, images)
            except Exception as e:  # the seed fails on this case: recorded, so the README can say what failed
                print(f"mlx_vlm_greedy: {fixture.name} {case['name']}: mlx-vlm failed: {e}", file=sys.stderr)
                cases[i]["error"] = f"{type(e).__name__}: {e}"
                continue
            print(f"mlx_vlm_greedy: {fixture.name} {case['name']} ({precision}): {len(result['tokens'])} tokens",
                  file=sys.stderr)
            if precision == "float32":
                result = {"tokens_f32": result["tokens"], "top2_margins_f32": result["top2_margins"]}
            cases[i].update(result)
    return {"model": fixture.name, "cases": cases}


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = {"generator": f"mlx-vlm {mlx_vlm.__version__}, mlx {mx.__version__} (CPU), stream_generate, temperature 0",
           "models": [run(Path(d).resolve()) for d in sys.argv[1:]]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
