#!/usr/bin/env python3
"""Server benchmark: starts `vkvlm serve` (or uses --url), then for 1, 2, 4 and 8 concurrent
streaming clients (--clients) sends each the same kind of request at once and reports, per round:
aggregate decode tokens/s (all tokens after each stream's first / the round's decode span),
per-stream decode tokens/s (mean), and time to first token (mean, p50, p90, p99 and worst).

Needs only Python 3's standard library (HTTP and server-sent events by hand): it runs with the
system's python3, no virtual environment. bench/serve_bench.py --help
"""

import argparse
import base64
import http.client
import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "models/shapes-llava"


class BenchError(Exception):
    pass


def whole(lo, hi):
    def parse(v):
        try:
            n = int(v)
        except ValueError:
            n = None
        if n is None or not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"takes a whole number from {lo} to {hi}, not '{v}'")
        return n
    return parse


def counts(v):
    try:
        out = [int(x) for x in v.split(",")]
    except ValueError:
        out = []
    if not out or any(not 1 <= n <= 256 for n in out):
        raise argparse.ArgumentTypeError(f"takes counts from 1 to 256 separated by commas, not '{v}'")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bench/serve_bench.py",
        description="Starts vkvlm serve --parallel N (unless --url names a running server) and drives it with "
                    "concurrent streaming clients; answers run to --max-tokens (ignore_eos) so every round decodes "
                    "the same number of tokens. Extra serve flags go after --.")
    p.add_argument("--cli", default=str(HERE.parent / "build/vkvlm"), help="the vkvlm binary (default build/vkvlm)")
    p.add_argument("--model", default=str(DEMO), help="model folder or repo id (default the demo model)")
    p.add_argument("--url", default="", help="a running server, http://HOST:PORT; none is started")
    p.add_argument("--clients", type=counts, default=[1, 2, 4, 8], help="client counts, one round each (1,2,4,8)")
    p.add_argument("--parallel", type=whole(1, 64), default=8, help="serve --parallel (8)")
    p.add_argument("--max-tokens", type=whole(2, 1 << 20), default=64, help="tokens per answer (64)")
    p.add_argument("--ctx", type=whole(16, 1 << 24), default=1024, help="serve --ctx (1024)")
    p.add_argument("--rounds", type=whole(1, 100), default=1, help="rounds per client count; the best is kept (1)")
    p.add_argument("--image", default="", help="an image sent with every request (the demo model: shapes_1.png)")
    p.add_argument("--prompt", default="Describe this image in detail.")
    p.add_argument("--text-only", action="store_true", help="no image")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    o = p.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    o.extra = extra
    if o.text_only and o.image:
        p.error("give --image or --text-only, not both")
    if not o.image and not o.text_only and Path(o.model).resolve() == DEMO:
        o.image = str(DEMO / "examples/shapes_1.png")
    if o.image and not Path(o.image).is_file():
        p.error(f"--image {o.image} does not exist")
    o.url = o.url.rstrip("/")
    if o.url and urlsplit(o.url).scheme != "http":
        p.error(f"--url takes http://HOST:PORT, not '{o.url}'")
    return o


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A `vkvlm serve` of the bench's own, its stderr kept for the device line and errors."""

    def __init__(self, o):
        if not Path(o.cli).is_file():
            raise BenchError(f"no vkvlm at {o.cli} (build it, or give --cli)")
        port = free_port()
        args = [o.cli, "serve", "--model", o.model, "--port", str(port), "--parallel", str(o.parallel),
                "--ctx", str(o.ctx), "--max-concurrency", str(max(16, 2 * max(o.clients))), *o.extra]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.log = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise BenchError(f"vkvlm serve exited: {''.join(self.log).strip()}")
            try:
                if get(self.url, "/health") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > 600:
                raise BenchError("vkvlm serve did not become ready in 10 minutes")
            time.sleep(0.2)

    def device(self):
        m = re.search(r"ready on (.*)", "".join(self.log))
        return m.group(1) if m else ""

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def connection(url):
    u = urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=3600)


def get(url, path):
    conn = connection(url)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def body(o, tag):
    content = []
    if o.image:
        kind = "jpeg" if o.image.lower().endswith((".jpg", ".jpeg")) else "png"
        data = base64.b64encode(Path(o.image).read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{data}"}})
    # Each client's question differs a little, so no two share a cached prompt.
    content.append({"type": "text", "text": f"{o.prompt} ({tag})"})
    return {"model": "default", "stream": True, "temperature": 0, "max_tokens": o.max_tokens, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": content}]}


def stream(url, payload):
    """One streaming request: when it was sent, its first and last content, its token count."""
    conn = connection(url)
    try:
        sent = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise BenchError(f"HTTP {r.status}: {r.read().decode('utf-8', 'replace')}")
        first = last = 0.0
        tokens = 0
        for line in r:  # server-sent events: one `data: ...` line each, blank lines between
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            j = json.loads(line[6:])
            if j.get("error"):
                raise BenchError(j["error"].get("message", str(j["error"])))
            if j.get("usage"):
                tokens = j["usage"]["completion_tokens"]
            if j.get("choices") and j["choices"][0].get("delta", {}).get("content"):
                last = time.perf_counter()
                first = first or last
        return {"sent": sent, "first": first, "last": last, "tokens": tokens}
    finally:
        conn.close()


def percentile(values, p):
    """The nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def round_of(url, o, n, tag):
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        runs = list(pool.map(lambda i: stream(url, body(o, f"{tag}-{i}")), range(n)))
    t1 = time.perf_counter()
    if any(not r["first"] for r in runs):
        raise BenchError("a stream ended without content")
    decode_span = max(r["last"] for r in runs) - min(r["first"] for r in runs)
    after_first = sum(max(0, r["tokens"] - 1) for r in runs)
    per_stream = [(r["tokens"] - 1) / (r["last"] - r["first"]) if r["last"] > r["first"] else 0 for r in runs]
    ttft = [r["first"] - r["sent"] for r in runs]
    tokens = sum(r["tokens"] for r in runs)
    return {
        "clients": n, "tokens": tokens, "wall_seconds": t1 - t0,
        "aggregate_decode_tps": after_first / decode_span if decode_span > 0 else 0.0,
        "aggregate_tps": tokens / (t1 - t0),
        "per_stream_decode_tps": sum(per_stream) / n,
        "ttft_mean_seconds": sum(ttft) / n,
        "ttft_p50_seconds": percentile(ttft, 50), "ttft_p90_seconds": percentile(ttft, 90),
        "ttft_p99_seconds": percentile(ttft, 99), "ttft_max_seconds": max(ttft),
    }


def main(argv):
    o = parse_args(argv)
    server = None
    try:
        if not o.url:
            server = Served(o)
        url = o.url or server.url
        device = server.device() if server else ""
        stream(url, {**body(o, "warm-up"), "max_tokens": 4})  # compiles pipelines, fills caches
        results = []
        for n in o.clients:
            rounds = [round_of(url, o, n, f"{n}-{k}") for k in range(o.rounds)]
            results.append(max(rounds, key=lambda r: r["aggregate_decode_tps"]))
        single = next((r for r in results if r["clients"] == 1), None)
        for r in results:
            r["speedup_vs_one"] = (r["aggregate_decode_tps"] / single["aggregate_decode_tps"]
                                   if single and single["aggregate_decode_tps"] else None)
        if o.json:
            print(json.dumps({"model": o.model, "device": device, "parallel": o.parallel, "max_tokens": o.max_tokens,
                              "image": o.image, "results": results}))
        else:
            print(f"vkvlm serve --parallel {o.parallel}: {o.model}{f' on {device}' if device else ''}, "
                  f"{o.max_tokens} tokens per answer{', one image each' if o.image else ''}")
            print("clients | aggregate decode tok/s | x one client | per-stream decode tok/s | "
                  "TTFT mean s | TTFT p50 s | TTFT p90 s | TTFT p99 s | TTFT max s")
            for r in results:
                print(f"{r['clients']:>7} | {r['aggregate_decode_tps']:>22.1f} | {r['speedup_vs_one'] or 0:>12.2f} | "
                      f"{r['per_stream_decode_tps']:>23.1f} | {r['ttft_mean_seconds']:>11.2f} | "
                      f"{r['ttft_p50_seconds']:>10.2f} | {r['ttft_p90_seconds']:>10.2f} | "
                      f"{r['ttft_p99_seconds']:>10.2f} | {r['ttft_max_seconds']:>10.2f}")
        return 0
    except (BenchError, OSError) as e:
        print(f"serve_bench: {e}", file=sys.stderr)
        return 1
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
