// The TypeScript SDK's own Client (npm @modelcontextprotocol/sdk) driving mcpopt, step by step.
//
// Usage: node ts_client.mjs '<plan JSON>'
//   plan: {transport: "stdio"|"http", command?, args?, env?, cwd?, url?, only?: [step names],
//          everything: "<prefix of server-everything>", interop: "<prefix of the interop fixture>",
//          gateway: "<gateway name>", events: "<path of the interop fixture's event file>"}
// Prints one JSON line per step: {"step": name, "ok": bool, "detail": ...}; exits 0 once all ran.
// A step that throws is reported with ok=false and the error's message; later steps still run.
import { readFileSync, existsSync } from "node:fs";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import {
  CreateMessageRequestSchema,
  ElicitRequestSchema,
  ListRootsRequestSchema,
  LoggingMessageNotificationSchema,
  ResourceUpdatedNotificationSchema,
} from "@modelcontextprotocol/sdk/types.js";

const plan = JSON.parse(process.argv[2]);
const E = plan.everything ?? "everything";
const I = plan.interop ?? "interop";
const G = plan.gateway ?? "mcpopt";
const STEP_TIMEOUT_MS = 60_000;

const seen = { logs: [], updates: [], toolsChanged: [], sampling: 0, elicitation: 0, roots: 0 };
const waiters = [];
function notifyWaiters() {
  for (const w of [...waiters]) if (w.check()) { waiters.splice(waiters.indexOf(w), 1); w.resolve(); }
}
function until(check, what, ms = 30_000) {
  if (check()) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const w = { check, resolve };
    waiters.push(w);
    setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
}

const client = new Client(
  { name: "ts-sdk-suite", version: "1.0.0" },
  {
    capabilities: { sampling: {}, elicitation: { form: {}, url: {} }, roots: { listChanged: true } },
    listChanged: {
      tools: {
        onChanged: (error, tools) => {
          if (!error && tools) seen.toolsChanged.push(tools.map((t) => t.name));
          notifyWaiters();
        },
      },
    },
  },
);
client.setRequestHandler(CreateMessageRequestSchema, async () => {
  seen.sampling += 1;
  return { role: "assistant", content: { type: "text", text: "ts-sampled" }, model: "ts-model" };
});
client.setRequestHandler(ElicitRequestSchema, async (request) => {
  seen.elicitation += 1;
  if (request.params.mode === "url") return { action: "accept" };
  const props = request.params.requestedSchema?.properties ?? {};
  const content = {};
  if ("name" in props) content.name = "Ada";
  if ("answer" in props) content.answer = "ts-answer";
  return { action: "accept", content };
});
client.setRequestHandler(ListRootsRequestSchema, async () => {
  seen.roots += 1;
  return { roots: [{ uri: "file:///ts-root", name: "ts" }] };
});
client.setNotificationHandler(LoggingMessageNotificationSchema, (n) => {
  seen.logs.push(n.params);
  notifyWaiters();
});
client.setNotificationHandler(ResourceUpdatedNotificationSchema, (n) => {
  seen.updates.push(n.params.uri);
  notifyWaiters();
});

const text = (result) => (result.content ?? []).map((c) => c.text ?? "").join("");
function expect(cond, message) {
  if (!cond) throw new Error(message);
}

async function progressVia(name, args, wanted) {
  const got = [];
  const result = await client.callTool({ name, arguments: args }, undefined, {
    onprogress: (p) => got.push(p.progress),
    timeout: STEP_TIMEOUT_MS,
  });
  expect(!result.isError, `tool error: ${text(result)}`);
  expect(got.length >= wanted, `expected ${wanted} progress notifications, got ${got.length} (${got})`);
  for (let i = 1; i < got.length; i++) expect(got[i] > got[i - 1], `progress not increasing: ${got}`);
  return { progress: got };
}

const steps = {
  initialize: async () => {
    const caps = client.getServerCapabilities();
    for (const kind of ["tools", "prompts", "resources"]) {
      expect(caps?.[kind]?.listChanged === true, `${kind}.listChanged is ${caps?.[kind]?.listChanged}`);
    }
    return { capabilities: caps, version: client.getServerVersion() };
  },
  "tools/list": async () => {
    const names = (await client.listTools()).tools.map((t) => t.name);
    expect(names.includes(`${E}__echo`), `no ${E}__echo in ${names}`);
    expect(names.includes(`${I}__ask_sampling`), `no ${I}__ask_sampling in ${names}`);
    return { count: names.length };
  },
  "tools/call": async () => {
    const result = await client.callTool({ name: `${E}__echo`, arguments: { message: "hello ts" } });
    expect(text(result).includes("hello ts"), `echo said ${text(result)}`);
    return { text: text(result) };
  },
  resources: async () => {
    const listed = (await client.listResources()).resources;
    const doc = listed.find((r) => r.uri.includes("static/document"));
    expect(doc, `no static document among ${listed.length} resources`);
    const read = await client.readResource({ uri: doc.uri });
    expect(read.contents.length > 0 && read.contents[0].uri === doc.uri, `read gave ${JSON.stringify(read).slice(0, 200)}`);
    const templates = (await client.listResourceTemplates()).resourceTemplates;
    expect(templates.length > 0, "no resource templates");
    return { resources: listed.length, templates: templates.length };
  },
  prompts: async () => {
    const names = (await client.listPrompts()).prompts.map((p) => p.name);
    expect(names.includes(`${E}__args-prompt`), `no ${E}__args-prompt in ${names}`);
    const got = await client.getPrompt({ name: `${E}__args-prompt`, arguments: { city: "Paris" } });
    expect(JSON.stringify(got.messages).includes("Paris"), `prompt gave ${JSON.stringify(got).slice(0, 200)}`);
    return { prompts: names.length };
  },
  completion: async () => {
    const got = await client.complete({
      ref: { type: "ref/prompt", name: `${E}__completable-prompt` },
      argument: { name: "department", value: "Eng" },
    });
    expect(got.completion.values.includes("Engineering"), `completion gave ${got.completion.values}`);
    return { values: got.completion.values };
  },
  // server-everything sends its last progress notification with the result: the TS client, direct
  // or through mcpopt, sees steps-1 of them (measured), so 3 steps must give at least 2.
  progress: () => progressVia(`${E}__trigger-long-running-operation`, { duration: 0.3, steps: 3 }, 2),
  "progress via call_tool": () =>
    progressVia(`${G}__call_tool`, { name: `${E}__trigger-long-running-operation`, arguments: { duration: 0.3, steps: 3 } }, 2),
  "progress via batch": () =>
    progressVia(
      `${G}__batch`,
      { calls: [{ name: `${E}__trigger-long-running-operation`, arguments: { duration: 0.3, steps: 3 } }, { name: `${E}__echo`, arguments: { message: "b" } }] },
      2,
    ),
  sampling: async () => {
    const result = await client.callTool({ name: `${E}__trigger-sampling-request`, arguments: { prompt: "hi", maxTokens: 8 } });
    expect(text(result).includes("ts-sampled"), `sampling result: ${text(result).slice(0, 300)}`);
    const modern = await client.callTool({ name: `${I}__ask_sampling`, arguments: { prompt: "hi" } });
    expect(text(modern) === "ts-sampled", `interop sampling: ${text(modern).slice(0, 300)}`);
    return { asked: seen.sampling };
  },
  elicitation: async () => {
    const result = await client.callTool({ name: `${E}__trigger-elicitation-request`, arguments: {} });
    expect(text(result).includes("Ada"), `elicitation result: ${text(result).slice(0, 300)}`);
    const modern = await client.callTool({ name: `${I}__ask_elicitation`, arguments: { question: "?" } });
    expect(text(modern) === "ts-answer", `interop elicitation: ${text(modern).slice(0, 300)}`);
    return { asked: seen.elicitation };
  },
  "url elicitation": async () => {
    const result = await client.callTool({ name: `${E}__trigger-url-elicitation`, arguments: { url: "https://example.com/ts" } });
    expect(text(result).includes("completed the URL elicitation"), `url elicitation: ${text(result).slice(0, 300)}`);
    const modern = await client.callTool({ name: `${I}__ask_url`, arguments: { url: "https://example.com/ts" } });
    expect(text(modern) === "accept", `interop url elicitation: ${text(modern).slice(0, 300)}`);
    return { asked: seen.elicitation };
  },
  roots: async () => {
    const result = await client.callTool({ name: `${E}__get-roots-list`, arguments: {} });
    expect(text(result).includes("file:///ts-root"), `roots result: ${text(result).slice(0, 300)}`);
    const modern = await client.callTool({ name: `${I}__ask_roots`, arguments: {} });
    expect(text(modern) === "file:///ts-root", `interop roots: ${text(modern).slice(0, 300)}`);
    return { asked: seen.roots };
  },
  logging: async () => {
    await client.setLoggingLevel("info");
    const before = seen.logs.length;
    await client.callTool({ name: `${I}__log`, arguments: { level: "debug", text: "below the level" } });
    await client.callTool({ name: `${I}__log`, arguments: { level: "warning", text: "ts-log-line" } });
    await until(() => seen.logs.slice(before).some((l) => JSON.stringify(l.data).includes("ts-log-line")), "the log message");
    const fresh = seen.logs.slice(before);
    expect(!fresh.some((l) => JSON.stringify(l.data).includes("below the level")), "a debug message passed level info");
    return { messages: fresh.length };
  },
  "list_changed": async () => {
    const name = `ts_added_${Date.now()}`;
    const result = await client.callTool({ name: `${I}__add_tool`, arguments: { name } });
    expect(text(result) === "added", `add_tool: ${text(result)}`);
    await until(() => seen.toolsChanged.some((names) => names.includes(`${I}__${name}`)), "the auto-refreshed tool list");
    return { refreshes: seen.toolsChanged.length };
  },
  "resource updates": async () => {
    const uri = `${I}+interop://counter`;
    await client.subscribeResource({ uri });
    const before = seen.updates.length;
    await client.callTool({ name: `${I}__touch`, arguments: {} });
    await until(() => seen.updates.slice(before).includes(uri), "notifications/resources/updated");
    await client.unsubscribeResource({ uri });
    return { updates: seen.updates.length - before };
  },
  cancellation: async () => {
    const controller = new AbortController();
    const events = () => (existsSync(plan.events) ? readFileSync(plan.events, "utf8") : "");
    const poll = setInterval(notifyWaiters, 50); // the events file changes without a notification
    try {
      const call = client.callTool({ name: `${I}__slow`, arguments: { seconds: 30 } }, undefined, { signal: controller.signal });
      const settled = call.then(() => "result", () => "error");
      await until(() => events().includes("slow started"), "the slow call to start");
      controller.abort("ts-suite cancels");
      expect((await settled) === "error", "the cancelled call returned a result");
      await until(() => events().includes("cancelled"), "the upstream to see the cancellation");
    } finally {
      clearInterval(poll);
    }
    return { cancelled: true };
  },
};

async function main() {
  const transport =
    plan.transport === "http"
      ? new StreamableHTTPClientTransport(new URL(plan.url))
      : new StdioClientTransport({ command: plan.command, args: plan.args, env: { ...process.env, ...(plan.env ?? {}) }, cwd: plan.cwd, stderr: "inherit" });
  const emit = (step, ok, detail) => process.stdout.write(JSON.stringify({ step, ok, detail }) + "\n");
  try {
    await client.connect(transport);
  } catch (e) {
    emit("connect", false, String(e?.message ?? e));
    process.exit(0);
  }
  emit("connect", true, { protocolVersion: transport.protocolVersion ?? null });
  for (const [name, run] of Object.entries(steps)) {
    if (plan.only && !plan.only.includes(name)) continue;
    try {
      const detail = await Promise.race([
        run(),
        new Promise((_, reject) => setTimeout(() => reject(new Error(`step timed out after ${STEP_TIMEOUT_MS} ms`)), STEP_TIMEOUT_MS)),
      ]);
      emit(name, true, detail ?? null);
    } catch (e) {
      emit(name, false, String(e?.message ?? e));
    }
  }
  await client.close();
  process.exit(0);
}

main();
