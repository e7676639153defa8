#!/usr/bin/env python3
"""Reference logits for a rotating KV cache (mlx-lm's RotatingKVCache, `--max-kv-size`), from
Hugging Face transformers in float64.

A rotating cache of N rows keeps the first 4 tokens and the N - 4 most recent ones; every token's
K and V are computed when it is fed, from what the cache holds then. That is one forward pass
over the whole sequence with the attention mask "query j sees key k when k <= j and (j < N or
k < 4 or k > j - (N - 4))", which transformers takes as a 4-D additive mask.

  tools/reference/run rotating_cache_reference.py MODEL_DIR IDS.json N > tests/data/rotating_cache/NAME.json

IDS.json: the prompt ids and the generated ids (e.g. `vkvlm generate --json --max-kv-size N`'s
prompt_tokens + tokens). Writes, per position, the five largest logits as [id, value] pairs.
Qwen2-VL text-only prompts: M-RoPE positions are 0, 1, 2, ... in all three sections.
"""
import json
import sys

import torch
import transformers as T

KEEP = 4


def main():
    model_dir, ids_file, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ids = json.load(open(ids_file))
    model = T.Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float64).eval()
    length = len(ids)
    mask = torch.full((1, 1, length, length), torch.finfo(torch.float64).min, dtype=torch.float64)
    for j in range(length):
        for k in range(j + 1):
            if j < n or k < KEEP or k > j - (n - KEEP):
                mask[0, 0, j, k] = 0.0
    positions = torch.arange(length)[None, None, :].expand(3, 1, length)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=positions).logits[0].double()
    top = [[[int(i), float(v)] for v, i in zip(*torch.topk(logits[j], 5))] for j in range(length)]
    json.dump({"max_kv_size": n, "ids": ids, "top5": top}, sys.stdout)


if __name__ == "__main__":
    main()
