// mcpopt code mode, `wasm` backend: CPython (Pyodide) in WebAssembly on Deno.
//
// Started by mcpopt with Deno permissions that allow reading Pyodide's own folder and nothing
// else (no network, environment, subprocesses, FFI, system info or writes):
//   deno run --no-prompt --allow-read=<pyodide dir> pyodide_runner.js <pyodide dir>
//
// Protocol: JSON lines. stdin carries mcpopt's messages, stdout this runner's; stderr is free
// text for diagnostics.
//   <- {"op":"init","bootstrap":"<python source>"}   once, first; the bootstrap defines
//                                                      `_mcpopt_run(prelude, code, max_output, call)`
//   -> {"op":"ready","ms":<load time in ms>}
//   <- {"op":"run","id":N,"prelude":"...","code":"...","max_output":<bytes>,"keep":<bool>,"skills":<bool>}
//        keep: run in the interpreter's one session namespace (a code session), not a fresh one;
//        skills: define `save_skill` (requests come back in the result's "skills")
//   -> {"op":"call","run":N,"id":K,"name":"<gateway tool name>","arguments":{...}}   (0..n times)
//   <- {"op":"reply","id":K,"ok":true,"value":<any>} | {"op":"reply","id":K,"ok":false,"error":"..."}
//   -> {"op":"done","id":N,"result":"<JSON text made by the bootstrap>"}
// The runner exits when stdin closes. One run at a time.

const pyodideDir = Deno.args[0];
const encoder = new TextEncoder();

function send(message) {
  const data = encoder.encode(JSON.stringify(message) + "\n");
  let written = 0;
  while (written < data.length) written += Deno.stdout.writeSync(data.subarray(written));
}

async function* lines(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 1);
      if (line.trim()) yield line;
    }
  }
}

const input = lines(Deno.stdin.readable);
const pending = new Map();
let nextCall = 0;
let runQueue = Promise.resolve();

async function readLoop(onRun) {
  for await (const line of input) {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch {
      continue;
    }
    if (msg.op === "reply") {
      const waiter = pending.get(msg.id);
      if (waiter) {
        pending.delete(msg.id);
        waiter(msg);
      }
    } else if (msg.op === "run") {
      runQueue = runQueue.then(() => onRun(msg));
    }
  }
  Deno.exit(0);
}

const first = await input.next();
if (first.done) Deno.exit(0);
const init = JSON.parse(first.value);
const t0 = performance.now();
const { loadPyodide } = await import(`file://${pyodideDir}/pyodide.mjs`);
const pyodide = await loadPyodide({
  indexURL: pyodideDir + "/",
  stdout: () => {},
  stderr: () => {},
  env: { HOME: "/home/pyodide" },
});
// The virtual filesystem is read-only except the scratch area /tmp (cleared before each run).
for (const dir of ["/", "/home", "/home/pyodide", "/dev", "/lib"]) {
  try {
    pyodide.FS.chmod(dir, 0o555);
  } catch {
    // not there in this Pyodide build
  }
}
pyodide.runPython(init.bootstrap);
const runner = pyodide.globals.get("_mcpopt_run");
send({ op: "ready", ms: Math.round(performance.now() - t0) });

function callTool(runId) {
  return (name, argsJson) =>
    new Promise((resolve) => {
      const id = ++nextCall;
      pending.set(id, (msg) => resolve(JSON.stringify(msg)));
      send({ op: "call", run: runId, id, name, arguments: JSON.parse(argsJson) });
    });
}

await readLoop(async (msg) => {
  let result;
  try {
    result = await runner(msg.prelude, msg.code, msg.max_output, callTool(msg.id), !!msg.keep, !!msg.skills);
  } catch (err) {
    result = JSON.stringify({ ok: false, error_type: "SandboxError", error: String(err?.message ?? err) });
  }
  send({ op: "done", id: msg.id, result: String(result) });
});
