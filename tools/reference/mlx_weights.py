"""An mlx-community checkpoint's weights in a transformers model: every tensor of the MLX folder,
dequantized where it is quantized (W = scales * q + biases per group, in float64, exactly), renamed
from mlx-vlm's names to transformers 5's and its conv weights put back from MLX's channels-last
layout, so the reference runs on exactly the weights an engine loading the MLX folder sees.

    load_mlx_weights(model, MLX_DIR)   # model: a transformers model of the same architecture
"""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open


def read_tensors(folder):
    """{name: tensor} of every *.safetensors file of folder the index names (or all of them)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else sorted(p.name for p in folder.glob("*.safetensors"))
    out = {}
    for name in files:
        with safe_open(str(folder / name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def dequantize(words, scales, biases, bits, group):
    """words [out, in*bits/32] uint32 (element j of a word in its bits*j lowest bits), scales and
    biases [out, in/group] -> [out, in] float64."""
    w = words.numpy().view(np.uint32)
    per = 32 // bits
    codes = (w[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & np.uint32((1 << bits) - 1)
    codes = torch.from_numpy(codes.reshape(w.shape[0], -1).astype(np.float64))
    s = scales.to(torch.float64).repeat_interleave(group, dim=1)
    b = biases.to(torch.float64).repeat_interleave(group, dim=1)
    return codes * s + b


def mlx_names(hf_name):
    """The names mlx-vlm gives a transformers 5 parameter, most specific first."""
    for hf, mlx in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                    ("model.visual.", "vision_tower."), ("model.vision_tower.", "vision_tower.vision_model."),
                    ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                    ("model.", "")):
        if hf_name.startswith(hf):
            yield mlx + hf_name[len(hf):]


def from_channels_last(value, shape):
    """An MLX conv weight (O, [T,] H, W, C) back to torch's (O, C, [T,] H, W) when that is what
    the model holds."""
    if value.dim() == len(shape) >= 4 and tuple(value.shape) != tuple(shape):
        order = (0, value.dim() - 1, *range(1, value.dim() - 1))
        if tuple(value.permute(order).shape) == tuple(shape):
            return value.permute(order)
    return value


def without_zero_padding(value, shape):
    """A tensor the converter zero-padded to a multiple of the group size (the 2024 conversions'
    SigLIP MLP, with intermediate_size rewritten): cut back to shape when what is cut is zero."""
    if value.dim() != len(shape) or tuple(value.shape) == tuple(shape) or \
            any(v < s for v, s in zip(value.shape, shape)):
        return value
    kept = value[tuple(slice(0, s) for s in shape)]
    if value.abs().sum() != kept.abs().sum():
        return value  # not padding: the caller reports the shapes
    return kept


def load_mlx_weights(model, mlx_dir):
    """Overwrites every parameter of model with the MLX folder's (tied ones once); raises when a
    parameter has no tensor there, a shape disagrees, or a tensor of the folder goes unused."""
    config = json.loads((Path(mlx_dir) / "config.json").read_text())
    q = config.get("quantization") or config.get("quantization_config") or {}
    tensors = read_tensors(mlx_dir)
    used = set()
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False) or \
        getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    with torch.no_grad():
        for name, param in state.items():
            found = None
            for mlx in mlx_names(name):
                base = mlx[:-len(".weight")] if mlx.endswith(".weight") else None
                if base and base + ".scales" in tensors:
                    found = dequantize(tensors[mlx], tensors[base + ".scales"], tensors[base + ".biases"],
                                       q["bits"], q["group_size"])
                    used.update({mlx, base + ".scales", base + ".biases"})
                elif mlx in tensors:
                    found = from_channels_last(tensors[mlx].to(torch.float64), param.shape)
                    used.add(mlx)
                if found is not None:
                    break
            if found is None:
                if name == "lm_head.weight" and tied:
                    continue  # the embedding, used as the output head
                raise KeyError(f"{mlx_dir}: no tensor for {name} (tried {list(mlx_names(name))})")
            found = without_zero_padding(found, param.shape)
            if tuple(found.shape) != tuple(param.shape):
                raise ValueError(f"{mlx_dir}: {name} is {tuple(found.shape)}, the model's {tuple(param.shape)}")
            param.copy_(found)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{mlx_dir}: tensors the model has no place for: {unused[:8]}")
    if tied and "lm_head.weight" in state:
        model.tie_weights()
