#!/usr/bin/env python3
"""Writes the fuzzers' seed corpus, tests/fuzz/corpus/<target>/, from the test fixtures: small,
valid inputs of every kind the fuzzers take, for libFuzzer to mutate. Checkpoint headers keep
the fixtures' tensor names, dtypes and metadata with shrunk shapes; tokenizers keep their
normalizers, pre-tokenizers, post-processors and decoders with the vocabulary cut to its first
entries; images are the fixture images made small, in every format the decoder reads.

Run it with Pillow installed (e.g. the HF reference environment); the files it writes are
committed. Parts of one input are separated as tests/fuzz/fuzz_input.h separates them."""
import base64
import io
import json
import os
import struct
import sys

from PIL import Image

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
DATA = os.path.join(ROOT, "tests", "data")
FIX = os.path.join(DATA, "fixtures")
OUT = os.path.join(ROOT, "tests", "fuzz", "corpus")
SEP = b"\n--vkvlm-fuzz-part--\n"
MODEL_FOLDERS = [os.path.join(FIX, d) for d in sorted(os.listdir(FIX)) if os.path.exists(os.path.join(FIX, d, "config.json"))]
MODEL_FOLDERS += [os.path.join(DATA, "derived", d) for d in sorted(os.listdir(os.path.join(DATA, "derived")))
                  if os.path.exists(os.path.join(DATA, "derived", d, "config.json"))]
MODEL_FOLDERS.append(os.path.join(ROOT, "models", "shapes-llava"))


def write(target, name, data):
    folder = os.path.join(OUT, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


# ---- safetensors -----------------------------------------------------------------------------

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}


def header_of(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def small_safetensors(header, limit=6):
    """The first `limit` tensors of a header, each shrunk to at most 4 per dimension, with data."""
    meta = header.get("__metadata__")
    tensors = [(k, v) for k, v in header.items() if k != "__metadata__"]
    picked, seen = [], set()
    for k, v in tensors:  # one of each dtype first, then the rest in order
        if v["dtype"] not in seen:
            picked.append((k, v))
            seen.add(v["dtype"])
    for k, v in tensors:
        if len(picked) >= limit:
            break
        if (k, v) not in picked:
            picked.append((k, v))
    out, blob = {}, b""
    if meta is not None:
        out["__metadata__"] = meta
    for k, v in picked[:limit]:
        shape = [min(d, 4) for d in v["shape"]]
        n = DTYPE_BYTES[v["dtype"]]
        for d in shape:
            n *= d
        out[k] = {"dtype": v["dtype"], "shape": shape, "data_offsets": [len(blob), len(blob) + n]}
        blob += bytes((i * 37 + 11) % 256 for i in range(n))
    head = json.dumps(out, separators=(",", ":")).encode()
    head += b" " * ((8 - len(head) % 8) % 8)
    return struct.pack("<Q", len(head)) + head + blob, [k for k, _ in picked[:limit]]


def safetensors_seeds():
    for folder in MODEL_FOLDERS:
        name = os.path.basename(folder)
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = json.load(open(index))["weight_map"]
            shards = sorted(set(weight_map.values()))
            first, names1 = small_safetensors(header_of(os.path.join(folder, shards[0])), 4)
            second, names2 = small_safetensors(header_of(os.path.join(folder, shards[-1])), 4)
            # The fuzzer writes the parts as model-00001-of-00002 and model-00002-of-00002.
            wm = {n: "model-00001-of-00002.safetensors" for n in names1}
            wm.update({n: "model-00002-of-00002.safetensors" for n in names2})
            idx = json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}, indent=1).encode()
            write("safetensors", name + "-sharded", first + SEP + idx + SEP + second)
        else:
            data, _ = small_safetensors(header_of(os.path.join(folder, "model.safetensors")))
            write("safetensors", name, data)


# ---- configs -----------------------------------------------------------------------------------

def prompt_cache_seeds():
    """Prompt caches as vkvlm cache-prompt writes them (2 layers of width 8 in f16, or of width 64
    as 3 f16 rows then 4-bit rows in groups of 32), and near misses."""
    def cache(rows, meta_overrides=None, drop=None, quantized=False):
        meta = {"format": "vkvlm-prompt-cache", "version": "1", "model": "m", "model_fingerprint": "0123456789abcdef",
                "kv_dtype": "q4g32s3" if quantized else "f16", "layers": "2", "kv_width": "64" if quantized else "8",
                "rows": str(rows), "prefix_end": "0", "rope_long_factors": "0", "images": "", "prompt": "USER: hi"}
        meta.update(meta_overrides or {})
        tensors = [("ids", "I32", [rows], 4), ("keys", "U64", [rows], 8), ("positions", "I32", [rows, 1], 4)]
        for layer in range(2):
            for side in "kv":
                if not quantized:
                    tensors.append((f"{side}.{layer}", "F16", [rows, 8], 2))
                    continue
                tensors.append((f"{side}.{layer}", "F16", [min(rows, 3), 64], 2))
                if rows > 3:
                    tensors += [(f"{side}.{layer}.q", "U32", [rows - 3, 8], 4), (f"{side}.{layer}.qp", "U32", [rows - 3, 2], 4)]
        header, data = {"__metadata__": meta}, b""
        for name, dtype, shape, size in tensors:
            if name == drop:
                continue
            n = size
            for d in shape:
                n *= d
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
            data += bytes((i * 7 + len(name)) % 251 for i in range(n))
        h = json.dumps(header).encode()
        h += b" " * ((8 - len(h) % 8) % 8)
        return struct.pack("<Q", len(h)) + h + data
    write("prompt_cache", "valid", cache(5))
    write("prompt_cache", "prefix", cache(3, {"prefix_end": "3"}))
    # Version 2: the bidirectional spans listed (two image blocks), and spans that overlap.
    v2 = {"version": "2", "bidirectional": "0-2,3-5"}
    write("prompt_cache", "spans_v2", cache(5, v2))
    write("prompt_cache", "spans_v2_overlapping", cache(5, dict(v2, bidirectional="0-3,2-5")))
    write("prompt_cache", "q8", cache(2, {"kv_dtype": "q8"}))
    write("prompt_cache", "too_long", cache(70))
    write("prompt_cache", "missing_v1", cache(4, drop="v.1"))
    write("prompt_cache", "quantized", cache(6, quantized=True))
    write("prompt_cache", "quantized_missing_params", cache(6, quantized=True, drop="k.1.qp"))


def config_seeds():
    for folder in MODEL_FOLDERS:
        parts = []
        for f in ("config.json", "preprocessor_config.json", "generation_config.json"):
            p = os.path.join(folder, f)
            parts.append(read(p) if os.path.exists(p) else b"{}")
        write("config", os.path.basename(folder), SEP.join(parts))


# ---- tokenizers --------------------------------------------------------------------------------

def shrink_tokenizer(j, keep=400):
    """The tokenizer with the vocabulary's first `keep` ids, the merges among them, and the added
    tokens renumbered after them (the post-processor's ids with them)."""
    j = json.loads(json.dumps(j))
    m = j["model"]
    vocab = {t: i for t, i in m["vocab"].items() if i < keep}
    remap = {i: i for i in vocab.values()}
    next_id = keep
    added = []
    for a in j.get("added_tokens", []):
        if a["id"] >= keep:
            if next_id >= keep + 40:  # PaliGemma's 1024 <locNNNN> tokens: 40 are enough
                continue
            remap[a["id"]] = next_id
            a["id"] = next_id
            next_id += 1
        added.append(a)
    j["added_tokens"] = added
    m["vocab"] = vocab
    merges = []
    for mg in m.get("merges", []):
        a, b = mg.split(" ", 1) if isinstance(mg, str) else mg
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(mg)
    m["merges"] = merges[:300]
    post = j.get("post_processor")

    def fix_post(p):
        if not isinstance(p, dict):
            return
        for st in (p.get("special_tokens") or {}).values():
            st["ids"] = [remap.get(i, 0) for i in st.get("ids", [])]
        for k in ("sep", "cls"):
            if isinstance(p.get(k), list) and len(p[k]) == 2:
                p[k][1] = remap.get(p[k][1], 0)
        for q in p.get("processors", []) or []:
            fix_post(q)

    fix_post(post)
    return j


TEXTS = ["Hello world! <s> ünï 你好 \n\t 123", "USER: <image>\nWhat is in the picture? ASSISTANT:",
         "<|im_start|>user\nHi<|im_end|>\n", "  leading and trailing  ", "a\u0301 ﬁ \U0001F600 \x00 end"]


def tokenizer_seeds():
    sources = [os.path.join(FIX, "tokenizers", f) for f in sorted(os.listdir(os.path.join(FIX, "tokenizers")))
               if f.endswith(".tokenizer.json")]
    sources += [os.path.join(FIX, d, "tokenizer.json") for d in ("paligemma-bf16", "qwen2vl-bf16", "phi3v-bf16")]
    for i, src in enumerate(sources):
        j = shrink_tokenizer(json.load(open(src, encoding="utf-8")))
        name = os.path.basename(src).replace(".tokenizer.json", "").replace("tokenizer.json", os.path.basename(os.path.dirname(src)))
        text = TEXTS[i % len(TEXTS)].encode()
        write("tokenizer", name, json.dumps(j, ensure_ascii=False).encode() + SEP + text)


# ---- chat templates ----------------------------------------------------------------------------

def jinja_seeds():
    golden = json.load(open(os.path.join(DATA, "jinja_golden.json"), encoding="utf-8"))
    done = set()
    for case in golden["cases"]:
        if "template_file" in case:
            if case["template_file"] in done:
                continue
            done.add(case["template_file"])
            source = read(os.path.join(DATA, "chat_templates", case["template_file"]))
            name = case["template_file"][:-6]
        else:
            source = case["template"].encode()
            name = case["name"]
        write("jinja", name.replace("/", "_"), source + SEP + json.dumps(case["variables"], ensure_ascii=False).encode())
    for folder in MODEL_FOLDERS:
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        template = None
        if os.path.exists(os.path.join(folder, "chat_template.json")):
            template = json.load(open(os.path.join(folder, "chat_template.json")))["chat_template"]
        elif os.path.exists(cfg_path):
            template = json.load(open(cfg_path)).get("chat_template")
        if isinstance(template, str):
            write("jinja", "model-" + os.path.basename(folder), template.encode())
    # Templates that cost more than they look: a long string repeated, long searches, |unique.
    hostile = {
        "hostile-repeated-long-string": "{% set s = 'x' * 16000000 %}{{ ([s] * 1000) | length }}{{ ([s] * 1000) | join }}",
        "hostile-long-search": "{% set h = 'a' * 4000000 %}{% set n = 'a' * 2000000 ~ 'b' %}"
                               "{% for i in range(1000) %}{{ n in h }}{{ h.count(n) }}{% endfor %}",
        "hostile-unique": "{{ range(1000000) | list | unique | list | length }}",
        "hostile-sort-long-strings": "{% set h = 'a' * 4000000 %}{{ ([h] * 100000) | sort | length }}",
    }
    for name, source in hostile.items():
        write("jinja", name, source.encode())


# ---- images ------------------------------------------------------------------------------------

def image_seeds():
    for f in sorted(os.listdir(os.path.join(FIX, "images"))):
        img = Image.open(os.path.join(FIX, "images", f))
        small = img.resize((max(1, img.width // 16), max(1, img.height // 16)))
        stem = os.path.splitext(f)[0]
        for fmt, ext, mode in (("PNG", "png", None), ("JPEG", "jpg", "RGB"), ("GIF", "gif", "P"), ("BMP", "bmp", "RGB"),
                               ("TGA", "tga", "RGB"), ("WEBP", "webp", None)):
            im = small
            if mode == "RGB" and im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            if mode == "P":
                im = im.convert("RGB").convert("P")
            buf = io.BytesIO()
            im.save(buf, fmt)
            write("image", f"{stem}.{ext}", buf.getvalue())
    # A narrow image and a grey one: the shapes processors handle at their edges.
    buf = io.BytesIO()
    Image.new("RGB", (1, 40), (200, 10, 10)).save(buf, "PNG")
    write("image", "narrow.png", buf.getvalue())
    buf = io.BytesIO()
    Image.new("L", (5, 3), 128).save(buf, "JPEG")
    write("image", "grey.jpg", buf.getvalue())


# ---- requests ----------------------------------------------------------------------------------

def chat_request_seeds():
    png = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 200, 30)).save(png, "PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    bodies = {
        "text": {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0},
        "image": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}]}],
            "stream": True, "stream_options": {"include_usage": True}, "seed": 7, "top_p": 0.9, "top_k": 40},
        "everything": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                                    {"role": "user", "content": [{"type": "text", "text": "b"}]}],
                       "stop": ["\n", "END"], "logprobs": True, "top_logprobs": 3, "repetition_penalty": 1.1,
                       "min_p": 0.05, "max_completion_tokens": 16, "n": 1, "ignore_eos": False,
                       "chat_template_kwargs": {"add_vision_id": True}},
    }
    for name, body in bodies.items():
        write("chat_request", name, json.dumps(body).encode())
    # Nesting past the parse-time bound (256), where a recursive walk once overflowed the stack,
    # and just within it.
    hi = json.dumps([{"role": "user", "content": "hi"}])
    write("chat_request", "deep_kwargs", ('{"messages": %s, "chat_template_kwargs": {"x": %s}}'
                                          % (hi, "[" * 5000 + "]" * 5000)).encode())
    write("chat_request", "deep_content", ('{"messages": [{"role": "user", "content": %s}]}'
                                           % ('{"a":' * 2000 + "1" + "}" * 2000)).encode())
    write("chat_request", "nested_within_bound", ('{"messages": %s, "chat_template_kwargs": {"x": %s}}'
                                                  % (hi, "[" * 250 + "]" * 250)).encode())
    # Counts past the caps, and an image whose pixels would take more than the memory budget.
    write("chat_request", "many_messages", json.dumps({"messages": [{"role": "user", "content": "x"}] * 100}).encode())
    write("chat_request", "many_parts", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}] * 100}]}).encode())
    wide = io.BytesIO()
    Image.new("L", (5000, 5000), 128).save(wide, "PNG")
    write("chat_request", "image_past_the_budget", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(wide.getvalue()).decode()}}]}]}).encode())


def hub_seeds():
    """File lists and HEAD headers as the hub answers them, and as a hostile one might."""
    commit = "4c0ffee4c0ffee4c0ffee4c0ffee4c0ffee4c0ff"
    listing = json.dumps({"id": "acme/model", "sha": commit, "siblings": [
        {"rfilename": f} for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "sub/model.safetensors")]})
    lfs = ["\"" + "ab" * 32 + "\"", "\"" + "cd" * 20 + "\"", "600000", "1234"]
    small = ["", "\"" + "ef" * 20 + "\"", "", "512"]
    hostile = {
        "listing_lfs": [listing] + lfs,
        "listing_small": [listing] + small,
        "escaping_names": [json.dumps({"sha": commit, "siblings": [{"rfilename": f} for f in (
            "../../../etc/passwd.json", "/abs/config.json", "a/../../model.safetensors", "", "ok/../config.json")]})]
                          + ["\"../../x\"", "W/\"abc\"", "99999999999999999999", "-5"],
        "wrong_shapes": ['{"sha": 5, "siblings": {}}', '"W/\\"0123456789\\""', "", "1e9", ""],
        "deep_listing": ["[" * 5000 + "]" * 5000, "", "", "", ""],
        "not_json": ["<html>Sign in</html>", "", "", "", ""],
    }
    for name, parts in hostile.items():
        write("hub", name, SEP.join(p.encode() for p in parts))


def batch_line_seeds():
    lines = {
        "prompt": {"id": 1, "prompt": "Describe.", "images": ["a.png"], "max_tokens": 8, "temperature": 0, "seed": 3},
        "messages": {"id": "x", "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                     "images": ["b.jpg"], "stop": ["\n", "END"], "top_p": 0.9, "top_k": 40, "min_p": 0.05},
        "both": {"prompt": "a", "messages": []},
        "wrong_types": {"prompt": 3, "images": "a.png", "max_tokens": -1, "stop": [1]},
    }
    for name, line in lines.items():
        write("batch_line", name, json.dumps(line).encode())
    write("batch_line", "deep_id", ('{"id": ' + "[" * 100000 + "]" * 100000 + ', "prompt": "x"}').encode())
    write("batch_line", "unknown_key", b'{"prompt": "x", "temperatur": 0.5}')


def http_seeds():
    reqs = {
        "get": b"\x07GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        "post": b"\x10POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer k\r\nContent-Length: 13\r\n\r\n{\"messages\":1",
        "chunked": b"\x03POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: t\r\n\r\n",
        "pipelined": b"\x20GET /v1/models HTTP/1.1\r\n\r\nGET /metrics?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
        "expect": b"\x01POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
        "http10": b"\x3fGET / HTTP/1.0\r\n\r\n",
    }
    for name, data in reqs.items():
        write("http", name, data)


def main():
    safetensors_seeds()
    prompt_cache_seeds()
    config_seeds()
    tokenizer_seeds()
    jinja_seeds()
    image_seeds()
    chat_request_seeds()
    http_seeds()
    hub_seeds()
    batch_line_seeds()
    total = sum(len(files) for _, _, files in os.walk(OUT))
    print(f"wrote {total} seed files under {os.path.relpath(OUT, ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
