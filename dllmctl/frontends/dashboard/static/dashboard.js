// The dllm dashboard: polls /dashboard/api/snapshot with the API key (kept in sessionStorage, for
// this tab only), draws nodes, layers, jobs, a loss chart and events, and streams chat answers from
// /v1/chat/completions (server-sent events). Text from the cluster is only ever set as textContent.
"use strict";

const KEY_SLOT = "dllm.dashboard.key";
const POLL_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";

const state = {
  key: sessionStorage.getItem(KEY_SLOT),
  timer: null,
  job: null,           // the job whose loss chart is shown
  loss: [],            // its metric rows so far
  messages: [],        // the chat so far
  streaming: false,
};

const $ = (id) => document.getElementById(id);

class ApiFailure extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

function headers(json) {
  const h = {};
  if (state.key) h.Authorization = "Bearer " + state.key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(response) {
  const body = await response.json().catch(() => ({}));
  const error = body.error || {};
  return new ApiFailure(response.status, error.message || response.statusText, error.code);
}

async function getJson(path) {
  const response = await fetch(path, { headers: headers(false), cache: "no-store" });
  if (!response.ok) throw await failure(response);
  return response.json();
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function number(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// --- the key ------------------------------------------------------------------------------------

function askForKey(message) {
  clearTimeout(state.timer);
  $("main").hidden = true;
  $("forget-key").hidden = true;
  $("key-form").hidden = false;
  $("key-error").textContent = message || "";
  $("key-input").focus();
}

function useKey(event) {
  event.preventDefault();
  state.key = $("key-input").value.trim();
  $("key-input").value = "";
  sessionStorage.setItem(KEY_SLOT, state.key);
  refresh();
}

function forgetKey() {
  state.key = null;
  sessionStorage.removeItem(KEY_SLOT);
  askForKey("");
}

// --- polling ------------------------------------------------------------------------------------

async function refresh() {
  clearTimeout(state.timer);
  try {
    const snapshot = await getJson("/dashboard/api/snapshot");
    $("key-form").hidden = true;
    $("main").hidden = false;
    $("forget-key").hidden = !state.key;
    render(snapshot);
    setStatus("updated " + new Date(snapshot.time * 1000).toLocaleTimeString(), false);
    if (!$("chat-model").options.length) loadModels();
    if (state.job) await loadLoss();
  } catch (error) {
    if (error.status === 401) {
      const refused = state.key !== null;
      sessionStorage.removeItem(KEY_SLOT);
      state.key = null;
      askForKey(refused ? "That key was refused: " + error.message : "");
      return;
    }
    setStatus("cannot update: " + error.message, true);
  }
  state.timer = setTimeout(refresh, POLL_MS);
}

function render(snapshot) {
  renderNodes(snapshot.nodes);
  renderLayers(snapshot.models, snapshot.nodes);
  renderJobs(snapshot.jobs);
  renderEvents(snapshot.events);
  $("total-rate").textContent = snapshot.tokens_per_s.toFixed(1) + " tokens/s, " + snapshot.up + "/" +
    snapshot.nodes.length + " nodes up";
}

function renderNodes(nodes) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren();
  for (const node of nodes) {
    const row = el("tr", undefined, node.status === "up" ? "" : "down");
    row.dataset.node = node.name;
    const layers = node.spans.map((s) => s.model + " " + s.start + "-" + (s.end - 1) +
      (s.group ? " (group " + s.group + " rank " + s.rank + "/" + s.group_size + ")" : "")).join(", ");
    const up = node.status === "up";
    const gpus = (node.gpus || []).map((g) => bytes(g.memory_used_bytes) + "/" + bytes(g.memory_total_bytes) +
      (g.util_percent === null ? "" : " " + g.util_percent.toFixed(0) + "%")).join(", ");
    const cells = [node.name, node.status, up ? number(node.cpu_percent, 0) + "% of " + node.cpu_cores : "-",
                   up ? bytes(node.ram_used_bytes) + "/" + bytes(node.ram_total_bytes) : "-", gpus || "-",
                   number(node.latency_ms, 1), layers || "-", up ? node.sessions : "-", number(node.tokens_per_s, 1)];
    cells.forEach((text) => row.append(el("td", text)));
    row.cells[1].className = "status-" + node.status;
    row.cells[6].className = "layers";
    if (node.error) row.title = node.error;
    body.append(row);
  }
}

function renderLayers(models, nodes) {
  const box = $("layers");
  box.replaceChildren();
  for (const model of models.filter((m) => m.spans.length)) {
    const layers = model.coverage.length ? model.coverage[model.coverage.length - 1].end : 0;
    const holders = nodes.filter((n) => n.spans.some((s) => s.model === model.name));
    const cell = 22, left = 90, top = 16;
    const chart = svg("svg", { width: left + layers * cell + 4, height: top + (holders.length + 1) * cell + 4,
                               class: "layer-map", "data-model": model.name });
    for (let layer = 0; layer < layers; layer += 1) {
      chart.append(svg("text", { x: left + layer * cell + 6, y: 11 }, layer));
    }
    holders.forEach((node, i) => {
      const y = top + i * cell;
      chart.append(svg("text", { x: 0, y: y + 15 }, node.name));
      for (const span of node.spans.filter((s) => s.model === model.name)) {
        for (let layer = span.start; layer < span.end; layer += 1) {
          const x = left + layer * cell;
          chart.append(svg("rect", { x, y, width: cell - 2, height: cell - 2, rx: 3, class: "held",
                                     "data-node": node.name, "data-layer": layer }));
          if (span.group) chart.append(svg("text", { x: x + 6, y: y + 15, class: "held-text" }, span.rank));
        }
      }
    });
    const y = top + holders.length * cell;
    chart.append(svg("text", { x: 0, y: y + 15 }, "copies"));
    for (const run of model.coverage) {
      for (let layer = run.start; layer < run.end; layer += 1) {
        chart.append(svg("text", { x: left + layer * cell + 4, y: y + 15, class: run.count ? "" : "gap" }, "x" + run.count));
      }
    }
    const title = el("h3", model.name + (model.can_generate ? "" : " (cannot generate: a layer is not served, or no tokenizer here)"));
    box.append(title, chart);
  }
  if (!box.children.length) box.append(el("p", "No node that is up serves a model; deploy one with 'dllmctl deploy'.", "hint"));
}

// --- jobs and the loss chart --------------------------------------------------------------------

function renderJobs(jobs) {
  const body = $("jobs").tBodies[0];
  body.replaceChildren();
  if (!state.job && jobs.length) {
    const running = jobs.find((j) => j.state === "running");
    selectJob((running || jobs[0]).job);
  }
  for (const job of jobs) {
    const row = el("tr", undefined, job.job === state.job ? "selected" : "");
    row.dataset.job = job.job;
    [job.job, job.state, job.model, job.step + "/" + job.total_steps, number(job.loss, 4),
     number(job.tokens_per_s, 1), job.coordinator].forEach((text) => row.append(el("td", text)));
    row.addEventListener("click", () => { selectJob(job.job); loadLoss(); renderJobs(jobs); });
    body.append(row);
  }
  if (!jobs.length) {
    const row = el("tr");
    row.append(el("td", "no training jobs on the nodes", "hint"));
    body.append(row);
  }
}

function selectJob(job) {
  if (state.job !== job) { state.job = job; state.loss = []; }
}

async function loadLoss() {
  const job = state.job;
  const after = state.loss.length ? state.loss[state.loss.length - 1].step : -1;
  try {
    const page = await getJson("/dashboard/api/jobs/" + encodeURIComponent(job) + "/metrics?after_step=" + after);
    if (job !== state.job) return;
    state.loss = state.loss.concat(page.metrics);
    $("chart-title").textContent = "loss of " + job + " (" + page.state + ", step " + page.step + "/" + page.total_steps + ")";
    drawLoss(state.loss);
  } catch (error) {
    $("chart-title").textContent = "loss of " + job + ": " + error.message;
  }
}

function drawLoss(rows) {
  const chart = $("loss-chart");
  chart.replaceChildren();
  const points = rows.filter((r) => r.loss !== null && r.loss !== undefined);
  if (!points.length) return;
  const w = 640, h = 240, left = 48, bottom = 24, pad = 8;
  const steps = points.map((p) => p.step), losses = points.map((p) => p.loss);
  const s0 = Math.min(...steps), s1 = Math.max(...steps), l0 = Math.min(...losses), l1 = Math.max(...losses);
  const x = (s) => left + (s1 > s0 ? (s - s0) / (s1 - s0) : 0.5) * (w - left - pad);
  const y = (l) => pad + (l1 > l0 ? (l1 - l) / (l1 - l0) : 0.5) * (h - bottom - pad);
  chart.append(svg("line", { x1: left, y1: h - bottom, x2: w - pad, y2: h - bottom, stroke: "#d9dee7" }));
  chart.append(svg("line", { x1: left, y1: pad, x2: left, y2: h - bottom, stroke: "#d9dee7" }));
  chart.append(svg("text", { x: 2, y: pad + 8 }, l1.toFixed(3)));
  chart.append(svg("text", { x: 2, y: h - bottom }, l0.toFixed(3)));
  chart.append(svg("text", { x: left, y: h - 6 }, "step " + s0));
  chart.append(svg("text", { x: w - pad - 60, y: h - 6 }, "step " + s1));
  chart.append(svg("polyline", { points: points.map((p) => x(p.step) + "," + y(p.loss)).join(" "), fill: "none",
                                 stroke: "#2f6fde", "stroke-width": 2, class: "loss-line" }));
  for (const p of points) chart.append(svg("circle", { cx: x(p.step), cy: y(p.loss), r: 2.5, fill: "#2f6fde" }));
}

// --- events -------------------------------------------------------------------------------------

// An alert event's message is the alert's JSON (severity, node, message, details): its words are shown.
function describe(event) {
  if (event.alert) {
    try {
      const alert = JSON.parse(event.message);
      if (alert && typeof alert.message === "string") {
        return { severity: String(alert.severity || ""),
                 text: event.job + " " + event.kind + (alert.node ? " on " + alert.node : "") + ": " + alert.message };
      }
    } catch (error) { /* not an alert's JSON: shown as it is */ }
  }
  return { severity: "", text: event.job + " " + event.kind + ": " + event.message };
}

function renderEvents(events) {
  const list = $("events");
  list.replaceChildren();
  for (const event of events) {
    const shown = describe(event);
    const item = el("li", undefined, event.alert ? "alert " + shown.severity.replace(/[^a-z]/g, "") : "");
    item.dataset.kind = event.kind;
    item.append(el("time", new Date(event.time * 1000).toLocaleTimeString()));
    if (shown.severity) item.append(el("strong", shown.severity + " "));
    item.append(el("span", shown.text));
    list.append(item);
  }
  if (!events.length) list.append(el("li", "no events", "hint"));
}

// --- chat ---------------------------------------------------------------------------------------

async function loadModels() {
  try {
    const listing = await getJson("/v1/models");
    const select = $("chat-model");
    select.replaceChildren(...listing.data.map((m) => el("option", m.id)));
  } catch (error) {
    $("chat-error").textContent = "cannot list models: " + error.message;
  }
}

function bubble(role, text) {
  const node = el("div", text, "message " + role);
  $("transcript").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || state.streaming) return;
  $("chat-error").textContent = "";
  $("chat-input").value = "";
  state.messages.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  state.streaming = true;
  $("chat-send").disabled = true;
  try {
    const reply = await stream({ model: $("chat-model").value, messages: state.messages, stream: true,
                                 temperature: Number($("chat-temperature").value),
                                 max_tokens: Number($("chat-max-tokens").value) }, answer);
    state.messages.push({ role: "assistant", content: reply });
    answer.dataset.done = "true";
  } catch (error) {
    state.messages.pop();
    answer.remove();
    $("chat-error").textContent = error.message;
  } finally {
    state.streaming = false;
    $("chat-send").disabled = false;
  }
}

// One streamed completion: each `data:` event's delta is appended to `answer` as it arrives.
async function stream(body, answer) {
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (!response.ok) {
    const error = await failure(response);
    if (error.status === 401) forgetKey();
    throw error;
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return text;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiFailure(0, chunk.error.message, chunk.error.code);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            text += choice.delta.content;
            answer.textContent = text;
          }
        }
      }
    }
  }
  return text;
}

function clearChat() {
  state.messages = [];
  $("transcript").replaceChildren();
  $("chat-error").textContent = "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("chat-form").addEventListener("submit", send);
  $("chat-clear").addEventListener("click", clearChat);
  refresh();
});
