// `vkvlm serve` driven by the official OpenAI client: answers equal `vkvlm generate` (and the
// demo model's reference answers), streaming, images, multi-turn KV reuse, concurrency,
// every error case in OpenAI's shape, and a client that disconnects mid-stream.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { readFileSync, writeFileSync, mkdtempSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import OpenAI from "openai";

const CLI = process.env.VKVLM_CLI;
const SRC = process.env.VKVLM_SOURCE_DIR;
assert.ok(CLI && SRC, "VKVLM_CLI and VKVLM_SOURCE_DIR must be set (CTest sets them)");
const DEMO = join(SRC, "models/shapes-llava");
const FIXTURE = join(SRC, "tests/data/fixtures/llava15-f16");
const KEY = "test-key";
const tmp = mkdtempSync(join(tmpdir(), "vkvlm-server-test-"));

function freePort() {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function startServer(model, extra = []) {
  const port = await freePort();
  const proc = spawn(CLI, ["serve", "--model", model, "--port", String(port), "--api-key", KEY, ...extra], {
    stdio: ["ignore", "inherit", "inherit"],
  });
  const base = `http://127.0.0.1:${port}`;
  let sawLoading = false;
  for (let i = 0; i < 600; i++) {
    try {
      const r = await fetch(`${base}/health`);
      if (r.status === 503) {
        sawLoading = true;
        assert.equal((await r.json()).status, "loading");
      } else if (r.status === 200) {
        assert.deepEqual(await r.json(), { status: "ok" });
        return { proc, base, port, sawLoading, client: new OpenAI({ apiKey: KEY, baseURL: `${base}/v1`, maxRetries: 0 }) };
      }
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  proc.kill("SIGKILL");
  throw new Error(`server on ${base} never became healthy`);
}

function stopServer(s) {
  return new Promise((resolve) => {
    s.proc.on("exit", (code, signal) => resolve({ code, signal }));
    s.proc.kill("SIGTERM");
  });
}

const png = (name) => `data:image/png;base64,${readFileSync(join(DEMO, "examples", name)).toString("base64")}`;
const imageMessage = (name, text) => ({
  role: "user",
  content: [{ type: "image_url", image_url: { url: png(name) } }, { type: "text", text }],
});

// What `vkvlm generate` answers for the same conversation (greedy).
function generate(model, messages, extra = []) {
  const file = join(tmp, `messages-${Math.random().toString(36).slice(2)}.json`);
  writeFileSync(file, JSON.stringify(messages));
  const out = execFileSync(CLI, ["generate", "--model", model, "--messages", file, "--json", ...extra], {
    encoding: "utf8",
  });
  return JSON.parse(out);
}

async function errorOf(promise) {
  try {
    await promise;
  } catch (e) {
    return e;
  }
  assert.fail("the request should have failed");
}

function assertOpenAIError(body, status, param) {
  assert.ok(body.error, `no error object in ${JSON.stringify(body)}`);
  for (const k of ["message", "type", "param", "code"]) assert.ok(k in body.error, `error.${k} missing`);
  assert.equal(typeof body.error.message, "string");
  assert.ok(body.error.message.length > 0);
  if (param !== undefined) assert.equal(body.error.param, param);
}

let demo;
before(async () => {
  demo = await startServer(DEMO, [
    "--ctx", "1024", "--max-images", "2", "--max-body-mb", "2", "--allow-local-files", join(DEMO, "examples"),
    "--kv-slots", "2",
  ]);
});
after(async () => {
  if (demo) {
    const { code } = await stopServer(demo);
    assert.equal(code, 0, "the server exits cleanly on SIGTERM");
  }
});

test("lists the model", async () => {
  const models = await demo.client.models.list();
  assert.deepEqual(models.data.map((m) => m.id), ["shapes-llava"]);
});

test("non-streaming image request equals vkvlm generate", async () => {
  const messages = [imageMessage("shapes_1.png", "Describe this image.")];
  const want = generate(DEMO, messages);
  const r = await demo.client.chat.completions.create({ model: "shapes-llava", messages, temperature: 0, max_tokens: 64 });
  assert.equal(r.object, "chat.completion");
  assert.equal(r.choices.length, 1);
  assert.equal(r.choices[0].message.role, "assistant");
  assert.equal(r.choices[0].message.content, want.text);
  assert.equal(r.choices[0].message.content, "An orange circle at the top left and a black circle at the bottom.");
  assert.equal(r.choices[0].finish_reason, "stop");
  assert.equal(r.usage.prompt_tokens, want.prompt_tokens.length);
  assert.equal(r.usage.completion_tokens, want.tokens.length);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
});

test("a placeholder written in the text takes the image the request carries", async () => {
  // LLaVA's documented "<image>\n..." prompt, its image sent as an image_url part.
  const messages = [{ role: "user", content: [{ type: "text", text: "<image>\nDescribe this image." },
                                              { type: "image_url", image_url: { url: png("shapes_1.png") } }] }];
  const r = await demo.client.chat.completions.create({ model: "shapes-llava", messages, temperature: 0, max_tokens: 64 });
  assert.equal(r.choices[0].message.content, "An orange circle at the top left and a black circle at the bottom.");
  // A placeholder without an image is a 400 that counts both.
  const e = await errorOf(demo.client.chat.completions.create({
    model: "shapes-llava", messages: [{ role: "user", content: "<image>\nDescribe this image." }] }));
  assert.equal(e.status, 400);
  assert.match(e.message, /1 image placeholder\(s\).*0 image\(s\) were given/);
});

test("streaming sends role, content deltas, finish_reason, usage and [DONE]", async () => {
  const messages = [imageMessage("shapes_2.png", "Describe this image.")];
  const want = generate(DEMO, messages);
  const stream = await demo.client.chat.completions.create({
    model: "shapes-llava", messages, temperature: 0, stream: true, stream_options: { include_usage: true },
  });
  let text = "", role = null, finish = null, usage = null, chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    assert.equal(chunk.object, "chat.completion.chunk");
    if (chunk.usage) usage = chunk.usage;
    if (!chunk.choices.length) continue;
    const c = chunk.choices[0];
    if (c.delta.role) role = c.delta.role;
    if (c.delta.content) text += c.delta.content;
    if (c.finish_reason) finish = c.finish_reason;
  }
  assert.ok(chunks > 3);
  assert.equal(role, "assistant");
  assert.equal(text, want.text);
  assert.equal(finish, "stop");
  assert.equal(usage.prompt_tokens, want.prompt_tokens.length);
  assert.equal(usage.completion_tokens, want.tokens.length);
});

test("a follow-up turn reuses the KV cache and answers as generate does", async () => {
  const first = [imageMessage("shapes_3.png", "Describe this image.")];
  const a = await demo.client.chat.completions.create({ model: "shapes-llava", messages: first, temperature: 0 });
  const followUp = [...first, { role: "assistant", content: a.choices[0].message.content },
                    { role: "user", content: "How many shapes are there?" }];
  const b = await demo.client.chat.completions.create({ model: "shapes-llava", messages: followUp, temperature: 0 });
  assert.ok(b.usage.prompt_tokens_details.cached_tokens > a.usage.prompt_tokens,
            `cached ${b.usage.prompt_tokens_details.cached_tokens} of ${b.usage.prompt_tokens}`);
  assert.equal(b.choices[0].message.content, generate(DEMO, followUp).text);
});

test("two interleaved conversations each keep their cache (--kv-slots 2)", async () => {
  const create = (messages) => demo.client.chat.completions.create({ model: "shapes-llava", messages, temperature: 0 });
  const a1 = [imageMessage("shapes_0.png", "Describe this image.")];
  const b1 = [imageMessage("shapes_2.png", "Describe this image.")];
  const ra = await create(a1);
  const rb = await create(b1);
  const a2 = [...a1, { role: "assistant", content: ra.choices[0].message.content }, { role: "user", content: "How many shapes are there?" }];
  const b2 = [...b1, { role: "assistant", content: rb.choices[0].message.content }, { role: "user", content: "How many shapes are there?" }];
  const ra2 = await create(a2);
  const rb2 = await create(b2);
  assert.ok(ra2.usage.prompt_tokens_details.cached_tokens > ra.usage.prompt_tokens, "conversation A reused its cache");
  assert.ok(rb2.usage.prompt_tokens_details.cached_tokens > rb.usage.prompt_tokens, "conversation B reused its cache");
  assert.equal(ra2.choices[0].message.content, generate(DEMO, a2).text);
  assert.equal(rb2.choices[0].message.content, generate(DEMO, b2).text);
});

test("local image files only inside --allow-local-files", async () => {
  const ok = await demo.client.chat.completions.create({
    model: "shapes-llava", temperature: 0,
    messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "shapes_0.png" } },
                                         { type: "text", text: "Where is the orange square?" }] }],
  });
  assert.equal(ok.choices[0].message.content, "It is on the right.");
  const e = await errorOf(demo.client.chat.completions.create({
    model: "shapes-llava",
    messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "../config.json" } }] }],
  }));
  assert.equal(e.status, 400);
  assert.match(e.error.message, /outside the folder/);
});

test("8 concurrent clients all get their own correct answers", async () => {
  const examples = JSON.parse(readFileSync(join(DEMO, "examples/expected.json"), "utf8")).examples;
  const picked = [0, 3, 5, 7, 10, 12, 15, 18].map((i) => examples[i]);
  const answers = await Promise.all(picked.map((ex, i) =>
    demo.client.chat.completions.create({
      model: "shapes-llava", temperature: 0, stream: i % 2 === 1,
      messages: [imageMessage(ex.image, ex.question)],
    }).then(async (r) => {
      if (i % 2 === 0) return r.choices[0].message.content;
      let t = "";
      for await (const c of r) if (c.choices.length && c.choices[0].delta.content) t += c.choices[0].delta.content;
      return t;
    })));
  picked.forEach((ex, i) => assert.equal(answers[i], ex.greedy_fp16_reference, ex.question));
});

test("errors come in OpenAI's shape with the right status", async () => {
  const post = (body, headers = {}) => fetch(`${demo.base}/v1/chat/completions`, {
    method: "POST", body, headers: { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json", ...headers },
  });
  const cases = [
    { name: "malformed JSON", body: '{"messages": [', status: 400 },
    { name: "wrong type: temperature", body: JSON.stringify({ messages: [{ role: "user", content: "hi" }], temperature: "hot" }), status: 400, param: "temperature" },
    { name: "wrong type: messages", body: JSON.stringify({ messages: "hi" }), status: 400, param: "messages" },
    { name: "wrong type: max_tokens", body: JSON.stringify({ messages: [{ role: "user", content: "hi" }], max_tokens: "5" }), status: 400, param: "max_tokens" },
    { name: "empty messages", body: JSON.stringify({ messages: [] }), status: 400, param: "messages" },
    { name: "unknown role", body: JSON.stringify({ messages: [{ role: "wizard", content: "hi" }] }), status: 400, param: "messages[0].role" },
    { name: "n > 1", body: JSON.stringify({ messages: [{ role: "user", content: "hi" }], n: 2 }), status: 400, param: "n" },
    { name: "chat_template_kwargs not an object", body: JSON.stringify({ messages: [{ role: "user", content: "hi" }], chat_template_kwargs: [1] }),
      status: 400, param: "chat_template_kwargs" },
    { name: "too many images", status: 400, code: "too_many_images",
      body: JSON.stringify({ messages: [{ role: "user", content: ["shapes_0.png", "shapes_1.png", "shapes_2.png"].map((n) => ({ type: "image_url", image_url: { url: png(n) } })) }] }) },
    { name: "image that does not decode", status: 400, code: "invalid_image",
      body: JSON.stringify({ messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "data:image/png;base64,aGVsbG8gd29ybGQ=" } }] }] }) },
    { name: "remote image URL", status: 400, code: "invalid_image_url",
      body: JSON.stringify({ messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "https://example.com/cat.png" } }] }] }) },
    { name: "prompt over the context", status: 400, code: "context_length_exceeded",
      body: JSON.stringify({ messages: [{ role: "user", content: "red circle ".repeat(700) }] }) },
    { name: "body over the size limit", status: 413, body: JSON.stringify({ messages: [{ role: "user", content: "x".repeat(3 << 20) }] }) },
    { name: "missing API key", status: 401, headers: { Authorization: "" }, body: JSON.stringify({ messages: [{ role: "user", content: "hi" }] }) },
    { name: "wrong API key", status: 401, headers: { Authorization: "Bearer nope" }, body: JSON.stringify({ messages: [{ role: "user", content: "hi" }] }) },
  ];
  for (const c of cases) {
    const r = await post(c.body, c.headers);
    assert.equal(r.status, c.status, c.name);
    const body = await r.json();
    assertOpenAIError(body, c.status, c.param);
    if (c.code) assert.equal(body.error.code, c.code, c.name);
  }
  // The official client sees the same errors.
  const e = await errorOf(demo.client.chat.completions.create({ model: "shapes-llava", messages: [] }));
  assert.equal(e.status, 400);
  const unauth = new OpenAI({ apiKey: "wrong", baseURL: `${demo.base}/v1`, maxRetries: 0 });
  assert.equal((await errorOf(unauth.models.list())).status, 401);
  // And the server is still well.
  assert.equal((await fetch(`${demo.base}/health`)).status, 200);
});

test("a client that disconnects mid-stream stops its generation and frees its place", async () => {
  const metric = async (name) => {
    const text = await (await fetch(`${demo.base}/metrics`)).text();
    const line = text.split("\n").find((l) => l.startsWith(name + " "));
    return Number(line.split(" ")[1]);
  };
  const cancelledBefore = await metric("vkvlm_cancelled_requests_total");
  const controller = new AbortController();
  // ignore_eos (an extension, as in vLLM) makes this a long generation.
  const stream = await demo.client.chat.completions.create(
    { model: "shapes-llava", messages: [{ role: "user", content: "red" }], temperature: 0, max_tokens: 900, stream: true,
      ignore_eos: true },
    { signal: controller.signal });
  let chunks = 0;
  try {
    for await (const chunk of stream) {
      if (++chunks === 5) controller.abort();
    }
  } catch {
    // the abort
  }
  let cancelled = cancelledBefore;
  for (let i = 0; i < 100 && cancelled === cancelledBefore; i++) {
    await new Promise((r) => setTimeout(r, 100));
    cancelled = await metric("vkvlm_cancelled_requests_total");
  }
  assert.equal(cancelled, cancelledBefore + 1, "the generation was cancelled");
  assert.equal(await metric("vkvlm_requests_in_flight"), 0);
  assert.ok((await metric("vkvlm_generated_tokens_total")) > 0);
  const r = await demo.client.chat.completions.create({
    model: "shapes-llava", temperature: 0, messages: [imageMessage("shapes_0.png", "How many shapes are there?")],
  });
  assert.equal(r.choices[0].message.content, "There is 1 shape.");
});

test("a fixture model answers as vkvlm generate does, with logprobs", async () => {
  const s = await startServer(FIXTURE, ["--ctx", "256", "--max-concurrency", "1"]);
  try {
    const cases = JSON.parse(readFileSync(join(FIXTURE, "cases.json"), "utf8")).cases;
    const textOnly = cases.find((c) => c.name === "text_only");
    const want = generate(FIXTURE, textOnly.messages, ["--max-tokens", "12", "--ctx", "256"]);
    const r = await s.client.chat.completions.create({
      model: "llava15-f16", messages: textOnly.messages, temperature: 0, max_tokens: 12, logprobs: true, top_logprobs: 3,
    });
    assert.equal(r.choices[0].message.content, want.text);
    assert.equal(r.usage.prompt_tokens, want.prompt_tokens.length);
    const lp = r.choices[0].logprobs.content;
    assert.equal(lp.length, r.usage.completion_tokens);
    for (const step of lp) {
      assert.ok(step.logprob <= 0);
      assert.equal(step.top_logprobs.length, 3);
      // Greedy: the chosen token is the most likely one.
      assert.ok(Math.abs(step.top_logprobs[0].logprob - step.logprob) < 1e-4);
    }
    // --max-concurrency 1: requests arriving while one is in flight are turned away with 429.
    const burst = await Promise.allSettled([0, 1, 2].map(() => s.client.chat.completions.create({
      model: "llava15-f16", messages: textOnly.messages, temperature: 0, max_tokens: 12 })));
    const ok = burst.filter((b) => b.status === "fulfilled");
    const busy = burst.filter((b) => b.status === "rejected");
    assert.ok(ok.length >= 1);
    assert.ok(busy.length >= 1, "a burst over the limit gets 429");
    for (const b of busy) {
      assert.equal(b.reason.status, 429);
      assert.equal(b.reason.error.code, "server_busy");
    }
    for (const b of ok) assert.equal(b.value.choices[0].message.content, want.text);
  } finally {
    await stopServer(s);
  }
});
