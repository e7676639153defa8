"""`vkvlm serve` driven by the official OpenAI Python client: answers equal `vkvlm generate` (and
the demo model's reference answers), streaming, images, multi-turn KV reuse, concurrency, every
error case in OpenAI's shape, and a client that disconnects mid-stream.

CTest runs it from the virtual environment `scripts/setup --tests` makes (build/test-venv),
with VKVLM_CLI and VKVLM_SOURCE_DIR set.
"""

import base64
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

CLI = os.environ.get("VKVLM_CLI")
SRC = os.environ.get("VKVLM_SOURCE_DIR")
assert CLI and SRC, "VKVLM_CLI and VKVLM_SOURCE_DIR must be set (CTest sets them)"
DEMO = Path(SRC) / "models/shapes-llava"
FIXTURE = Path(SRC) / "tests/data/fixtures/llava15-f16"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
EXAMPLES = json.loads((DEMO / "examples/expected.json").read_text())["examples"]


@pytest.fixture(scope="module")
def tmp():
    with tempfile.TemporaryDirectory(prefix="vkvlm-server-test-") as d:
        yield Path(d)


# ---- plain HTTP, for what the client does not send: raw bodies, other headers, /metrics ---------

class Reply:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")


def request(port, method, path, body=None, headers=None, timeout=120):
    """One HTTP exchange; the reply whatever its status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Reply(r.status, dict(r.getheaders()), r.read())
    finally:
        conn.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc, port):
        self.proc, self.port = proc, port
        self.base = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(api_key=KEY, base_url=f"{self.base}/v1", max_retries=0, timeout=600)

    def get(self, path, headers=None):
        return request(self.port, "GET", path, headers=headers)

    def post(self, path, body, headers=None):
        return request(self.port, "POST", path, body=body, headers=headers)

    def metric(self, name, headers=AUTH):
        """A counter or gauge of /metrics, by its full name."""
        text = self.get("/metrics", headers).text
        m = re.search(rf"^{re.escape(name)} (\d+)$", text, re.M)
        assert m, f"{name} not in /metrics:\n{text}"
        return int(m.group(1))

    def stop(self):
        """SIGTERM; the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the server did not exit within 60 s of SIGTERM")


def start_server(model, *extra):
    port = free_port()
    proc = subprocess.Popen([CLI, "serve", "--model", str(model), "--port", str(port), "--api-key", KEY,
                             *map(str, extra)], stdin=subprocess.DEVNULL)
    server = Server(proc, port)
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"vkvlm serve exited with {proc.returncode} before it was healthy")
        try:
            r = server.get("/health")
            if r.status == 503:
                assert r.json()["status"] == "loading"
            elif r.status == 200:
                assert r.json()["status"] == "ok"
                return server
        except OSError:
            pass  # not listening yet
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server on {server.base} never became healthy")


@contextlib.contextmanager
def running(model, *extra):
    """`with running(model, flags...) as s:` a server stopped on the way out."""
    server = start_server(model, *extra)
    try:
        yield server
    finally:
        server.stop()


def png(name):
    return "data:image/png;base64," + base64.b64encode((DEMO / "examples" / name).read_bytes()).decode()


def image_message(name, text):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png(name)}},
                                        {"type": "text", "text": text}]}


def generate(tmp, model, messages, *extra):
    """What `vkvlm generate` answers for the same conversation (greedy)."""
    file = tmp / f"messages-{uuid.uuid4().hex}.json"
    file.write_text(json.dumps(messages))
    out = subprocess.run([CLI, "generate", "--model", str(model), "--messages", str(file), "--json", *extra],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def error_of(call):
    """The API error a call raises; failing the test when it succeeds."""
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value


def assert_openai_error(body, param=None):
    assert "error" in body, f"no error object in {body}"
    for k in ("message", "type", "param", "code"):
        assert k in body["error"], f"error.{k} missing in {body}"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


def stream_text(stream):
    """The content of a streamed answer."""
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text


def chat(client, messages, **kw):
    """A greedy chat completion; extensions (ignore_eos, lookup_ngram, ...) in extra_body."""
    known = {"model", "max_tokens", "stream", "stream_options", "logprobs", "top_logprobs", "temperature"}
    extra = {k: kw.pop(k) for k in list(kw) if k not in known}
    kw.setdefault("model", "shapes-llava")
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(messages=messages, extra_body=extra or None, **kw)


@pytest.fixture(scope="module")
def demo():
    s = start_server(DEMO, "--ctx", 1024, "--max-images", 2, "--max-body-mb", 2,
                     "--allow-local-files", DEMO / "examples", "--kv-slots", 2)
    yield s
    assert s.stop() == 0, "the server exits cleanly on SIGTERM"


def test_lists_the_model(demo):
    assert [m.id for m in demo.client.models.list().data] == ["shapes-llava"]


def test_non_streaming_image_request_equals_vkvlm_generate(demo, tmp):
    messages = [image_message("shapes_1.png", "Describe this image.")]
    want = generate(tmp, DEMO, messages)
    r = chat(demo.client, messages, max_tokens=64)
    assert r.object == "chat.completion"
    assert len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want["text"]
    assert r.choices[0].message.content == "An orange circle at the top left and a black circle at the bottom."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(want["prompt_tokens"])
    assert r.usage.completion_tokens == len(want["tokens"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_a_placeholder_written_in_the_text_takes_the_image_the_request_carries(demo):
    # LLaVA's documented "<image>\n..." prompt, its image sent as an image_url part.
    messages = [{"role": "user", "content": [{"type": "text", "text": "<image>\nDescribe this image."},
                                             {"type": "image_url", "image_url": {"url": png("shapes_1.png")}}]}]
    r = chat(demo.client, messages, max_tokens=64)
    assert r.choices[0].message.content == "An orange circle at the top left and a black circle at the bottom."
    # A placeholder without an image is a 400 that counts both.
    e = error_of(lambda: chat(demo.client, [{"role": "user", "content": "<image>\nDescribe this image."}]))
    assert e.status_code == 400
    assert re.search(r"1 image placeholder\(s\).*0 image\(s\) were given", e.body["message"])


def test_streaming_sends_role_content_deltas_finish_reason_usage_and_done(demo, tmp):
    messages = [image_message("shapes_2.png", "Describe this image.")]
    want = generate(tmp, DEMO, messages)
    stream = chat(demo.client, messages, stream=True, stream_options={"include_usage": True})
    text, role, finish, usage, chunks = "", None, None, None, 0
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        role = c.delta.role or role
        text += c.delta.content or ""
        finish = c.finish_reason or finish
    assert chunks > 3
    assert role == "assistant"
    assert text == want["text"]
    assert finish == "stop"
    assert usage.prompt_tokens == len(want["prompt_tokens"])
    assert usage.completion_tokens == len(want["tokens"])
    # On the wire: server-sent events, each a JSON chunk, the last one `data: [DONE]`.
    raw = demo.post("/v1/chat/completions", json.dumps({"messages": messages, "temperature": 0, "stream": True}),
                    JSON_AUTH)
    assert raw.status == 200
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    events = raw.text.strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == want["text"]


def test_a_follow_up_turn_reuses_the_kv_cache_and_answers_as_generate_does(demo, tmp):
    first = [image_message("shapes_3.png", "Describe this image.")]
    a = chat(demo.client, first)
    follow_up = [*first, {"role": "assistant", "content": a.choices[0].message.content},
                 {"role": "user", "content": "How many shapes are there?"}]
    b = chat(demo.client, follow_up)
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached > a.usage.prompt_tokens, f"cached {cached} of {b.usage.prompt_tokens}"
    assert b.choices[0].message.content == generate(tmp, DEMO, follow_up)["text"]


def test_two_interleaved_conversations_each_keep_their_cache(demo, tmp):  # --kv-slots 2
    a1 = [image_message("shapes_0.png", "Describe this image.")]
    b1 = [image_message("shapes_2.png", "Describe this image.")]
    ra, rb = chat(demo.client, a1), chat(demo.client, b1)
    more = {"role": "user", "content": "How many shapes are there?"}
    a2 = [*a1, {"role": "assistant", "content": ra.choices[0].message.content}, more]
    b2 = [*b1, {"role": "assistant", "content": rb.choices[0].message.content}, more]
    ra2, rb2 = chat(demo.client, a2), chat(demo.client, b2)
    assert ra2.usage.prompt_tokens_details.cached_tokens > ra.usage.prompt_tokens, "conversation A reused its cache"
    assert rb2.usage.prompt_tokens_details.cached_tokens > rb.usage.prompt_tokens, "conversation B reused its cache"
    assert ra2.choices[0].message.content == generate(tmp, DEMO, a2)["text"]
    assert rb2.choices[0].message.content == generate(tmp, DEMO, b2)["text"]


def test_local_image_files_only_inside_allow_local_files(demo):
    ok = chat(demo.client, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "shapes_0.png"}},
                                                         {"type": "text", "text": "Where is the orange square?"}]}])
    assert ok.choices[0].message.content == "It is on the right."
    e = error_of(lambda: chat(demo.client, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "../config.json"}}]}]))
    assert e.status_code == 400
    assert "no such image file in the folder the server allows" in e.body["message"]


def test_8_concurrent_clients_all_get_their_own_correct_answers(demo):
    picked = [EXAMPLES[i] for i in (0, 3, 5, 7, 10, 12, 15, 18)]

    def ask(i):
        ex = picked[i]
        r = chat(demo.client, [image_message(ex["image"], ex["question"])], stream=i % 2 == 1)
        return stream_text(r) if i % 2 == 1 else r.choices[0].message.content

    with ThreadPoolExecutor(len(picked)) as pool:
        answers = list(pool.map(ask, range(len(picked))))
    for ex, answer in zip(picked, answers):
        assert answer == ex["greedy_fp16_reference"], ex["question"]


def ask_with_logprobs(client, body, stream):
    """Text, finish reason and every step's logprobs, streamed or not."""
    r = chat(client, **body, stream=stream)
    if not stream:
        c = r.choices[0]
        return {"text": c.message.content, "logprobs": [t.model_dump() for t in c.logprobs.content],
                "finish": c.finish_reason}
    text, finish, logprobs = "", None, []
    for c in r:
        if not c.choices:
            continue
        text += c.choices[0].delta.content or ""
        if c.choices[0].logprobs:
            logprobs += [t.model_dump() for t in c.choices[0].logprobs.content]
        finish = c.choices[0].finish_reason or finish
    return {"text": text, "logprobs": logprobs, "finish": finish}


def test_parallel_8_clients_decode_together_and_answer_exactly_as_one_at_a_time():
    # Different prompt lengths: four images (one each, answers of different lengths) and four
    # text-only turns, one cut short by max_tokens.
    picked = [EXAMPLES[i] for i in (2, 5, 10, 17, 1, 7, 12, 19)]

    def short(i):
        ex = picked[i]
        messages = ([image_message(ex["image"], ex["question"])] if i < 4
                    else [{"role": "user", "content": f"[{i}] {ex['question']}"}])
        return {"messages": messages, "logprobs": True, "top_logprobs": 2, "max_tokens": 3 if i == 6 else 64}

    # Long answers (ignore_eos), so that the eight overlap whatever the order they arrive in.
    def long(i):
        return {"messages": [{"role": "user", "content": f"({i}) {picked[i]['question']}"}], "logprobs": True,
                "top_logprobs": 2, "max_tokens": 24 + i, "ignore_eos": True}

    def same(got, want, what):
        assert got["text"] == want["text"], what
        assert got["finish"] == want["finish"], what
        assert got["logprobs"] == want["logprobs"], f"{what}: every step's logprobs"

    # Every request gets a slot no conversation used (16 slots; no two prompts share an image or
    # more than their first tokens, so none continues another's slot): nothing is reused, and
    # batched and alone must agree bit for bit (a continued prefix is computed in other row
    # blocks and rounds differently). One at a time, on a server that decodes one at a time:
    with running(DEMO, "--ctx", 512, "--kv-slots", 16) as single:
        alone = [ask_with_logprobs(single.client, short(i), False) for i in range(8)]
        alone_long = [ask_with_logprobs(single.client, long(i), False) for i in range(8)]
    assert alone[6]["finish"] == "length"
    with running(DEMO, "--ctx", 512, "--parallel", 8, "--kv-slots", 16) as s, ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: ask_with_logprobs(s.client, short(i), i % 2 == 1), range(8)))
        for i, ex in enumerate(picked):
            same(together[i], alone[i], ex["question"])
            if i < 4:
                assert together[i]["text"] == ex["greedy_fp16_reference"], ex["question"]
        steps0, advanced0 = s.metric("vkvlm_decode_steps_total"), s.metric("vkvlm_decode_step_sequences_total")
        together_long = list(pool.map(lambda i: ask_with_logprobs(s.client, long(i), i % 2 == 0), range(8)))
        for i, ex in enumerate(picked):
            same(together_long[i], alone_long[i], f"({i}) {ex['question']}")
        # They were decoded together: the batched steps advanced several sequences each.
        steps1, advanced1 = s.metric("vkvlm_decode_steps_total"), s.metric("vkvlm_decode_step_sequences_total")
        mean = (advanced1 - advanced0) / (steps1 - steps0)
        assert mean > 3, f"mean batch {mean} over {steps1 - steps0} steps"


def test_errors_come_in_openais_shape_with_the_right_status(demo):
    hi = [{"role": "user", "content": "hi"}]
    images = [{"type": "image_url", "image_url": {"url": png(n)}} for n in ("shapes_0.png", "shapes_1.png", "shapes_2.png")]
    image = lambda url: json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    cases = [
        ("malformed JSON", '{"messages": [', 400, None, None, {}),
        ("wrong type: temperature", json.dumps({"messages": hi, "temperature": "hot"}), 400, "temperature", None, {}),
        ("wrong type: messages", json.dumps({"messages": "hi"}), 400, "messages", None, {}),
        ("wrong type: max_tokens", json.dumps({"messages": hi, "max_tokens": "5"}), 400, "max_tokens", None, {}),
        ("empty messages", json.dumps({"messages": []}), 400, "messages", None, {}),
        ("unknown role", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages[0].role", None, {}),
        ("n > 1", json.dumps({"messages": hi, "n": 2}), 400, "n", None, {}),
        ("chat_template_kwargs not an object", json.dumps({"messages": hi, "chat_template_kwargs": [1]}), 400,
         "chat_template_kwargs", None, {}),
        ("too many images", json.dumps({"messages": [{"role": "user", "content": images}]}), 400, None, "too_many_images", {}),
        ("image that does not decode", image("data:image/png;base64,aGVsbG8gd29ybGQ="), 400, None, "invalid_image", {}),
        ("remote image URL", image("https://example.com/cat.png"), 400, None, "invalid_image_url", {}),
        ("prompt over the context", json.dumps({"messages": [{"role": "user", "content": "red circle " * 700}]}), 400, None,
         "context_length_exceeded", {}),
        ("body over the size limit", json.dumps({"messages": [{"role": "user", "content": "x" * (3 << 20)}]}), 413, None,
         None, {}),
        ("missing API key", json.dumps({"messages": hi}), 401, None, None, {"Authorization": ""}),
        ("wrong API key", json.dumps({"messages": hi}), 401, None, None, {"Authorization": "Bearer nope"}),
    ]
    for name, body, status, param, code, headers in cases:
        r = demo.post("/v1/chat/completions", body, {**JSON_AUTH, **headers})
        assert r.status == status, name
        assert_openai_error(r.json(), param)
        if code:
            assert r.json()["error"]["code"] == code, name
    # The official client sees the same errors.
    assert error_of(lambda: chat(demo.client, [])).status_code == 400
    unauth = openai.OpenAI(api_key="wrong", base_url=f"{demo.base}/v1", max_retries=0)
    assert error_of(lambda: unauth.models.list()).status_code == 401
    # And the server is still well.
    assert demo.get("/health").status == 200


def test_json_nested_100000_deep_is_refused_as_it_is_read_and_the_server_lives(demo):
    """Arrays 100,000 levels deep in a 200 KB body (which once ended the server with SIGSEGV when
    chat_template_kwargs was re-serialized): a 400 naming the nesting, wherever they sit."""
    hi = json.dumps([{"role": "user", "content": "hi"}])
    deep = "[" * 100_000 + "]" * 100_000
    bodies = {
        "chat_template_kwargs": '{"messages": %s, "chat_template_kwargs": {"x": %s}}' % (hi, deep),
        "a message's content": '{"messages": [{"role": "user", "content": %s}]}' % deep,
        "an unknown key": '{"messages": %s, "metadata": {"a": %s}}' % (hi, deep),
        "objects, not arrays": '{"messages": %s, "chat_template_kwargs": %s}' % (hi, '{"a":' * 50_000 + "1" + "}" * 50_000),
    }
    for where, body in bodies.items():
        r = demo.post("/v1/chat/completions", body, JSON_AUTH)
        assert r.status == 400, where
        assert_openai_error(r.json(), None)
        assert "nest deeper than 256 levels" in r.json()["error"]["message"], where
        assert r.json()["error"]["code"] == "invalid_json", where
    # Brackets inside strings are text, not nesting; moderate nesting is read as before.
    text = json.dumps({"messages": [{"role": "user", "content": "[" * 1000}], "max_tokens": 2})
    assert demo.post("/v1/chat/completions", text, JSON_AUTH).status == 200
    nested = '{"messages": %s, "max_tokens": 2, "chat_template_kwargs": {"x": %s}}' % (hi, "[" * 100 + "]" * 100)
    assert demo.post("/v1/chat/completions", nested, JSON_AUTH).status == 200
    assert demo.get("/health").status == 200


def test_a_client_that_disconnects_mid_stream_stops_its_generation_and_frees_its_place(demo):
    cancelled_before = demo.metric("vkvlm_cancelled_requests_total")
    # ignore_eos (an extension, as in vLLM) makes this a long generation.
    stream = chat(demo.client, [{"role": "user", "content": "red"}], max_tokens=900, stream=True, ignore_eos=True)
    for chunks, _ in enumerate(stream, 1):
        if chunks == 5:
            break
    stream.close()  # the connection goes away mid-answer
    cancelled = cancelled_before
    for _ in range(100):
        cancelled = demo.metric("vkvlm_cancelled_requests_total")
        if cancelled != cancelled_before:
            break
        time.sleep(0.1)
    assert cancelled == cancelled_before + 1, "the generation was cancelled"
    assert demo.metric("vkvlm_requests_in_flight") == 0
    assert demo.metric("vkvlm_generated_tokens_total") > 0
    r = chat(demo.client, [image_message("shapes_0.png", "How many shapes are there?")])
    assert r.choices[0].message.content == "There is 1 shape."


def test_a_leaving_client_at_parallel_1_hands_its_slot_to_the_next_at_once(demo):
    # The demo server decodes one conversation at a time: the second request waits for the first.
    stream = chat(demo.client, [{"role": "user", "content": "red"}], max_tokens=900, stream=True, ignore_eos=True)
    with ThreadPoolExecutor(1) as pool:
        for chunks, _ in enumerate(stream, 1):
            if chunks == 5:
                break
        waiting = pool.submit(lambda: chat(demo.client, [image_message("shapes_0.png", "How many shapes are there?")],
                                           max_tokens=8))
        time.sleep(0.3)
        assert not waiting.done(), "the second request waits for the first's slot"
        left = time.monotonic()
        stream.close()
        r = waiting.result(timeout=60)
        waited = time.monotonic() - left
    assert r.choices[0].message.content == "There is 1 shape."
    assert waited < 1.5, f"the slot was handed on {waited:.2f} s after its client left"


def read_http_response(sock):
    """Reads one whole HTTP/1.1 response from a socket, as the protocol frames it: (status, headers,
    body); AssertionError when the bytes end before the framing says the response ends."""
    buf = bytearray()

    def need(n):
        while len(buf) < n:
            d = sock.recv(65536)
            assert d, f"the connection ended inside the response: {bytes(buf[-80:])!r}"
            buf.extend(d)

    def line():
        while b"\r\n" not in buf:
            need(len(buf) + 1)
        i = buf.index(b"\r\n")
        out = bytes(buf[:i])
        del buf[:i + 2]
        return out

    status = int(line().split()[1])
    headers = {}
    while (h := line()):
        k, v = h.decode("latin1").split(":", 1)
        headers[k.strip().lower()] = v.strip()
    body = bytearray()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while (size := int(line().split(b";")[0], 16)):
            need(size + 2)
            body += buf[:size]
            assert buf[size:size + 2] == b"\r\n", "a chunk ends with CRLF"
            del buf[:size + 2]
        while line():  # trailers, then the empty line that ends the message
            pass
    else:
        n = int(headers["content-length"])
        need(n)
        body += buf[:n]
    return status, headers, bytes(body)


@pytest.mark.parametrize("connection", ["close", "keep-alive"])
@pytest.mark.parametrize("stream", [True, False])
def test_every_response_ends_as_http_1_1_frames_it_whatever_the_connection_header(demo, connection, stream):
    body = json.dumps({"max_tokens": 6, "stream": stream, "messages": [{"role": "user", "content": "red"}]}).encode()
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
           f"Connection: {connection}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
           ).encode() + body
    with socket.create_connection(("127.0.0.1", demo.port), timeout=60) as sock:
        sock.sendall(req)
        status, headers, data = read_http_response(sock)
        assert status == 200, data
        assert headers["connection"] == connection
        if stream:
            assert headers["transfer-encoding"] == "chunked"
            assert data.endswith(b"data: [DONE]\n\n")
        else:
            assert json.loads(data)["usage"]["completion_tokens"] == 6
        if connection == "close":
            assert sock.recv(1) == b"", "the server closes the connection after the response"
        else:  # the connection serves a second request
            sock.sendall(req)
            assert read_http_response(sock)[0] == 200
    # Python's urllib sends Connection: close and checks the chunked framing as it reads.
    import urllib.request
    r = urllib.request.urlopen(urllib.request.Request(f"{demo.base}/v1/chat/completions", data=body,
                                                      headers=JSON_AUTH), timeout=60)
    assert r.read().rstrip().endswith(b"[DONE]" if stream else b"}")


# ---- what a hostile client can try ----------------------------------------------------------------

def raw_exchange(port, chunks, gap=0.0, timeout=20.0):
    """Writes the chunks to one connection (gap seconds apart) while reading what comes back; the
    status of the reply (-1: none before the connection ended, -2: none in time) and its bytes."""
    sock = socket.create_connection(("127.0.0.1", port))
    data = bytearray()
    ended = threading.Event()

    def read():
        try:
            while True:
                d = sock.recv(65536)
                if not d:
                    break
                data.extend(d)
        except OSError:
            pass
        ended.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        for c in chunks:
            if ended.is_set() or time.monotonic() > deadline:
                break
            sock.sendall(c.encode("latin1") if isinstance(c, str) else c)
            if gap:
                time.sleep(gap)
    except OSError:
        pass  # the server closed the connection while we wrote
    finished = ended.wait(max(0.0, deadline - time.monotonic()))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    reader.join(5)
    m = re.match(rb"HTTP/1\.1 (\d+)", bytes(data))
    return (int(m.group(1)) if m else (-1 if finished else -2)), bytes(data)


def gray_png(w, h):
    """A PNG of w x h gray pixels, written here."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    rows = (b"\0" + b"\x80" * w) * h
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def peak_rss_kib(pid):
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def test_hardening_bodies_paths_slow_clients_leaving_clients_narrow_images_metrics(tmp):
    # A folder the server may read, with links that lead out of it.
    allow, outside = tmp / "allow", tmp / "outside"
    (allow / "sub").mkdir(parents=True)
    outside.mkdir()
    shape = (DEMO / "examples/shapes_0.png").read_bytes()
    (allow / "inside.png").write_bytes(shape)
    (outside / "secret.png").write_bytes(shape)
    (allow / "link_out.png").symlink_to(outside / "secret.png")
    (allow / "link_dir").symlink_to(outside)
    with running(DEMO, "--ctx", 512, "--allow-local-files", allow, "--max-body-mb", 2, "--request-timeout", 3,
                 "--max-concurrency", 4) as s:
        def ask(url):
            return s.post("/v1/chat/completions", json.dumps({"max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]}]}), JSON_AUTH)

        # 1. Paths: links out of the folder are refused, with the same answer whether the outside
        # file exists or not, naming no path of the server's; other schemes and NUL bytes too.
        assert ask("inside.png").status == 200
        refused = set()
        for url in ("nonexistent/../link_out.png", f"file://{allow}/nonexistent/../link_out.png",
                    "nonexistent/../link_dir/secret.png", "link_out.png", "link_dir/secret.png", "../outside/secret.png",
                    "../outside/absent.png", str(outside / "secret.png")):
            r = ask(url)
            assert r.status == 400, url
            message = r.json()["error"]["message"]
            refused.add(message)
            assert str(tmp) not in message, f"the answer names a server path: {message}"
        assert len(refused) == 1, f"every refusal reads the same: {refused}"
        for url in ("ftp://127.0.0.1/x.png", "gopher://x/y.png", "inside.png\u0000.txt"):
            r = ask(url)
            assert r.status == 400, url
            assert str(tmp) not in r.json()["error"]["message"]

        # 2. A chunked body over the limit gets 413 while it arrives; the server does not swallow it.
        rss_before = peak_rss_kib(s.proc.pid)
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * (1 << 20)
        chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        t0 = time.monotonic()
        status, data = raw_exchange(s.port, [head] + [chunk] * 150)
        assert status == 413, data[:200]
        assert time.monotonic() - t0 < 10, "the refusal comes while the body is still arriving"
        assert peak_rss_kib(s.proc.pid) - rss_before < 64 * 1024, "the oversized body was not kept"

        # 3. A narrow image (1 x 20000) costs what its crop costs, not its 336 x 6.7M resize.
        narrow = "data:image/png;base64," + base64.b64encode(gray_png(1, 20000)).decode()
        rss0 = peak_rss_kib(s.proc.pid)
        nr = ask(narrow)
        assert nr.status == 200, nr.text
        assert peak_rss_kib(s.proc.pid) - rss0 < 200 * 1024, "a narrow image's peak memory stays small"

        # 4. Slow clients: 40 connections that trickle their headers never lock /health out, and
        # each is closed once the request time limit passes.
        slow_chunks = ["POST /v1/chat/completions HTTP/1.1\r\n"] + [f"X-Slow-{i}: 1\r\n" for i in range(30)]
        with ThreadPoolExecutor(40) as pool:
            slow = [pool.submit(raw_exchange, s.port, slow_chunks, 0.5, 30) for _ in range(40)]
            time.sleep(0.5)
            for _ in range(5):
                t = time.monotonic()
                assert s.get("/health").status == 200
                assert time.monotonic() - t < 1, "/health answers under the flood"
                time.sleep(0.3)
            for f in slow:
                assert f.result()[0] == 408, "a request that does not arrive in time is closed with 408"

        # 5. Clients that leave while queued give their admission back at once: a burst whose
        # clients all leave early does not keep the next ones out.
        body = json.dumps({"max_tokens": 400, "ignore_eos": True, "stream": True,
                           "messages": [{"role": "user", "content": "red"}]}).encode()
        leave = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(lambda _: raw_exchange(s.port, [leave], timeout=0.15), range(12)))
        in_flight = s.metric("vkvlm_requests_in_flight")
        for _ in range(50):
            if in_flight == 0:
                break
            time.sleep(0.1)
            in_flight = s.metric("vkvlm_requests_in_flight")
        assert in_flight == 0, "every leaving client's admission was freed"
        with ThreadPoolExecutor(3) as pool:
            after = list(pool.map(lambda _: chat(s.client, [image_message("shapes_0.png", "How many shapes are there?")],
                                                 max_tokens=8), range(3)))
        for r in after:
            assert r.choices[0].message.content == "There is 1 shape."

        # 6. /metrics needs the key (as /v1 does); the scheme is case-insensitive.
        assert s.get("/metrics").status == 401
        assert s.get("/metrics", {"Authorization": f"bearer {KEY}"}).status == 200
        assert s.get("/v1/models", {"Authorization": f"BEARER {KEY}"}).status == 200
        assert s.get("/v1/models", {"Authorization": f"Basic {KEY}"}).status == 401


def reset_peak_rss(pid):
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS


def rss_kib(pid):
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def test_request_memory_is_planned_before_it_is_spent_and_bounded_server_wide():
    # A body must fit in the budget: a setup where it cannot is refused at the start.
    bad = subprocess.run([CLI, "serve", "--model", str(DEMO), "--max-request-memory", "32", "--max-body-mb", "64"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--max-body-mb 64 does not fit" in bad.stderr, bad.stderr
    budget_mib = 256
    with running(DEMO, "--ctx", 1024, "--max-body-mb", 64, "--max-request-memory", budget_mib, "--max-messages", 2000,
                 "--max-parts", 3000) as s:
        def post(body):
            return s.post("/v1/chat/completions", body if isinstance(body, bytes) else json.dumps(body), JSON_AUTH)

        def measured(body):
            """The reply, and how far the server's resident memory rose while it handled the body."""
            reset_peak_rss(s.proc.pid)
            before = rss_kib(s.proc.pid)
            r = post(body)
            return r, (peak_rss_kib(s.proc.pid) - before) / 1024

        hi = [{"role": "user", "content": "red"}]
        # Large valid bodies of every shape, each sized to fit the budget: what each held at its
        # peak stays within the budget, whatever its ratio to the body.
        shapes = {
            "template variables: 500,000 numbers": {"max_tokens": 2, "messages": hi, "chat_template_kwargs": {"x": [1] * 500_000}},
            "an unread field: 1,100,000 empty objects": {"max_tokens": 2, "messages": hi, "junk": [{}] * 1_100_000},
            "one message of 6 MB": {"max_tokens": 2, "messages": [{"role": "user", "content": "red " * 1_500_000}]},
            "1,900 messages": {"max_tokens": 2, "messages": [{"role": "user", "content": "red blue " * 20}] * 1_900},
            "2,900 text parts": {"max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", "text": "red "}] * 2_900}]},
        }
        for name, body in shapes.items():
            raw = json.dumps(body).encode()
            r, peak_mib = measured(raw)
            assert r.status in (200, 400), (name, r.status, r.text[:300])
            if r.status == 400:
                assert r.json()["error"]["code"] == "context_length_exceeded", r.text
            ratio = peak_mib * 2**20 / len(raw)
            print(f"{name}: body {len(raw) / 2**20:.1f} MiB, peak +{peak_mib:.0f} MiB ({ratio:.0f}x the body)")
            assert peak_mib <= budget_mib, f"{name}: the request held {peak_mib:.0f} MiB, more than the budget"
        assert s.metric("vkvlm_request_memory_bytes") == 0, "every reservation was given back"
        assert 0 < s.metric("vkvlm_request_memory_peak_bytes") <= budget_mib << 20
        assert s.metric("vkvlm_request_memory_budget_bytes") == budget_mib << 20

        # Four times larger: refused with 413 before it is parsed, naming what it needs and the flag.
        big = json.dumps({"max_tokens": 2, "messages": hi, "junk": [{}] * 2_400_000}).encode()
        r, peak_mib = measured(big)
        assert r.status == 413, r.text[:300]
        assert r.json()["error"]["code"] == "request_too_large"
        assert "--max-request-memory of 256 MiB" in r.json()["error"]["message"]
        assert peak_mib < 3 * len(big) / 2**20 + 16, "the refused body was never expanded"

        # An image's pixels are reserved from its header, before it is decoded: 4200 x 4200 is
        # 269 MiB of pixels at 16 bytes each, past the budget.
        huge = "data:image/png;base64," + base64.b64encode(gray_png(4200, 4200)).decode()
        r, peak_mib = measured({"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": huge}}, {"type": "text", "text": "Hi"}]}]})
        assert r.status == 413 and "an image of 4200x4200 pixels" in r.json()["error"]["message"], r.text[:300]
        assert peak_mib < 32, "the image was not decoded"

        # Message and part counts past their caps: a 400 that names the cap, before any expansion.
        r = post({"messages": [{"role": "user", "content": "x"}] * 2_001})
        assert r.status == 400 and r.json()["error"]["code"] == "too_many_messages", r.text[:300]
        assert "--max-messages of 2000" in r.json()["error"]["message"]
        r = post({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 1_600}] * 2})
        assert r.status == 400 and r.json()["error"]["code"] == "too_many_parts", r.text[:300]

        # Three at once that each fit alone but not together: those that do not fit now get 429
        # with Retry-After, the server's peak stays within the budget, and each alone succeeds.
        heavy = json.dumps({"max_tokens": 2, "messages": hi, "junk": [{}] * 900_000}).encode()
        reset_peak_rss(s.proc.pid)
        before = rss_kib(s.proc.pid)
        start = threading.Barrier(3)

        def send(_):
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
            conn.putrequest("POST", "/v1/chat/completions")
            for k, v in {**JSON_AUTH, "Content-Length": str(len(heavy))}.items():
                conn.putheader(k, v)
            conn.endheaders()
            start.wait()
            conn.send(heavy)
            reply = conn.getresponse()
            out = (reply.status, reply.getheader("Retry-After"), reply.read())
            conn.close()
            return out

        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(send, range(3)))
        peak_mib = (peak_rss_kib(s.proc.pid) - before) / 1024
        statuses = sorted(status for status, _, _ in replies)
        assert statuses[0] == 200 and set(statuses) <= {200, 429}, statuses
        for status, retry, body in replies:
            if status == 429:
                assert retry == "1" and json.loads(body)["error"]["code"] == "server_busy"
        assert peak_mib <= budget_mib + 3 * len(heavy) / 2**20, f"three at once held {peak_mib:.0f} MiB"
        print(f"three bodies of {len(heavy) / 2**20:.1f} MiB at once: {statuses}, peak +{peak_mib:.0f} MiB")
        assert post(heavy).status == 200

        # Bodies still arriving count too: six clients sending 60 MB each at once cannot make the
        # server hold more than the budget; those past it are answered 503 while they send.
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {60 << 20}\r\n\r\n").encode()
        reset_peak_rss(s.proc.pid)
        before = rss_kib(s.proc.pid)
        with ThreadPoolExecutor(6) as pool:
            uploads = list(pool.map(lambda _: raw_exchange(s.port, [head] + [b" " * (1 << 20)] * 60, timeout=60), range(6)))
        peak_mib = (peak_rss_kib(s.proc.pid) - before) / 1024
        statuses = sorted(status for status, _ in uploads)
        # 503: refused while it arrived; 429: whole, but no room to parse it now; 400: parsed (not JSON).
        assert set(statuses) <= {400, 429, 503} and 503 in statuses, statuses
        # (Beyond the budget: a body's buffer as it grows, briefly held twice while it moves.)
        assert peak_mib <= budget_mib + 96, f"six uploads held {peak_mib:.0f} MiB"
        print(f"six 60 MB uploads at once: {statuses}, peak +{peak_mib:.0f} MiB")


def test_cors_models_by_id_and_the_seed_config_path():
    origin = "https://app.example"
    # An origin that would split the header it goes into is refused at the start.
    bad = subprocess.run([CLI, "serve", "--model", str(DEMO), "--cors-origin", "https://a.example\r\nX-Evil: 1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--cors-origin" in bad.stderr, bad.stderr
    with running(DEMO, "--ctx", 256, "--cors-origin", origin) as s:
        # A browser's preflight, answered without the key it does not carry.
        pre = request(s.port, "OPTIONS", "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status == 204, pre.text
        assert pre.headers["Access-Control-Allow-Origin"] == origin
        assert "POST" in pre.headers["Access-Control-Allow-Methods"]
        assert {"authorization", "content-type"} <= {h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")}
        # Every answer allows the origin, errors included.
        assert s.get("/v1/models", {**AUTH, "Origin": origin}).headers["Access-Control-Allow-Origin"] == origin
        denied = s.get("/v1/models", {"Origin": origin})
        assert denied.status == 401 and denied.headers["Access-Control-Allow-Origin"] == origin
        # GET /v1/models/{id}, read by the official client.
        m = s.client.models.retrieve("shapes-llava")
        assert m.id == "shapes-llava" and m.object == "model"
        with pytest.raises(openai.NotFoundError) as e:
            s.client.models.retrieve("no-such-model")
        assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
        # The LLaVA-MLX server's path for the configuration answers as /v1/config does.
        assert s.get("/api/v1/config", AUTH).json() == s.get("/v1/config", AUTH).json()
        r = request(s.port, "PATCH", "/api/v1/config", json.dumps({"active_model": "shapes-llava"}), JSON_AUTH)
        assert r.status == 200 and r.json()["active_model"] == "shapes-llava", r.text
        bad = request(s.port, "PATCH", "/api/v1/config", json.dumps({"active_model": "nope"}), JSON_AUTH)
        assert bad.status == 404, bad.text
    # Without --cors-origin, nothing is allowed to other origins and OPTIONS is not a method.
    with running(DEMO, "--ctx", 256) as s:
        r = request(s.port, "OPTIONS", "/v1/chat/completions", headers={"Origin": origin})
        assert r.status == 405 and "Access-Control-Allow-Origin" not in r.headers


def test_sigterm_drains_what_is_in_flight_refuses_what_comes_and_exits_0():
    s = start_server(DEMO, "--ctx", 1024, "--drain-timeout", 120)
    try:
        assert s.get("/health/live").status == 200 and s.get("/health/ready").status == 200
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(lambda: chat(s.client, [{"role": "user", "content": "red"}], max_tokens=400, ignore_eos=True))
            for _ in range(200):
                if s.metric("vkvlm_requests_in_flight") == 1:
                    break
                time.sleep(0.05)
            # The figures inference gateways read (the model server protocol's vLLM names).
            for _ in range(500):  # until its generation holds the slot
                text = s.get("/metrics", AUTH).text
                gauges = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(vllm:[a-z_]+) ([0-9.e+-]+)$", text, re.M)}
                if gauges["vllm:kv_cache_usage_perc"] == 1.0:
                    break
                time.sleep(0.02)
            assert gauges["vllm:num_requests_running"] == 1 and gauges["vllm:num_requests_waiting"] == 0, gauges
            assert gauges["vllm:kv_cache_usage_perc"] == gauges["vllm:gpu_cache_usage_perc"] == 1.0, gauges  # 1 slot, busy
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            # Draining: not ready (a gateway stops sending), still alive, new requests refused.
            assert s.get("/health/ready").status == 503
            assert s.get("/health/live").status == 200
            refused = s.post("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), JSON_AUTH)
            assert refused.status == 503 and refused.json()["error"]["code"] == "server_draining", refused.text
            answer = long.result(timeout=300)
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 400
        assert s.proc.wait(timeout=60) == 0, "exit 0 once the requests in flight are done"
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_metrics_public_opens_metrics_alone():
    with running(DEMO, "--ctx", 256, "--metrics-public") as s:
        assert s.get("/metrics").status == 200
        assert s.get("/v1/models").status == 401


def test_a_fixture_model_answers_as_vkvlm_generate_does_with_logprobs(tmp):
    with running(FIXTURE, "--ctx", 256, "--max-concurrency", 1) as s:
        cases = json.loads((FIXTURE / "cases.json").read_text())["cases"]
        text_only = next(c for c in cases if c["name"] == "text_only")
        want = generate(tmp, FIXTURE, text_only["messages"], "--max-tokens", "12", "--ctx", "256")
        r = chat(s.client, text_only["messages"], model="llava15-f16", max_tokens=12, logprobs=True, top_logprobs=3)
        assert r.choices[0].message.content == want["text"]
        assert r.usage.prompt_tokens == len(want["prompt_tokens"])
        lp = r.choices[0].logprobs.content
        assert len(lp) == r.usage.completion_tokens
        for step in lp:
            assert step.logprob <= 0
            assert len(step.top_logprobs) == 3
            # Greedy: the chosen token is the most likely one.
            assert abs(step.top_logprobs[0].logprob - step.logprob) < 1e-4
        # --max-concurrency 1: requests arriving while one is in flight are turned away with 429.
        def attempt(_):
            try:
                return chat(s.client, text_only["messages"], model="llava15-f16", max_tokens=12)
            except openai.APIStatusError as e:
                return e
        with ThreadPoolExecutor(3) as pool:
            burst = list(pool.map(attempt, range(3)))
        ok = [b for b in burst if not isinstance(b, Exception)]
        busy = [b for b in burst if isinstance(b, Exception)]
        assert len(ok) >= 1
        assert len(busy) >= 1, "a burst over the limit gets 429"
        for b in busy:
            assert b.status_code == 429
            assert b.code == "server_busy"
        for b in ok:
            assert b.choices[0].message.content == want["text"]


def test_speculative_decoding_answers_as_without_it_and_reports_drafts(demo, tmp):
    # The demo model drafting for itself: every draft is accepted, and the answers are the plain ones.
    messages = [image_message("shapes_1.png", "Describe this image.")]
    with running(DEMO, "--ctx", 512, "--draft-model", DEMO, "--num-draft-tokens", 4, "--kv-slots", 2) as s:
        want = generate(tmp, DEMO, messages)
        r = chat(s.client, messages)
        assert r.choices[0].message.content == want["text"]
        assert r.usage.draft_tokens > 0
        assert r.usage.accepted_tokens == r.usage.draft_tokens
        # Streaming, a follow-up turn on both caches, and a per-request draft length.
        follow = [*messages, {"role": "assistant", "content": want["text"]},
                  {"role": "user", "content": "How many shapes are there?"}]
        text, usage = "", None
        for chunk in chat(s.client, follow, stream=True, stream_options={"include_usage": True}, num_draft_tokens=2):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert text == generate(tmp, DEMO, follow)["text"]
        assert usage.prompt_tokens_details.cached_tokens > 0
        assert usage.draft_tokens > 0
        assert s.metric("vkvlm_draft_tokens_total") == r.usage.draft_tokens + usage.draft_tokens
        assert s.metric("vkvlm_accepted_draft_tokens_total") == r.usage.accepted_tokens + usage.accepted_tokens
        for body, param in (({"num_draft_tokens": 0}, "num_draft_tokens"), ({"lookup_ngram": 2}, "lookup_ngram")):
            e = error_of(lambda: chat(s.client, messages, **body))
            assert e.status_code == 400
            assert_openai_error({"error": e.body}, param)
    # Prompt lookup, asked for by the request: 'square' recurs, so it drafts.
    r = chat(demo.client, [image_message("shapes_0.png", "What color is the square?")], lookup_ngram=1)
    assert r.choices[0].message.content == "The square is orange."
    assert r.usage.draft_tokens > 0
    assert r.usage.accepted_tokens <= r.usage.draft_tokens


def test_prompt_cache_every_conversation_that_starts_like_the_cached_one_continues_it(tmp):
    answer = "An orange circle at the top left and a black circle at the bottom."
    described = [image_message("shapes_1.png", "Describe this image."), {"role": "assistant", "content": answer}]
    file = tmp / "messages-described.json"
    file.write_text(json.dumps([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
                                described[1]]))
    cache_file = tmp / "described.cache"
    out = subprocess.run([CLI, "cache-prompt", "--messages", file, "--image", DEMO / "examples/shapes_1.png",
                          "--out", cache_file], check=True, capture_output=True, text=True).stdout
    rows = int(re.match(r"cached (\d+) prompt tokens", out).group(1))
    assert rows > 0
    with running(DEMO, "--ctx", 512, "--prompt-cache", cache_file) as s:
        follow = [*described, {"role": "user", "content": "How many shapes are there?"}]
        a = chat(s.client, follow)
        assert a.choices[0].message.content == generate(tmp, DEMO, follow)["text"]
        assert a.usage.prompt_tokens_details.cached_tokens == rows, "the first request already starts from the cache"
        # Another conversation takes the only slot; the next one like the cache gets the cache back.
        other = [image_message("shapes_0.png", "What color is the square?")]
        assert chat(s.client, other).choices[0].message.content == "The square is orange."
        b = chat(s.client, [*described, {"role": "user", "content": "Where is the black circle?"}])
        assert b.usage.prompt_tokens_details.cached_tokens >= rows
    # A cache of another model stops the server at load with a message naming the file.
    wrong = subprocess.run([CLI, "serve", "--model", FIXTURE, "--port", str(free_port()), "--prompt-cache", cache_file],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           timeout=300)
    assert wrong.returncode == 1
    assert re.search(r"described\.cache.*another model", wrong.stderr), wrong.stderr


def test_kv_bits_quantized_kv_caches_answer_as_the_command_line_does_in_the_bytes_metrics_reports(tmp):
    with running(DEMO, "--ctx", 256, "--kv-bits", 4, "--kv-group-size", 32, "--kv-slots", 2, "--metrics-public") as s:
        messages = [{"role": "user", "content": "What color is the square?"}]
        r = chat(s.client, messages, max_tokens=16)
        want = generate(tmp, DEMO, messages, "--ctx", "256", "--kv-bits", "4", "--kv-group-size", "32", "--max-tokens", "16")
        assert r.choices[0].message.content == want["text"]
        assert want["kv_cache"]["format"] == "q4 group 32"
        # Two slots of the demo model's cache: 4 layers, K and V, 256 rows of 128 values at 4 bits
        # plus an f16 scale and bias per 32.
        values = 4 * 2 * 256 * 128
        expected = 2 * (values // 2 + (values // 32) * 4)
        assert f'vkvlm_kv_cache_bytes{{model="shapes-llava",format="q4 group 32"}} {expected}\n' in s.get("/metrics").text


def test_several_models_routed_by_name_loaded_on_demand_max_loaded_1_patch_config(tmp):
    with running(f"shapes={DEMO}", "--model", f"llava={FIXTURE}", "--max-loaded", 1, "--ctx", 256) as s:
        def models():
            return {m["id"]: m["loaded"] for m in s.get("/v1/models", AUTH).json()["data"]}

        assert models() == {"shapes": True, "llava": False}, "the active model loads at start, the other on demand"
        assert s.get("/health").json()["models"] == {"shapes": "ready", "llava": "unloaded"}
        question = [{"role": "user", "content": "Write a haiku about GPUs."}]
        square = [image_message("shapes_0.png", "What color is the square?")]

        # Two streams at once, one per model: each answers as the command line does with its model.
        def stream(model, messages):
            text = ""
            for c in chat(s.client, messages, model=model, max_tokens=12, stream=True):
                assert c.model == model
                text += (c.choices[0].delta.content or "") if c.choices else ""
            return text

        with ThreadPoolExecutor(2) as pool:
            fa, fb = pool.submit(stream, "llava", question), pool.submit(stream, "shapes", square)
            a, b = fa.result(), fb.result()
        assert a == generate(tmp, FIXTURE, question, "--max-tokens", "12")["text"]
        assert b == "The square is orange."
        assert sum(models().values()) == 1, "--max-loaded 1 keeps one loaded"
        # The llava model again (loaded anew if it was unloaded); "default" is the active one.
        r = chat(s.client, question, model="llava", max_tokens=12)
        assert r.model == "llava"
        assert r.choices[0].message.content == a
        assert models() == {"shapes": False, "llava": True}
        d = chat(s.client, square, model="default")
        assert d.model == "shapes"
        assert d.choices[0].message.content == "The square is orange."
        # An unknown model: OpenAI's 404 model_not_found, naming the models there are.
        e = error_of(lambda: chat(s.client, square, model="gpt-4o"))
        assert e.status_code == 404
        assert e.code == "model_not_found"
        assert re.search(r"gpt-4o.*shapes, llava", e.body["message"])
        # GET / PATCH /v1/config: the active model answers requests that name none.
        assert s.get("/v1/config", AUTH).json()["active_model"] == "shapes"
        patched = request(s.port, "PATCH", "/v1/config", json.dumps({"active_model": "llava"}), JSON_AUTH)
        assert patched.status == 200
        assert patched.json()["active_model"] == "llava"
        unnamed = s.post("/v1/chat/completions", json.dumps({"messages": question, "temperature": 0, "max_tokens": 12}),
                         JSON_AUTH).json()
        assert unnamed["model"] == "llava"
        assert unnamed["choices"][0]["message"]["content"] == a
        bad = request(s.port, "PATCH", "/v1/config", json.dumps({"active_model": "nope"}), JSON_AUTH)
        assert bad.status == 404
        assert bad.json()["error"]["code"] == "model_not_found"
        other = request(s.port, "PATCH", "/v1/config", json.dumps({"max_loaded": 3}), JSON_AUTH)
        assert other.status == 400


def test_config_file_models_and_settings_a_model_that_cannot_load_is_a_503(tmp):
    config = tmp / "models.json"
    broken = tmp / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llava"')  # cut short
    config.write_text(json.dumps({"models": [{"name": "small", "model": str(DEMO), "ctx": 200, "kv_bits": 8},
                                             {"name": "fixture", "model": str(FIXTURE), "ctx": 256},
                                             {"name": "broken", "model": str(broken)}], "active_model": "small"}))
    # --model's joins the config's; --ctx is the default.
    with running(DEMO, "--config", config, "--ctx", 512) as s:
        cfg = s.get("/v1/config", AUTH).json()
        assert cfg["active_model"] == "small"
        assert [[m["name"], m["ctx"], m["kv_cache"]] for m in cfg["models"]] == [
            ["shapes-llava", 512, "f16"], ["small", 200, "q8 group 64"], ["fixture", 256, "f16"], ["broken", 512, "f16"]]
        square = [image_message("shapes_0.png", "What color is the square?")]
        e = error_of(lambda: chat(s.client, square, model="broken"))
        assert e.status_code == 503
        assert e.code == "model_unavailable"
        assert re.search(r"model broken could not be loaded: .*config\.json", e.body["message"])
        assert s.get("/health").json()["models"]["broken"] == "failed"
        r = chat(s.client, square, model="small")
        assert r.choices[0].message.content == "The square is orange."
    config.write_text(json.dumps({"models": [{"name": "small", "model": str(DEMO), "context": 128}]}))
    wrong = subprocess.run([CLI, "serve", "--config", config, "--port", str(free_port())], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert wrong.returncode == 1
    assert re.search(r"models\.json.*models\[0\].*unknown key 'context'", wrong.stderr), wrong.stderr


def test_max_kv_size_answers_run_past_the_rotating_cache(tmp):
    with running(DEMO, "--max-kv-size", 24) as s:
        messages = [{"role": "user", "content": "What color is the square?"}]
        r = chat(s.client, messages, max_tokens=40, ignore_eos=True)
        assert r.usage.completion_tokens == 40
        assert r.usage.prompt_tokens + r.usage.completion_tokens > 24
        assert r.choices[0].finish_reason == "length"
        want = generate(tmp, DEMO, messages, "--max-kv-size", "24", "--max-tokens", "40", "--ignore-eos")
        assert r.choices[0].message.content == want["text"]
