#!/usr/bin/env python3
"""The seed's own greedy tokens: runs mlx-vlm (MLX's CPU backend) on mlx-community-layout fixture
folders, every case of their cases.json, and writes what it generated, for tests/test_mlx_vlm.cpp:

    tools/reference/run mlx_vlm_greedy.py FIXTURE_DIR... > tests/data/mlx_vlm/greedy.json

Per case: the prompt length mlx-vlm saw, its greedy tokens (mlx_vlm.stream_generate, temperature
0, 12 tokens unless it stops), and at every step the gap between its best and second log-probability,
so a test can tell mlx-vlm's own near-ties (it computes in the checkpoint's bf16/f16 and f32)
from a real disagreement. The prompt is the fixture's rendered prompt_text (PaliGemma: its
prefix, which the processor wraps), the images its files.
"""
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx_vlm
from mlx_vlm import load
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


def run(fixture):
    with tempfile.TemporaryDirectory() as scratch:
        model, processor = load(str(model_only(fixture, scratch)))
    config = json.loads((fixture / "config.json").read_text())
    images_dir = fixture.parent / "images"
    cases = []
    for case in json.loads((fixture / "cases.json").read_text())["cases"]:
        prompt = case["prefix"] if config["model_type"] == "paligemma" else case["prompt_text"]
        images = [str(images_dir / name) for name in case["images"]]
        tokens, margins, prompt_tokens, finish = [], [], 0, None
        try:
            results = list(stream_generate(model, processor, prompt, image=images or None, max_tokens=STEPS,
                                           temperature=0.0))
        except Exception as e:  # the seed fails on this case: recorded, so the README can say what failed
            print(f"mlx_vlm_greedy: {fixture.name} {case['name']}: mlx-vlm failed: {e}", file=sys.stderr)
            cases.append({"name": case["name"], "error": f"{type(e).__name__}: {e}"})
            continue
        for r in results:
            finish = r.finish_reason or finish
            if r.token is None or r.generation_tokens <= len(tokens):
                continue  # no token, or the closing result that repeats the last one
            tokens.append(int(r.token))
            lp = mx.array(r.logprobs).astype(mx.float32).reshape(-1)
            top2 = mx.sort(lp)[-2:].tolist()
            margins.append(top2[1] - top2[0])
            prompt_tokens = r.prompt_tokens
        print(f"mlx_vlm_greedy: {fixture.name} {case['name']}: {len(tokens)} tokens", file=sys.stderr)
        cases.append({"name": case["name"], "prompt_tokens": prompt_tokens, "tokens": tokens,
                      "top2_margins": margins, "finish_reason": finish})
    return {"model": fixture.name, "cases": cases}


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = {"generator": f"mlx-vlm {mlx_vlm.__version__}, mlx {mx.__version__} (CPU), stream_generate, temperature 0",
           "models": [run(Path(d).resolve()) for d in sys.argv[1:]]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
