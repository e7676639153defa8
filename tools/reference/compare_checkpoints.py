#!/usr/bin/env python3
"""Compares two checkpoint folders tensor by tensor (names, dtypes, shapes, bytes) and their
config.json key by key: an mlx-community twin as mlx-vlm's own converter writes it against the
one a fixture ships.

    tools/reference/run compare_checkpoints.py FIXTURE_TWIN_DIR CONVERTED_DIR

Exits 1 when anything differs, after listing every difference.
"""
import json
import sys
from pathlib import Path

import numpy as np


def tensors(folder):
    """Every tensor of a folder's *.safetensors (expected.safetensors aside): name -> (dtype, shape,
    bytes). Bytes straight from the file, whatever the dtype (bf16 included); each file read once."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == "expected.safetensors":
            continue
        data = f.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        for k, t in header.items():
            if k != "__metadata__":
                a, b = t["data_offsets"]
                out[k] = (t["dtype"], tuple(t["shape"]), np.frombuffer(data[8 + n + a:8 + n + b], dtype=np.uint8))
    return out


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    ta, tb = tensors(a), tensors(b)
    bad = 0
    for k in sorted(set(ta) | set(tb)):
        if k not in tb or k not in ta:
            print(f"only in {'first' if k in ta else 'second'}: {k}")
            bad += 1
        elif ta[k][:2] != tb[k][:2]:
            print(f"differs: {k}: {ta[k][:2]} vs {tb[k][:2]}")
            bad += 1
        else:
            x, y = ta[k][2], tb[k][2]
            if not np.array_equal(x, y):
                print(f"differs: {k}: {int((x != y).sum())} of {x.size} bytes")
                bad += 1
    ca, cb = flat(json.loads((a / "config.json").read_text())), flat(json.loads((b / "config.json").read_text()))
    for k in sorted(set(ca) | set(cb)):
        if ca.get(k, "<absent>") != cb.get(k, "<absent>"):
            print(f"config.json {k}: {ca.get(k, '<absent>')!r} vs {cb.get(k, '<absent>')!r}")
            bad += 1
    print(f"compare_checkpoints: {len(ta)} and {len(tb)} tensors; "
          f"{'identical' if not bad else f'{bad} differences'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
