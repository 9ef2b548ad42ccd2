#!/usr/bin/env node
// Generate text from a tandemc CPU artifact with onnxruntime-node alone: no Python, no tandemc.
//
//   node generate.mjs ARTIFACT --prompt "def main():" [-n 64] [-t 0] [--top-k 0] [--top-p 1] [--seed 0] [--json]
//   node generate.mjs ARTIFACT --ids 1,2,3 ...        (token ids, BOS first: any tokenizer)
//
// Everything comes from ARTIFACT/manifest.json (docs/artifact.md): the files and their sha256, which graph to call
// for a prompt's length, input order and dtypes, the state wiring, the tokenizer's special ids, and the
// counter-based uniform stream every tandemc runtime shares, so sampled tokens equal `tandemc run`'s for a seed.
// Text prompts need the byte-level tokenizer; a Hugging Face tokenizer.json needs a tokenizer library, so pass ids.

import { createHash } from "node:crypto";
import { readFileSync, readdirSync, statSync, createReadStream } from "node:fs";
import { join, resolve, sep } from "node:path";
import ort from "onnxruntime-node";

const FORMAT = "tandemc-artifact";
const SCHEMA_VERSION = 1;
const MASK64 = (1n << 64n) - 1n;

function fail(message) {
  console.error(`error: ${message}`);
  process.exit(2);
}

// --- the uniform stream (docs/decoding.md): u[r, w] = top 24 bits of sm(sm(sm(sm(seed) ^ call) ^ r) ^ w) / 2^24 ---
function splitmix64(x) {
  x = (x + 0x9e3779b97f4a7c15n) & MASK64;
  x = ((x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  x = ((x ^ (x >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return x ^ (x >> 31n);
}

function uniforms(seed, call, rows, width) {
  const out = new Float32Array(rows * width);
  const base = splitmix64(splitmix64(BigInt.asUintN(64, BigInt(seed))) ^ BigInt(call));  // seeds as 64-bit two's complement
  for (let r = 0; r < rows; r++) {
    const row = splitmix64(base ^ BigInt(r));
    for (let w = 0; w < width; w++) out[r * width + w] = Number(splitmix64(row ^ BigInt(w)) >> 40n) / 2 ** 24;
  }
  return out;
}

// --- the artifact ------------------------------------------------------------------------------------------------
async function sha256(file) {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(file)) hash.update(chunk);
  return hash.digest("hex");
}

function listFiles(dir, prefix = "") {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    if (name.startsWith(".")) return [];
    return statSync(path).isDirectory() ? listFiles(path, `${prefix}${name}/`) : [`${prefix}${name}`];
  });
}

async function readArtifact(dir) {
  let manifest;
  try {
    manifest = JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8"));
  } catch (e) {
    fail(`${dir}/manifest.json is missing or not JSON: is it a tandemc artifact directory?`);
  }
  if (manifest.format !== FORMAT || manifest.schema_version !== SCHEMA_VERSION)
    fail(`${dir} is not a ${FORMAT} of schema version ${SCHEMA_VERSION}`);
  if (manifest.target !== "cpu") fail(`${dir} is a ${manifest.target} artifact; this consumer runs cpu artifacts`);
  const root = resolve(dir);
  const listed = manifest.files || {};
  for (const name of listFiles(dir).filter((n) => n !== "manifest.json"))
    if (!(name in listed)) fail(`${join(dir, name)} is not listed in the manifest; remove it or re-export`);
  for (const [name, digest] of Object.entries(listed)) {
    const path = resolve(root, name);
    if (!path.startsWith(root + sep)) fail(`the manifest lists ${name}, outside the artifact`);
    if ((await sha256(path)) !== digest) fail(`${path} does not match its sha256 in the manifest; re-export`);
  }
  return manifest;
}

const ARRAYS = { float32: Float32Array, int32: Int32Array, int64: BigInt64Array, bool: Uint8Array };

function tensor(spec, values) {
  const size = spec.shape.reduce((a, b) => a * b, 1);
  const data = values instanceof ARRAYS[spec.dtype] ? values : ARRAYS[spec.dtype].from(values ?? new Array(size).fill(0));
  if (data.length !== size) throw new Error(`${spec.name}: ${data.length} values for shape ${spec.shape}`);
  return new ort.Tensor(spec.dtype, data, spec.shape);
}

class Graph {
  static async open(dir, entry, sessionConfig, threads) {
    // Session config entries the graphs need (manifest onnx_session_config), e.g.
    // session.qdq_matmulnbits_accuracy_level; `extra` takes them as nested keys.
    const extra = {};
    for (const [key, value] of Object.entries(sessionConfig)) {
      const parts = key.split(".");
      let node = extra;
      for (const part of parts.slice(0, -1)) node = node[part] ??= {};
      node[parts.at(-1)] = value;
    }
    const session = await ort.InferenceSession.create(join(dir, entry.onnx), {
      executionProviders: ["cpu"], intraOpNumThreads: threads, interOpNumThreads: 1, logSeverityLevel: 3, extra,
    });
    return new Graph(session, entry);
  }

  constructor(session, entry) {
    this.session = session;
    this.entry = entry;
    this.specs = Object.fromEntries(entry.inputs.map((s) => [s.name, s]));
  }

  // One call with the current state: returns [next state, the other outputs], wired by the manifest.
  async call(state, inputs) {
    const feeds = {};
    for (const spec of this.entry.inputs)
      feeds[spec.name] = state[spec.name] ?? tensor(spec, inputs[spec.name]);
    const results = await this.session.run(feeds);
    const next = {};
    for (const [output, input] of Object.entries(this.entry.state)) next[input] = results[output];
    return [next, results];
  }
}

// --- the decode loop (docs/artifact.md, "Driving the loop") --------------------------------------------------------
// `manifest` as readArtifact returns it (checked); `ids` the prompt's token ids, BOS first.
export async function generate(dir, manifest, ids, { maxNewTokens = 64, temperature = 0, topK = 0, topP = 1, seed = 0,
  threads = 0 } = {}) {
  const { decode, tokenizer } = manifest;
  const bucket = decode.cache_buckets.find((s) => ids.length + maxNewTokens <= s);  // BOS counts
  if (bucket === undefined)
    fail(`prompt of ${ids.length} tokens + ${maxNewTokens} new tokens exceeds the largest cache length ` +
         `${decode.cache_buckets.at(-1)}`);
  const config = manifest.onnx_session_config ?? {};
  const prefill = await Graph.open(dir, manifest.graphs[`prefill.s${bucket}`], config, threads);
  const step = await Graph.open(dir, manifest.graphs[`step.s${bucket}`], config, threads);
  const { batch, prefill_chunk: chunk, block_length: gamma } = decode;
  const stateInputs = new Set(Object.values(prefill.entry.state));
  let state = Object.fromEntries(prefill.entry.inputs.filter((s) => stateInputs.has(s.name))
    .map((s) => [s.name, tensor(s)]));
  const controls = { temperature: [temperature], top_k: [topK], top_p: [topP], eos_id: [tokenizer.eos_id] };

  const padded = Math.ceil(ids.length / chunk) * chunk;  // row 0 is the prompt; unused rows get limit 0
  const lengths = Array.from({ length: batch }, (_, r) => (r === 0 ? ids.length : 1));
  const limit = Array.from({ length: batch }, (_, r) => (r === 0 ? maxNewTokens : 0));
  for (let start = 0; start < padded; start += chunk) {
    const tokens = new Int32Array(batch * chunk);
    for (let c = 0; c < chunk && start + c < ids.length; c++) tokens[c] = ids[start + c];
    [state] = await prefill.call(state, { tokens, start: new Array(batch).fill(start), lengths, limit,
      u: uniforms(seed, 0, batch, 1), ...controls });
  }
  const out = [Number(state["state.token"].data[0])];
  const stats = { steps: 0, accepted: 0, drafted: 0 };
  for (let call = 1; !state["state.done"].data.every(Boolean); call++) {
    const wasDone = Boolean(state["state.done"].data[0]);
    let results;
    [state, results] = await step.call(state, { u: uniforms(seed, call, batch, 2 * gamma + 1), ...controls });
    stats.steps += 1;
    if (!wasDone) {
      out.push(...Array.from(results.emitted.data.slice(0, results.n_emitted.data[0]), Number));
      stats.accepted += Number(results.accepted.data[0]);
      stats.drafted += Number(results.drafted.data[0]);
    }
  }
  let tokens = out.slice(0, maxNewTokens);
  const eos = tokens.indexOf(tokenizer.eos_id);
  if (eos >= 0) tokens = tokens.slice(0, eos + 1);  // cut after the first EOS, inclusive
  return { tokens, text: tokenizer.type === "byte" ? decodeBytes(tokens) : null, stats };
}

// Byte tokenizer: id b < 256 is byte b, special ids are dropped, invalid UTF-8 becomes U+FFFD.
function decodeBytes(tokens) {
  return new TextDecoder("utf-8").decode(Uint8Array.from(tokens.filter((t) => t >= 0 && t < 256)));
}

function parseArgs(argv) {
  const args = { maxNewTokens: 64, temperature: 0, topK: 0, topP: 1, seed: 0, threads: 0, json: false };
  const number = (flag, value, integer) => {
    const x = Number(value);
    if (value === undefined || !Number.isFinite(x) || (integer && !Number.isInteger(x))) fail(`${flag} needs a number`);
    return x;
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    switch (flag) {
      case "--prompt": args.prompt = argv[++i]; break;
      case "--ids": args.ids = (argv[++i] ?? "").split(",").map((x) => number("--ids", x, true)); break;
      case "-n": case "--max-new-tokens": args.maxNewTokens = number(flag, argv[++i], true); break;
      case "-t": case "--temperature": args.temperature = number(flag, argv[++i]); break;
      case "--top-k": args.topK = number(flag, argv[++i], true); break;
      case "--top-p": args.topP = number(flag, argv[++i]); break;
      case "--seed": args.seed = number(flag, argv[++i], true); break;
      case "--threads": args.threads = number(flag, argv[++i], true); break;
      case "--json": args.json = true; break;
      default:
        if (flag.startsWith("-") || args.artifact !== undefined) fail(`unknown argument ${flag}`);
        args.artifact = flag;
    }
  }
  if (args.artifact === undefined || (args.prompt === undefined) === (args.ids === undefined))
    fail("usage: node generate.mjs ARTIFACT (--prompt TEXT | --ids 1,2,3) [-n N] [-t T] [--top-k K] [--top-p P] " +
         "[--seed S] [--json]");
  if (args.maxNewTokens < 1) fail("--max-new-tokens must be at least 1");
  if (args.temperature < 0 || args.topK < 0 || !(args.topP > 0 && args.topP <= 1))
    fail("sampling needs temperature >= 0, top-k >= 0 and 0 < top-p <= 1");
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const manifest = await readArtifact(args.artifact);
  let ids = args.ids;
  if (ids === undefined) {
    if (manifest.tokenizer.type !== "byte") fail("text prompts need the byte-level tokenizer; pass token ids with --ids");
    ids = [manifest.tokenizer.bos_id, ...new TextEncoder().encode(args.prompt)];
  }
  const result = await generate(args.artifact, manifest, ids, args);
  console.log(args.json ? JSON.stringify(result) : result.text ?? result.tokens.join(" "));
}

if (process.argv[1] && resolve(process.argv[1]) === resolve(new URL(import.meta.url).pathname)) await main();
