#!/usr/bin/env python3
"""Hostile soak: minutes of mixed valid and hostile traffic against `vkvlm serve --parallel N`.

Valid clients ask the demo model's example questions (greedy) and check that each answer is the
one the same request gets alone (asked one at a time before the soak starts). Hostile clients,
side by side, send what the hardening rounds found: bodies over --max-body-mb, JSON nested
100,000 deep, more messages than --max-messages, bodies that need more memory than
--max-request-memory, streams abandoned mid-answer, clients that trickle their headers, and bytes
that are not HTTP. Every 10 s it prints the server's resident memory (now and peak) and the
replies so far by kind and status; at the end, errors by kind, the peak resident memory over
time, and whether every valid request got its answer.

Needs only Python 3's standard library. bench/hostile_soak.py --help
"""

import argparse
import base64
import http.client
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "models/shapes-llava"
KEY = "soak-key"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/hostile_soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--cli", default=str(HERE.parent / "build/vkvlm"), help="the vkvlm binary (default build/vkvlm)")
    p.add_argument("--minutes", type=float, default=10, help="how long the soak runs (10)")
    p.add_argument("--parallel", type=int, default=4, help="serve --parallel (4)")
    p.add_argument("--valid-clients", type=int, default=4, help="clients sending valid requests (4)")
    p.add_argument("--hostile-clients", type=int, default=8, help="clients sending hostile requests (8)")
    p.add_argument("--max-request-memory", type=int, default=512, help="serve --max-request-memory in MB (512)")
    p.add_argument("--json", action="store_true", help="the summary as one JSON object")
    o = p.parse_args(argv)
    if not Path(o.cli).is_file():
        p.error(f"no vkvlm at {o.cli} (build it, or give --cli)")
    if o.minutes <= 0 or o.parallel < 1 or o.valid_clients < 1 or o.hostile_clients < 0:
        p.error("--minutes, --parallel and --valid-clients must be positive, --hostile-clients not negative")
    return o


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kib(pid, field):
    m = re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) if m else 0


class Soak:
    def __init__(self, o):
        self.o = o
        self.port = free_port()
        args = [o.cli, "serve", "--model", str(DEMO), "--port", str(self.port), "--api-key", KEY, "--ctx", "1024",
                "--parallel", str(o.parallel), "--kv-slots", str(o.parallel), "--max-concurrency", "32",
                "--max-body-mb", "16", "--max-messages", "1000", "--max-request-memory", str(o.max_request_memory),
                "--request-timeout", "5"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.lock = threading.Lock()
        self.replies = defaultdict(Counter)  # kind -> status -> count
        self.wrong = []                       # valid requests whose answer differed from their answer alone
        self.samples = []                     # (seconds, rss MiB, peak MiB)
        self.stop = threading.Event()
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"vkvlm serve exited with {self.proc.returncode} before it was ready")
            try:
                if self.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("vkvlm serve was not ready within 5 minutes")
            time.sleep(0.2)
        examples = json.loads((DEMO / "examples/expected.json").read_text())["examples"]
        self.valid = []
        for e in examples:
            url = "data:image/png;base64," + base64.b64encode((DEMO / "examples" / e["image"]).read_bytes()).decode()
            self.valid.append({"max_tokens": 24, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": e["question"]}]}]})
        # Each valid request's answer alone, before any other traffic.
        self.alone = []
        for body in self.valid:
            status, data = self.request("POST", "/v1/chat/completions", json.dumps(body).encode())
            if status != 200:
                raise SystemExit(f"a valid request failed alone: {status} {data[:200]!r}")
            self.alone.append(json.loads(data)["choices"][0]["message"]["content"])

    def request(self, method, path, body=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def count(self, kind, status):
        with self.lock:
            self.replies[kind][status] += 1

    # ---- clients --------------------------------------------------------------------------------

    def valid_client(self, seed):
        rng = random.Random(seed)
        while not self.stop.is_set():
            i = rng.randrange(len(self.valid))
            try:
                status, data = self.request("POST", "/v1/chat/completions", json.dumps(self.valid[i]).encode())
            except OSError as e:
                self.count("valid", f"connection error ({type(e).__name__})")
                continue
            self.count("valid", status)
            answer = json.loads(data)["choices"][0]["message"]["content"] if status == 200 else None
            if status == 429:
                time.sleep(0.2)  # the server asked to retry later; not an error
            elif answer != self.alone[i]:
                with self.lock:
                    self.wrong.append((i, status, answer, self.alone[i]))

    def raw(self, chunks, gap=0.0, read=True, timeout=10.0):
        """Writes chunks to one connection; the reply's status (None: none)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                try:
                    for c in chunks:
                        s.sendall(c)
                        if gap:
                            time.sleep(gap)
                except OSError:
                    pass  # the server answered and closed while we sent: its answer is still there to read
                if not read:
                    return None
                data = s.recv(256)
                m = re.match(rb"HTTP/1\.1 (\d+)", data)
                return int(m.group(1)) if m else None
        except OSError:
            return None

    def post_head(self, length, extra=""):
        return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n").encode()

    def hostile_client(self, seed):
        rng = random.Random(seed)
        hi = [{"role": "user", "content": "red"}]
        deep = ('{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": '
                + "[" * 100000 + "]" * 100000 + "}}").encode()
        many = json.dumps({"messages": hi * 1001}).encode()
        heavy = json.dumps({"messages": hi, "junk": [{}] * 3_500_000}).encode()  # 14 MB, ~560 MB to parse
        stream = json.dumps({"max_tokens": 200, "ignore_eos": True, "stream": True, "messages": hi}).encode()
        while not self.stop.is_set():
            kind = rng.choice(["oversized", "deep", "many messages", "heavy", "abandoned stream", "slow headers",
                               "not http"])
            if kind == "oversized":  # announces 64 MB (the limit is 16), sends 1 MB of it
                status = self.raw([self.post_head(64 << 20), b" " * (1 << 20)])
            elif kind == "deep":
                status = self.raw([self.post_head(len(deep)) + deep])
            elif kind == "many messages":
                status = self.raw([self.post_head(len(many)) + many])
            elif kind == "heavy":
                status = self.raw([self.post_head(len(heavy)) + heavy], timeout=60)
            elif kind == "abandoned stream":  # reads the first bytes of the answer, then leaves
                status = self.raw([self.post_head(len(stream)) + stream])
            elif kind == "slow headers":  # a header line every 0.5 s, until the request timeout ends it
                status = self.raw([b"POST /v1/chat/completions HTTP/1.1\r\n"] + [b"X-Slow: 1\r\n"] * 14, gap=0.5)
            else:
                status = self.raw([bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000)))])
            self.count(kind, status if status is not None else "closed")

    def sampler(self, start):
        while not self.stop.wait(10):
            self.sample(start)

    def sample(self, start):
        rss, peak = proc_kib(self.proc.pid, "VmRSS") / 1024, proc_kib(self.proc.pid, "VmHWM") / 1024
        with self.lock:
            self.samples.append((round(time.monotonic() - start), round(rss), round(peak)))
            totals = {k: sum(v.values()) for k, v in self.replies.items()}
        if not self.o.json:
            print(f"{self.samples[-1][0]:5d} s  rss {rss:6.0f} MiB  peak {peak:6.0f} MiB  replies {totals}", flush=True)

    def run(self):
        start = time.monotonic()
        threads = [threading.Thread(target=self.valid_client, args=(i,)) for i in range(self.o.valid_clients)]
        threads += [threading.Thread(target=self.hostile_client, args=(100 + i,)) for i in range(self.o.hostile_clients)]
        threads.append(threading.Thread(target=self.sampler, args=(start,)))
        for t in threads:
            t.start()
        self.stop.wait(self.o.minutes * 60)
        self.stop.set()
        for t in threads:
            t.join()
        self.sample(start)
        alive = self.proc.poll() is None and self.request("GET", "/health")[0] == 200
        self.proc.terminate()
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = None
        return {
            "minutes": self.o.minutes, "parallel": self.o.parallel, "max_request_memory_mb": self.o.max_request_memory,
            "replies": {k: {str(s): n for s, n in v.items()} for k, v in sorted(self.replies.items())},
            "valid_requests": sum(self.replies["valid"].values()),
            "valid_answers_different_from_alone": len(self.wrong),
            "peak_rss_mib": max(s[2] for s in self.samples),
            "rss_mib_over_time": [[t, r] for t, r, _ in self.samples],
            "alive_at_the_end": alive, "exit_code_on_sigterm": code,
            "wrong_examples": self.wrong[:5],
        }


def main(argv):
    o = parse_args(argv)
    result = Soak(o).run()
    if o.json:
        print(json.dumps(result))
    else:
        print("\nreplies by kind and status:")
        for kind, statuses in result["replies"].items():
            print(f"  {kind:18s} {statuses}")
        print(f"valid requests: {result['valid_requests']}, answered differently than alone: "
              f"{result['valid_answers_different_from_alone']}")
        print(f"peak resident memory: {result['peak_rss_mib']} MiB; alive at the end: {result['alive_at_the_end']}; "
              f"exit status on SIGTERM: {result['exit_code_on_sigterm']}")
    ok = result["valid_answers_different_from_alone"] == 0 and result["alive_at_the_end"] and result["exit_code_on_sigterm"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
