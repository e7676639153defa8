#!/usr/bin/env python3
"""Compares two fixture folders made from the same weights (a committed fixture and one made anew
by make_fixture.py), tensor by tensor and case field by case field:

    tools/reference/run compare_fixtures.py OLD_DIR NEW_DIR [--rtol 1e-5]

Integer tensors (ids, positions, grids) and the cases' ids, texts and image token counts must be
equal; float tensors agree when their largest difference is within rtol of the tensor's largest
magnitude. Prints one line per tensor with the largest absolute and relative difference, and
exits 1 when anything disagrees or is missing.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

CASE_FIELDS = ("prompt_text", "n_prompt_tokens", "image_tokens", "image_grid_thw", "rope_delta", "greedy_text")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--rtol", type=float, default=1e-5)
    a = p.parse_args()
    old, new = load_file(str(a.old / "expected.safetensors")), load_file(str(a.new / "expected.safetensors"))
    bad = 0
    for name in sorted(old):
        if name not in new:
            print(f"MISSING {name}")
            bad += 1
            continue
        x, y = old[name], new[name]
        if x.shape != y.shape:
            print(f"SHAPE   {name}: {x.shape} vs {y.shape}")
            bad += 1
            continue
        if np.issubdtype(x.dtype, np.integer):
            same = np.array_equal(x, y)
            print(f"{'ok' if same else 'DIFFER':7} {name}: {'equal' if same else f'{int((x != y).sum())} differ'}")
            bad += not same
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        diff = float(np.abs(x64 - y64).max()) if x.size else 0.0
        scale = float(np.abs(x64).max()) if x.size else 0.0
        rel = diff / scale if scale else diff
        ok = rel <= a.rtol
        print(f"{'ok' if ok else 'DIFFER':7} {name}: max |diff| {diff:.3g}, relative to max |x| {rel:.3g}")
        bad += not ok
    for name in sorted(set(new) - set(old)):
        print(f"new     {name}")
    old_cases = {c["name"]: c for c in json.loads((a.old / "cases.json").read_text())["cases"]}
    for c in json.loads((a.new / "cases.json").read_text())["cases"]:
        o = old_cases.get(c["name"], {})
        for f in CASE_FIELDS:
            if f in o and o[f] != c.get(f):
                print(f"DIFFER  {c['name']}.{f}: {o[f]!r} vs {c.get(f)!r}")
                bad += 1
        if "min_top2_margin" in o:
            print(f"        {c['name']}.min_top2_margin: {o['min_top2_margin']:.6g} vs {c['min_top2_margin']:.6g}; "
                  f"kv_cache_generate {c['kv_cache_generate']}")
    print(f"compare_fixtures: {'all agree' if not bad else f'{bad} disagree'} (rtol {a.rtol})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
