// `vkvlm serve` driven by the official OpenAI client: answers equal `vkvlm generate` (and the
// demo model's reference answers), streaming, images, multi-turn KV reuse, concurrency,
// every error case in OpenAI's shape, and a client that disconnects mid-stream.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { readFileSync, writeFileSync, mkdtempSync, mkdirSync, symlinkSync, copyFileSync, rmSync } from "node:fs";
import { createServer, connect } from "node:net";
import { deflateSync } from "node:zlib";
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
process.on("exit", () => rmSync(tmp, { recursive: true, force: true }));

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
        assert.equal((await r.json()).status, "ok");
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
  assert.match(e.error.message, /no such image file in the folder the server allows/);
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

test("--parallel 8: concurrent clients decode together and answer exactly as one at a time", async () => {
  const examples = JSON.parse(readFileSync(join(DEMO, "examples/expected.json"), "utf8")).examples;
  // Different prompt lengths: four images (one each, answers of different lengths) and four
  // text-only turns, one cut short by max_tokens.
  const picked = [2, 5, 10, 17, 1, 7, 12, 19].map((i) => examples[i]);
  const withImage = (i) => i < 4;
  const request = (ex, i) => ({
    model: "shapes-llava", temperature: 0, logprobs: true, top_logprobs: 2, max_tokens: i === 6 ? 3 : 64,
    messages: withImage(i) ? [imageMessage(ex.image, ex.question)] : [{ role: "user", content: `[${i}] ${ex.question}` }],
  });
  // Long answers (ignore_eos), so that the eight overlap whatever the order they arrive in.
  const long = (ex, i) => ({
    model: "shapes-llava", temperature: 0, logprobs: true, top_logprobs: 2, max_tokens: 24 + i, ignore_eos: true,
    messages: [{ role: "user", content: `(${i}) ${ex.question}` }],
  });
  const ask = async (client, body, stream) => {
    const r = await client.chat.completions.create({ ...body, stream });
    if (!stream) return { text: r.choices[0].message.content, logprobs: r.choices[0].logprobs.content, finish: r.choices[0].finish_reason };
    let text = "", finish = null;
    const logprobs = [];
    for await (const c of r) {
      if (!c.choices.length) continue;
      if (c.choices[0].delta.content) text += c.choices[0].delta.content;
      if (c.choices[0].logprobs) logprobs.push(...c.choices[0].logprobs.content);
      if (c.choices[0].finish_reason) finish = c.choices[0].finish_reason;
    }
    return { text, logprobs, finish };
  };
  const same = (got, want, what) => {
    assert.equal(got.text, want.text, what);
    assert.equal(got.finish, want.finish, what);
    assert.deepEqual(got.logprobs, want.logprobs, `${what}: every step's logprobs`);
  };
  // Every request gets a slot no conversation used (16 slots; no two prompts share an image or
  // more than their first tokens, so none continues another's slot): nothing is reused, and
  // batched and alone must agree bit for bit (a continued prefix is computed in other row blocks
  // and rounds differently).
  // One at a time, on a server that decodes one sequence at a time.
  const single = await startServer(DEMO, ["--ctx", "512", "--kv-slots", "16"]);
  const alone = [], aloneLong = [];
  try {
    for (let i = 0; i < picked.length; ++i) alone.push(await ask(single.client, request(picked[i], i), false));
    for (let i = 0; i < picked.length; ++i) aloneLong.push(await ask(single.client, long(picked[i], i), false));
  } finally {
    await stopServer(single);
  }
  assert.equal(alone[6].finish, "length");
  const s = await startServer(DEMO, ["--ctx", "512", "--parallel", "8", "--kv-slots", "16"]);
  try {
    const together = await Promise.all(picked.map((ex, i) => ask(s.client, request(ex, i), i % 2 === 1)));
    picked.forEach((ex, i) => {
      same(together[i], alone[i], ex.question);
      if (withImage(i)) assert.equal(together[i].text, ex.greedy_fp16_reference, ex.question);
    });
    const counters = async () => {
      const text = await (await fetch(`${s.base}/metrics`, { headers: { Authorization: `Bearer ${KEY}` } })).text();
      return [Number(text.match(/^vkvlm_decode_steps_total (\d+)$/m)[1]),
              Number(text.match(/^vkvlm_decode_step_sequences_total (\d+)$/m)[1])];
    };
    const [steps0, advanced0] = await counters();
    const togetherLong = await Promise.all(picked.map((ex, i) => ask(s.client, long(ex, i), i % 2 === 0)));
    picked.forEach((ex, i) => same(togetherLong[i], aloneLong[i], `(${i}) ${ex.question}`));
    // They were decoded together: the batched steps advanced several sequences each.
    const [steps1, advanced1] = await counters();
    const mean = (advanced1 - advanced0) / (steps1 - steps0);
    assert.ok(mean > 3, `mean batch ${mean} over ${steps1 - steps0} steps`);
  } finally {
    await stopServer(s);
  }
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
    const text = await (await fetch(`${demo.base}/metrics`, { headers: { Authorization: `Bearer ${KEY}` } })).text();
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

// ---- what a hostile client can try ------------------------------------------------------------

// One raw HTTP exchange over a socket: what was written, and the status line that came back.
function raw(port, chunks, { gapMs = 0, timeoutMs = 20000 } = {}) {
  return new Promise((resolve) => {
    const sock = connect(port, "127.0.0.1");
    let data = "";
    const done = (status) => { sock.destroy(); resolve({ status, data }); };
    sock.on("data", (d) => { data += d.toString("latin1"); });
    sock.on("error", () => done(Number((data.match(/^HTTP\/1\.1 (\d+)/) || [])[1]) || -1));
    sock.on("close", () => done(Number((data.match(/^HTTP\/1\.1 (\d+)/) || [])[1]) || -1));
    setTimeout(() => done(-2), timeoutMs);
    sock.on("connect", async () => {
      for (const c of chunks) {
        if (sock.destroyed) return;
        const ok = sock.write(c);
        if (!ok) await new Promise((r) => sock.once("drain", r));
        if (gapMs) await new Promise((r) => setTimeout(r, gapMs));
      }
    });
  });
}

// A PNG of w x h gray pixels, written here (stored, uncompressed deflate is enough).
function grayPng(w, h) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => { let c = 0xffffffff; for (const b of buf) c = crcTable[(c ^ b) & 255] ^ (c >>> 8); return (c ^ 0xffffffff) >>> 0; };
  const chunk = (type, data) => {
    const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type), data]);
    const c = Buffer.alloc(4); c.writeUInt32BE(crc(td));
    return Buffer.concat([len, td, c]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0); ihdr.writeUInt32BE(h, 4); ihdr[8] = 8; ihdr[9] = 0;
  const rows = Buffer.alloc((w + 1) * h, 128);
  for (let y = 0; y < h; y++) rows[y * (w + 1)] = 0;
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk("IHDR", ihdr),
                        chunk("IDAT", deflateSync(rows)), chunk("IEND", Buffer.alloc(0))]);
}

const peakRssKiB = (pid) => Number(readFileSync(`/proc/${pid}/status`, "utf8").match(/VmHWM:\s+(\d+)/)[1]);

test("hardening: bodies, paths, slow clients, leaving clients, narrow images, metrics", async () => {
  // A folder the server may read, with links that lead out of it.
  const allow = join(tmp, "allow");
  mkdirSync(join(allow, "sub"), { recursive: true });
  mkdirSync(join(tmp, "outside"), { recursive: true });
  copyFileSync(join(DEMO, "examples", "shapes_0.png"), join(allow, "inside.png"));
  copyFileSync(join(DEMO, "examples", "shapes_0.png"), join(tmp, "outside", "secret.png"));
  symlinkSync(join(tmp, "outside", "secret.png"), join(allow, "link_out.png"));
  symlinkSync(join(tmp, "outside"), join(allow, "link_dir"));
  const s = await startServer(DEMO, ["--ctx", "512", "--allow-local-files", allow, "--max-body-mb", "2", "--request-timeout", "3",
                                     "--max-concurrency", "4"]);
  const auth = { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json" };
  const ask = (url) => fetch(`${s.base}/v1/chat/completions`, { method: "POST", headers: auth, body: JSON.stringify({
    max_tokens: 4, messages: [{ role: "user", content: [{ type: "image_url", image_url: { url } }, { type: "text", text: "Hi" }] }] }) });
  try {
    // 1. Paths: links out of the folder are refused, with the same answer whether the outside
    // file exists or not, naming no path of the server's; other schemes and NUL bytes too.
    assert.equal((await ask("inside.png")).status, 200);
    const refused = [];
    for (const url of ["nonexistent/../link_out.png", `file://${allow}/nonexistent/../link_out.png`, "nonexistent/../link_dir/secret.png",
                       "link_out.png", "link_dir/secret.png", "../outside/secret.png", "../outside/absent.png", join(tmp, "outside", "secret.png")]) {
      const r = await ask(url);
      assert.equal(r.status, 400, url);
      const body = await r.json();
      refused.push(body.error.message);
      assert.ok(!body.error.message.includes(tmp), `the answer names a server path: ${body.error.message}`);
    }
    assert.equal(new Set(refused).size, 1, "every refusal reads the same");
    for (const url of ["ftp://127.0.0.1/x.png", "gopher://x/y.png", "inside.png\u0000.txt"]) {
      const r = await ask(url);
      assert.equal(r.status, 400, url);
      const body = await r.json();
      assert.ok(!body.error.message.includes(tmp), body.error.message);
    }
    // 2. A chunked body over the limit gets 413 while it arrives; the server does not swallow it.
    const rssBefore = peakRssKiB(s.proc.pid);
    const head = `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n`;
    const piece = "x".repeat(1 << 20);
    const chunks = [head];
    for (let i = 0; i < 150; i++) chunks.push(`${piece.length.toString(16)}\r\n${piece}\r\n`);
    const t0 = Date.now();
    const big = await raw(s.port, chunks);
    assert.equal(big.status, 413, big.data.slice(0, 200));
    assert.ok(Date.now() - t0 < 10000, "the refusal comes while the body is still arriving");
    assert.ok(peakRssKiB(s.proc.pid) - rssBefore < 64 * 1024, "the oversized body was not kept");
    // 3. A narrow image (1 x 20000) costs what its crop costs, not its 336 x 6.7M resize.
    const narrow = `data:image/png;base64,${grayPng(1, 20000).toString("base64")}`;
    const rss0 = peakRssKiB(s.proc.pid);
    const nr = await ask(narrow);
    assert.equal(nr.status, 200, await nr.text());
    assert.ok(peakRssKiB(s.proc.pid) - rss0 < 200 * 1024, "a narrow image's peak memory stays small");
    // 4. Slow clients: 40 connections that trickle their headers never lock /health out, and
    // each is closed once the request time limit passes.
    const slow = Array.from({ length: 40 }, () => raw(s.port, ["POST /v1/chat/completions HTTP/1.1\r\n",
      ...Array.from({ length: 30 }, (_, i) => `X-Slow-${i}: 1\r\n`)], { gapMs: 500, timeoutMs: 30000 }));
    await new Promise((r) => setTimeout(r, 500));
    for (let i = 0; i < 5; i++) {
      const t = Date.now();
      const h = await fetch(`${s.base}/health`);
      assert.equal(h.status, 200);
      assert.ok(Date.now() - t < 1000, "/health answers under the flood");
      await new Promise((r) => setTimeout(r, 300));
    }
    const slowEnds = await Promise.all(slow);
    for (const e of slowEnds) assert.equal(e.status, 408, "a request that does not arrive in time is closed with 408");
    // 5. Clients that leave while queued give their admission back at once: a burst whose
    // clients all leave early does not keep the next ones out.
    const leaving = Array.from({ length: 12 }, () => {
      const c = new AbortController();
      const p = fetch(`${s.base}/v1/chat/completions`, { method: "POST", headers: auth, signal: c.signal,
        body: JSON.stringify({ max_tokens: 400, ignore_eos: true, stream: true, messages: [{ role: "user", content: "red" }] }) })
        .catch(() => null);
      setTimeout(() => c.abort(), 150);
      return p;
    });
    await Promise.all(leaving);
    const metric = async (name) => {
      const text = await (await fetch(`${s.base}/metrics`, { headers: auth })).text();
      return Number(text.split("\n").find((l) => l.startsWith(name + " ")).split(" ")[1]);
    };
    let inFlight = await metric("vkvlm_requests_in_flight");
    for (let i = 0; i < 50 && inFlight > 0; i++) {
      await new Promise((r) => setTimeout(r, 100));
      inFlight = await metric("vkvlm_requests_in_flight");
    }
    assert.equal(inFlight, 0, "every leaving client's admission was freed");
    const after = await Promise.all([0, 1, 2].map(() => s.client.chat.completions.create({
      model: "shapes-llava", temperature: 0, max_tokens: 8, messages: [imageMessage("shapes_0.png", "How many shapes are there?")] })));
    for (const r of after) assert.equal(r.choices[0].message.content, "There is 1 shape.");
    // 6. /metrics needs the key (as /v1 does); the scheme is case-insensitive.
    assert.equal((await fetch(`${s.base}/metrics`)).status, 401);
    assert.equal((await fetch(`${s.base}/metrics`, { headers: { Authorization: `bearer ${KEY}` } })).status, 200);
    assert.equal((await fetch(`${s.base}/v1/models`, { headers: { Authorization: `BEARER ${KEY}` } })).status, 200);
    assert.equal((await fetch(`${s.base}/v1/models`, { headers: { Authorization: `Basic ${KEY}` } })).status, 401);
  } finally {
    await stopServer(s);
  }
});

test("--metrics-public opens /metrics alone", async () => {
  const s = await startServer(DEMO, ["--ctx", "256", "--metrics-public"]);
  try {
    assert.equal((await fetch(`${s.base}/metrics`)).status, 200);
    assert.equal((await fetch(`${s.base}/v1/models`)).status, 401);
  } finally {
    await stopServer(s);
  }
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

test("speculative decoding: --draft-model answers as without it, and reports drafts in usage and /metrics", async () => {
  // The demo model drafting for itself: every draft is accepted, and the answers are the plain ones.
  const s = await startServer(DEMO, ["--ctx", "512", "--draft-model", DEMO, "--num-draft-tokens", "4", "--kv-slots", "2"]);
  try {
    const messages = [imageMessage("shapes_1.png", "Describe this image.")];
    const want = generate(DEMO, messages);
    const r = await s.client.chat.completions.create({ model: "shapes-llava", messages, temperature: 0 });
    assert.equal(r.choices[0].message.content, want.text);
    assert.ok(r.usage.draft_tokens > 0);
    assert.equal(r.usage.accepted_tokens, r.usage.draft_tokens);
    // Streaming, a follow-up turn on both caches, and a per-request draft length.
    const follow = [...messages, { role: "assistant", content: want.text }, { role: "user", content: "How many shapes are there?" }];
    const stream = await s.client.chat.completions.create({
      model: "shapes-llava", messages: follow, temperature: 0, stream: true, stream_options: { include_usage: true },
      num_draft_tokens: 2,
    });
    let text = "";
    let usage;
    for await (const chunk of stream) {
      if (chunk.choices.length) text += chunk.choices[0].delta.content ?? "";
      if (chunk.usage) usage = chunk.usage;
    }
    assert.equal(text, generate(DEMO, follow).text);
    assert.ok(usage.prompt_tokens_details.cached_tokens > 0);
    assert.ok(usage.draft_tokens > 0);
    const metrics = await (await fetch(`${s.base}/metrics`, { headers: { Authorization: `Bearer ${KEY}` } })).text();
    const counter = (name) => Number(metrics.match(new RegExp(`^${name} (\\d+)$`, "m"))[1]);
    assert.equal(counter("vkvlm_draft_tokens_total"), r.usage.draft_tokens + usage.draft_tokens);
    assert.equal(counter("vkvlm_accepted_draft_tokens_total"), r.usage.accepted_tokens + usage.accepted_tokens);
    for (const [body, param] of [[{ num_draft_tokens: 0 }, "num_draft_tokens"], [{ lookup_ngram: 2 }, "lookup_ngram"]]) {
      const e = await errorOf(s.client.chat.completions.create({ model: "shapes-llava", messages, ...body }));
      assert.equal(e.status, 400);
      assertOpenAIError({ error: e.error }, 400, param);
    }
  } finally {
    await stopServer(s);
  }
  // Prompt lookup, asked for by the request: 'square' recurs, so it drafts.
  const messages = [imageMessage("shapes_0.png", "What color is the square?")];
  const r = await demo.client.chat.completions.create({ model: "shapes-llava", messages, temperature: 0, lookup_ngram: 1 });
  assert.equal(r.choices[0].message.content, "The square is orange.");
  assert.ok(r.usage.draft_tokens > 0);
  assert.ok(r.usage.accepted_tokens <= r.usage.draft_tokens);
});

test("--prompt-cache: every conversation that starts like the cached one continues it", async () => {
  const described = [imageMessage("shapes_1.png", "Describe this image."),
    { role: "assistant", content: "An orange circle at the top left and a black circle at the bottom." }];
  const file = join(tmp, "messages-described.json");
  writeFileSync(file, JSON.stringify([{ role: "user", content: [{ type: "image" }, { type: "text", text: "Describe this image." }] },
    described[1]]));
  const cacheFile = join(tmp, "described.cache");
  const out = execFileSync(CLI, ["cache-prompt", "--messages", file, "--image", join(DEMO, "examples", "shapes_1.png"),
    "--out", cacheFile], { encoding: "utf8" });
  const rows = Number(out.match(/^cached (\d+) prompt tokens/)[1]);
  assert.ok(rows > 0);
  const s = await startServer(DEMO, ["--ctx", "512", "--prompt-cache", cacheFile]);
  try {
    const ask = (messages) => s.client.chat.completions.create({ model: "shapes-llava", messages, temperature: 0 });
    const follow = [...described, { role: "user", content: "How many shapes are there?" }];
    const a = await ask(follow);
    assert.equal(a.choices[0].message.content, generate(DEMO, follow).text);
    assert.equal(a.usage.prompt_tokens_details.cached_tokens, rows, "the first request already starts from the cache");
    // Another conversation takes the only slot; the next one like the cache gets the cache back.
    const other = [imageMessage("shapes_0.png", "What color is the square?")];
    assert.equal((await ask(other)).choices[0].message.content, "The square is orange.");
    const b = await ask([...described, { role: "user", content: "Where is the black circle?" }]);
    assert.ok(b.usage.prompt_tokens_details.cached_tokens >= rows);
  } finally {
    await stopServer(s);
  }
  // A cache of another model stops the server at load with a message naming the file.
  const wrong = spawn(CLI, ["serve", "--model", FIXTURE, "--port", String(await freePort()), "--prompt-cache", cacheFile],
    { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  wrong.stderr.on("data", (d) => { err += d; });
  const code = await new Promise((resolve) => wrong.on("exit", resolve));
  assert.equal(code, 1);
  assert.match(err, /described\.cache.*another model/);
});

test("--kv-bits: quantized KV caches answer as the command line does, in the bytes /metrics reports", async () => {
  const s = await startServer(DEMO, ["--ctx", "256", "--kv-bits", "4", "--kv-group-size", "32", "--kv-slots", "2",
    "--metrics-public"]);
  try {
    const messages = [{ role: "user", content: "What color is the square?" }];
    const r = await s.client.chat.completions.create({ model: "shapes-llava", messages, temperature: 0, max_tokens: 16 });
    const want = generate(DEMO, messages, ["--ctx", "256", "--kv-bits", "4", "--kv-group-size", "32", "--max-tokens", "16"]);
    assert.equal(r.choices[0].message.content, want.text);
    assert.equal(want.kv_cache.format, "q4 group 32");
    const text = await (await fetch(`${s.base}/metrics`)).text();
    // Two slots of the demo model's cache: 4 layers, K and V, 256 rows of 128 values at 4 bits
    // plus an f16 scale and bias per 32.
    const values = 4 * 2 * 256 * 128;
    assert.match(text, new RegExp(`vkvlm_kv_cache_bytes\\{model="shapes-llava",format="q4 group 32"\\} ${2 * (values / 2 + (values / 32) * 4)}\n`));
  } finally {
    await stopServer(s);
  }
});

test("several models: routed by name, loaded on demand, one at a time with --max-loaded 1, PATCH /v1/config", async () => {
  const s = await startServer(`shapes=${DEMO}`, ["--model", `llava=${FIXTURE}`, "--max-loaded", "1", "--ctx", "256"]);
  const auth = { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json" };
  const models = async () => Object.fromEntries((await (await fetch(`${s.base}/v1/models`, { headers: auth })).json()).data
    .map((m) => [m.id, m.loaded]));
  try {
    assert.deepEqual(await models(), { shapes: true, llava: false }, "the active model loads at start, the other on demand");
    const health = await (await fetch(`${s.base}/health`)).json();
    assert.deepEqual(health.models, { shapes: "ready", llava: "unloaded" });
    const question = [{ role: "user", content: "Write a haiku about GPUs." }];
    const square = [imageMessage("shapes_0.png", "What color is the square?")];
    // Two streams at once, one per model: each answers as the command line does with its model.
    const stream = async (model, messages) => {
      let text = "";
      for await (const c of await s.client.chat.completions.create({ model, messages, temperature: 0, max_tokens: 12,
        stream: true })) {
        assert.equal(c.model, model);
        text += c.choices[0]?.delta?.content ?? "";
      }
      return text;
    };
    const [a, b] = await Promise.all([stream("llava", question), stream("shapes", square)]);
    assert.equal(a, generate(FIXTURE, question, ["--max-tokens", "12"]).text);
    assert.equal(b, "The square is orange.");
    const loaded = await models();
    assert.equal(Object.values(loaded).filter(Boolean).length, 1, "--max-loaded 1 keeps one loaded");
    // The llava model again (loaded anew if it was unloaded); "default" is the active one.
    const r = await s.client.chat.completions.create({ model: "llava", messages: question, temperature: 0, max_tokens: 12 });
    assert.equal(r.model, "llava");
    assert.equal(r.choices[0].message.content, a);
    assert.deepEqual(await models(), { shapes: false, llava: true });
    const d = await s.client.chat.completions.create({ model: "default", messages: square, temperature: 0 });
    assert.equal(d.model, "shapes");
    assert.equal(d.choices[0].message.content, "The square is orange.");
    // An unknown model: OpenAI's 404 model_not_found, naming the models there are.
    const e = await errorOf(s.client.chat.completions.create({ model: "gpt-4o", messages: square }));
    assert.equal(e.status, 404);
    assert.equal(e.code, "model_not_found");
    assert.match(e.message, /gpt-4o.*shapes, llava/);
    // GET / PATCH /v1/config: the active model answers requests that name none.
    assert.equal((await (await fetch(`${s.base}/v1/config`, { headers: auth })).json()).active_model, "shapes");
    const patched = await fetch(`${s.base}/v1/config`, { method: "PATCH", headers: auth,
      body: JSON.stringify({ active_model: "llava" }) });
    assert.equal(patched.status, 200);
    assert.equal((await patched.json()).active_model, "llava");
    const unnamed = await (await fetch(`${s.base}/v1/chat/completions`, { method: "POST", headers: auth,
      body: JSON.stringify({ messages: question, temperature: 0, max_tokens: 12 }) })).json();
    assert.equal(unnamed.model, "llava");
    assert.equal(unnamed.choices[0].message.content, a);
    const bad = await fetch(`${s.base}/v1/config`, { method: "PATCH", headers: auth, body: JSON.stringify({ active_model: "nope" }) });
    assert.equal(bad.status, 404);
    assert.equal((await bad.json()).error.code, "model_not_found");
    const other = await fetch(`${s.base}/v1/config`, { method: "PATCH", headers: auth, body: JSON.stringify({ max_loaded: 3 }) });
    assert.equal(other.status, 400);
  } finally {
    await stopServer(s);
  }
});

test("--config: models and their settings from a file; a model that cannot load is a 503, the others go on", async () => {
  const config = join(tmp, "models.json");
  const broken = join(tmp, "broken-model");
  mkdirSync(broken, { recursive: true });
  writeFileSync(join(broken, "config.json"), "{\"model_type\": \"llava\"");  // cut short
  writeFileSync(config, JSON.stringify({ models: [{ name: "small", model: DEMO, ctx: 200, kv_bits: 8 },
    { name: "fixture", model: FIXTURE, ctx: 256 }, { name: "broken", model: broken }], active_model: "small" }));
  const s = await startServer(DEMO, ["--config", config, "--ctx", "512"]);  // --model's joins the config's; --ctx is the default
  const auth = { Authorization: `Bearer ${KEY}` };
  try {
    const cfg = await (await fetch(`${s.base}/v1/config`, { headers: auth })).json();
    assert.equal(cfg.active_model, "small");
    assert.deepEqual(cfg.models.map((m) => [m.name, m.ctx, m.kv_cache]),
      [["shapes-llava", 512, "f16"], ["small", 200, "q8 group 64"], ["fixture", 256, "f16"], ["broken", 512, "f16"]]);
    const square = [imageMessage("shapes_0.png", "What color is the square?")];
    const e = await errorOf(s.client.chat.completions.create({ model: "broken", messages: square }));
    assert.equal(e.status, 503);
    assert.equal(e.code, "model_unavailable");
    assert.match(e.message, /model broken could not be loaded: .*config\.json/);
    assert.equal((await (await fetch(`${s.base}/health`)).json()).models.broken, "failed");
    const r = await s.client.chat.completions.create({ model: "small", messages: square, temperature: 0 });
    assert.equal(r.choices[0].message.content, "The square is orange.");
  } finally {
    await stopServer(s);
  }
  writeFileSync(config, JSON.stringify({ models: [{ name: "small", model: DEMO, context: 128 }] }));
  const wrong = spawn(CLI, ["serve", "--config", config, "--port", String(await freePort())], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  wrong.stderr.on("data", (d) => { err += d; });
  assert.equal(await new Promise((resolve) => wrong.on("exit", resolve)), 1);
  assert.match(err, /models\.json.*models\[0\].*unknown key 'context'/);
});

test("--max-kv-size: answers run past the rotating cache", async () => {
  const s = await startServer(DEMO, ["--max-kv-size", "24"]);
  try {
    const messages = [{ role: "user", content: "What color is the square?" }];
    const r = await s.client.chat.completions.create({ model: "shapes-llava", messages, temperature: 0, max_tokens: 40,
      ignore_eos: true });
    assert.equal(r.usage.completion_tokens, 40);
    assert.ok(r.usage.prompt_tokens + r.usage.completion_tokens > 24);
    assert.equal(r.choices[0].finish_reason, "length");
    const want = generate(DEMO, messages, ["--max-kv-size", "24", "--max-tokens", "40", "--ignore-eos"]);
    assert.equal(r.choices[0].message.content, want.text);
  } finally {
    await stopServer(s);
  }
});
