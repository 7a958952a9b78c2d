// Greedy generation with an edge-mla ONNX export on onnxruntime-web (WebAssembly), the same loop as edge-mla's own
// runner (runtimes/onnxruntime.py): prefill the prompt, then one token at a time, the cache fed back as the next past.
import * as ort from "./vendor/onnxruntime-web/ort.wasm.min.mjs";
import { Tokenizer } from "./vendor/tokenizers/tokenizers.min.mjs";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const cacheArray = { float32: Float32Array, float16: Uint16Array, int8: Int8Array, uint8: Uint8Array };

async function json(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function load() {
  const site = await json("site.json");
  const meta = await json("model/edge_mla_onnx.json");
  const tokenizer = new Tokenizer(await json("model/tokenizer.json"), await json("model/tokenizer_config.json"));
  ort.env.wasm.wasmPaths = new URL("vendor/onnxruntime-web/", location.href).href;
  // threads need a cross-origin isolated page (COOP/COEP headers, as `edge-mla web --serve` sends)
  const threads = Number(params.get("threads")) || Math.min(4, navigator.hardwareConcurrency || 1);
  ort.env.wasm.numThreads = self.crossOriginIsolated ? threads : 1;
  const session = await ort.InferenceSession.create("model/" + meta.model, {
    executionProviders: ["wasm"],
    externalData: site.external_data.map((f) => ({ path: f, data: "model/" + f })),
  });
  $("model").textContent = `${site.title} · ${site.runs} · weights: ${site.weights} · ` +
    `onnxruntime-web ${ort.env.versions.web} (WebAssembly, ${ort.env.wasm.numThreads} thread(s))`;
  return { site, meta, tokenizer, session };
}

function emptyCache(meta) {
  const past = {};
  for (const t of meta.cache.tensors) {
    past[t.past] = new ort.Tensor(t.dtype, new cacheArray[t.dtype](0), [1, t.heads, 0, t.width]);
  }
  return past;
}

function argmax(values, offset, size) {
  let best = 0;
  for (let i = 1; i < size; i++) if (values[offset + i] > values[offset + best]) best = i;
  return best;
}

async function generate({ meta, tokenizer, session }, promptIds, maxNew, onToken) {
  const vocab = meta.vocab_size, eos = new Set(meta.eos_token_ids);
  const presents = meta.cache.tensors.map((t) => t.present[0]);  // present_alias: the same rows, not fetched
  let past = emptyCache(meta), length = 0;
  async function forward(ids) {
    length += ids.length;
    const feeds = {
      input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, ids.length]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(length).fill(1n), [1, length]),
      logits_to_keep: new ort.Tensor("int64", BigInt64Array.of(1n), []),
      ...past,
    };
    const result = await session.run(feeds, ["logits", ...presents]);
    const next = {};
    meta.cache.tensors.forEach((t) => { next[t.past] = result[t.present[0]]; });
    past = next;
    return result.logits.data;
  }
  const t0 = performance.now();
  let logits = await forward(promptIds);
  const prefillMs = performance.now() - t0;
  const out = [];
  const t1 = performance.now();
  for (let step = 0; step < maxNew; step++) {
    const token = argmax(logits, 0, vocab);
    if (eos.has(token)) break;
    out.push(token);
    onToken(out);
    if (step + 1 < maxNew) logits = await forward([token]);
  }
  const decodeMs = performance.now() - t1;
  return { tokens: out, prefillMs, decodeMs, decodeSteps: Math.max(out.length - 1, 0), length };
}

function encode(tokenizer, meta, text, chat) {
  if (!chat) return tokenizer.encode(text).ids;
  if (!meta.chat) throw new Error("this model has no chat template; run without chat");
  return tokenizer.encode(meta.chat.prefix + text + meta.chat.suffix, { add_special_tokens: false }).ids;
}

async function run(model, text, maxNew, chat) {
  const output = $("output");
  output.dataset.state = "running";
  $("run").disabled = true;
  const promptIds = encode(model.tokenizer, model.meta, text, chat);
  output.dataset.promptIds = JSON.stringify(promptIds);
  const decode = (ids) => model.tokenizer.decode(ids, { skip_special_tokens: true });
  const result = await generate(model, promptIds, maxNew, (ids) => { output.textContent = decode(ids); });
  const speed = result.decodeSteps && result.decodeMs > 0 ? result.decodeSteps / (result.decodeMs / 1000) : 0;
  output.textContent = decode(result.tokens);
  output.dataset.ids = JSON.stringify(result.tokens);
  $("tokens-per-second").textContent = speed.toFixed(1);
  $("prefill").textContent = `${promptIds.length} tokens in ${result.prefillMs.toFixed(0)} ms`;
  const bytes = result.length * model.meta.cache.bytes_per_token;
  $("cache-bytes").textContent = `${(bytes / 1024).toFixed(1)} KiB (${result.length} tokens × ` +
    `${model.meta.cache.bytes_per_token} B, ${model.meta.cache.dtype})`;
  $("status").textContent = `done: ${result.tokens.length} tokens`;
  output.dataset.state = "done";
  $("run").disabled = false;
  return { prompt_ids: promptIds, tokens: result.tokens, text: output.textContent, tokens_per_second: speed,
           prefill_ms: result.prefillMs, decode_ms: result.decodeMs, decode_steps: result.decodeSteps,
           threads: ort.env.wasm.numThreads, cache_bytes: bytes };
}

async function main() {
  let model;
  try {
    model = await load();
  } catch (err) {
    $("status").textContent = "error: " + err.message;
    $("output").dataset.state = "error";
    throw err;
  }
  $("status").textContent = "ready";
  $("output").dataset.state = "ready";
  $("run").disabled = false;
  $("prompt").value = params.get("prompt") ?? "The capital of France is";
  $("tokens").value = params.get("tokens") ?? 64;
  $("chat").checked = params.get("chat") === "1";
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(model, $("prompt").value, Number($("tokens").value), $("chat").checked);
  });
  let report = null;
  if (params.has("prompt")) {
    try {
      report = await run(model, $("prompt").value, Number($("tokens").value), $("chat").checked);
    } catch (err) {
      $("status").textContent = "error: " + err.message;
      $("output").dataset.state = "error";
      report = { error: String(err) };
    }
  }
  // after the first run, so that storing the files for offline use does not compete with it
  if ("serviceWorker" in navigator && params.get("offline") !== "0") {
    await navigator.serviceWorker.register("sw.js");
    await navigator.serviceWorker.ready;  // installed: every file is stored
    if (report) report.offline_ready = true;
  }
  // `?report=PATH`: POST the result to the page's own server (how tests and benchmarks read it)
  if (report && params.has("report")) {
    await fetch(params.get("report"), { method: "POST", body: JSON.stringify(report) });
  }
}

main();
