#!/usr/bin/env node
// Server benchmark: starts `vkvlm serve` (or uses --url), then for 1, 2, 4 and 8 concurrent
// streaming clients (--clients) sends each the same kind of request at once and reports, per
// round: aggregate decode tokens/s (all tokens after each stream's first / the round's decode
// span), per-stream decode tokens/s (mean), and time to first token (mean and worst).
// Needs only node (fetch and server-sent events by hand): bench/serve-bench.mjs --help
import { spawn } from "node:child_process";
import { readFileSync, existsSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const usage = `usage: bench/serve-bench.mjs [--cli PATH] [--model DIR|REPO] [--url http://HOST:PORT]
       [--clients 1,2,4,8] [--parallel 8] [--max-tokens 64] [--ctx 1024] [--image PATH] [--prompt TEXT]
       [--text-only] [--rounds 1] [--json] [-- extra serve flags...]
Starts vkvlm serve --parallel N (unless --url names a running server) and drives it with
concurrent streaming clients; answers run to --max-tokens (ignore_eos) so every round decodes
the same number of tokens.`;

function parseArgs(argv) {
  const o = {
    cli: resolve(here, "../build/vkvlm"), model: resolve(here, "../models/shapes-llava"), url: "",
    clients: [1, 2, 4, 8], parallel: 8, maxTokens: 64, ctx: 1024, image: "", prompt: "Describe this image in detail.",
    rounds: 1, json: false, textOnly: false, extra: [],
  };
  for (let i = 0; i < argv.length; ++i) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    const whole = (lo, hi) => {
      const v = value();
      const n = Number(v);
      if (!Number.isInteger(n) || n < lo || n > hi) throw new Error(`${a} takes a whole number from ${lo} to ${hi}, not '${v}'`);
      return n;
    };
    if (a === "--help" || a === "-h") { console.log(usage); process.exit(0); }
    else if (a === "--cli") o.cli = value();
    else if (a === "--model") o.model = value();
    else if (a === "--url") o.url = value().replace(/\/$/, "");
    else if (a === "--clients") {
      const v = value();
      o.clients = v.split(",").map(Number);
      if (!o.clients.length || o.clients.some((n) => !Number.isInteger(n) || n < 1 || n > 256))
        throw new Error(`--clients takes counts from 1 to 256 separated by commas, not '${v}'`);
    } else if (a === "--parallel") o.parallel = whole(1, 64);
    else if (a === "--max-tokens") o.maxTokens = whole(2, 1 << 20);
    else if (a === "--ctx") o.ctx = whole(16, 1 << 24);
    else if (a === "--rounds") o.rounds = whole(1, 100);
    else if (a === "--image") o.image = value();
    else if (a === "--prompt") o.prompt = value();
    else if (a === "--json") o.json = true;
    else if (a === "--text-only") o.textOnly = true;
    else if (a === "--") { o.extra = argv.slice(i + 1); break; }
    else throw new Error(`unknown option ${a}\n${usage}`);
  }
  if (o.textOnly && o.image) throw new Error("give --image or --text-only, not both");
  if (!o.image && !o.textOnly) {
    const demo = resolve(here, "../models/shapes-llava/examples/shapes_1.png");
    if (o.model === resolve(here, "../models/shapes-llava")) o.image = demo;
  }
  if (o.image && !existsSync(o.image)) throw new Error(`--image ${o.image} does not exist`);
  return o;
}

function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

async function startServer(o) {
  if (!existsSync(o.cli)) throw new Error(`no vkvlm at ${o.cli} (build it, or give --cli)`);
  const port = await freePort();
  const args = ["serve", "--model", o.model, "--port", String(port), "--parallel", String(o.parallel), "--ctx", String(o.ctx),
                "--max-concurrency", String(Math.max(16, 2 * Math.max(...o.clients))), ...o.extra];
  const proc = spawn(o.cli, args, { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  proc.stderr.on("data", (d) => { log += d; });
  const base = `http://127.0.0.1:${port}`;
  const t0 = Date.now();
  while (true) {
    if (proc.exitCode !== null) throw new Error(`vkvlm serve exited: ${log.trim()}`);
    try {
      const r = await fetch(`${base}/health`);
      if (r.status === 200) break;
    } catch {}
    if (Date.now() - t0 > 600000) throw new Error("vkvlm serve did not become ready in 10 minutes");
    await new Promise((ok) => setTimeout(ok, 200));
  }
  return { proc, base, log: () => log };
}

function body(o, i) {
  const content = [];
  if (o.image) {
    const data = readFileSync(o.image).toString("base64");
    const type = o.image.toLowerCase().endsWith(".jpg") || o.image.toLowerCase().endsWith(".jpeg") ? "jpeg" : "png";
    content.push({ type: "image_url", image_url: { url: `data:image/${type};base64,${data}` } });
  }
  // Each client's question differs a little, so no two share a cached prompt.
  content.push({ type: "text", text: `${o.prompt} (${i})` });
  return {
    model: "default", stream: true, temperature: 0, max_tokens: o.maxTokens, ignore_eos: true,
    stream_options: { include_usage: true }, messages: [{ role: "user", content }],
  };
}

// One streaming request: when it was sent, its first and last content, its token count.
async function stream(base, payload) {
  const sent = performance.now();
  const r = await fetch(`${base}/v1/chat/completions`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload),
  });
  if (r.status !== 200) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
  let first = 0, last = 0, tokens = 0, buffer = "";
  const decoder = new TextDecoder();
  for await (const chunk of r.body) {
    buffer += decoder.decode(chunk, { stream: true });
    let at;
    while ((at = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const j = JSON.parse(event.slice(6));
      if (j.error) throw new Error(j.error.message);
      if (j.usage) tokens = j.usage.completion_tokens;
      if (j.choices?.length && j.choices[0].delta?.content) {
        const now = performance.now();
        if (!first) first = now;
        last = now;
      }
    }
  }
  return { sent, first, last, tokens };
}

async function round(base, o, n, tag) {
  const t0 = performance.now();
  const runs = await Promise.all(Array.from({ length: n }, (_, i) => stream(base, body(o, `${tag}-${i}`))));
  const t1 = performance.now();
  const decodeStart = Math.min(...runs.map((r) => r.first)), decodeEnd = Math.max(...runs.map((r) => r.last));
  const afterFirst = runs.reduce((s, r) => s + Math.max(0, r.tokens - 1), 0);
  const perStream = runs.map((r) => (r.last > r.first ? (r.tokens - 1) / ((r.last - r.first) / 1000) : 0));
  const ttft = runs.map((r) => (r.first - r.sent) / 1000);
  return {
    clients: n,
    tokens: runs.reduce((s, r) => s + r.tokens, 0),
    wall_seconds: (t1 - t0) / 1000,
    aggregate_decode_tps: afterFirst / ((decodeEnd - decodeStart) / 1000),
    aggregate_tps: runs.reduce((s, r) => s + r.tokens, 0) / ((t1 - t0) / 1000),
    per_stream_decode_tps: perStream.reduce((a, b) => a + b, 0) / n,
    ttft_mean_seconds: ttft.reduce((a, b) => a + b, 0) / n,
    ttft_max_seconds: Math.max(...ttft),
  };
}

async function main() {
  let o;
  try {
    o = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`serve-bench: ${e.message}`);
    process.exit(2);
  }
  let server = null;
  try {
    if (!o.url) server = await startServer(o);
    const base = o.url || server.base;
    const device = server ? (server.log().match(/ready on (.*)/) || [])[1] || "" : "";
    await stream(base, { ...body(o, "warm-up"), max_tokens: 4 });  // compiles pipelines, fills caches
    const results = [];
    for (const n of o.clients) {
      let best = null;
      for (let k = 0; k < o.rounds; ++k) {
        const r = await round(base, o, n, `${n}-${k}`);
        if (!best || r.aggregate_decode_tps > best.aggregate_decode_tps) best = r;
      }
      results.push(best);
    }
    const single = results.find((r) => r.clients === 1);
    for (const r of results) r.speedup_vs_one = single ? r.aggregate_decode_tps / single.aggregate_decode_tps : null;
    if (o.json) {
      console.log(JSON.stringify({ model: o.model, device, parallel: o.parallel, max_tokens: o.maxTokens, image: o.image, results }));
    } else {
      console.log(`vkvlm serve --parallel ${o.parallel}: ${o.model}${device ? ` on ${device}` : ""}, ${o.maxTokens} tokens per answer${o.image ? ", one image each" : ""}`);
      console.log("clients | aggregate decode tok/s | x one client | per-stream decode tok/s | TTFT mean s | TTFT max s");
      for (const r of results)
        console.log(`${String(r.clients).padStart(7)} | ${r.aggregate_decode_tps.toFixed(1).padStart(22)} | ` +
                    `${(r.speedup_vs_one ?? 0).toFixed(2).padStart(12)} | ${r.per_stream_decode_tps.toFixed(1).padStart(23)} | ` +
                    `${r.ttft_mean_seconds.toFixed(2).padStart(11)} | ${r.ttft_max_seconds.toFixed(2).padStart(10)}`);
    }
  } catch (e) {
    console.error(`serve-bench: ${e.message}`);
    process.exitCode = 1;
  } finally {
    if (server) server.proc.kill("SIGTERM");
  }
}

await main();
