// The chat page: streams /v1/chat/completions (server-sent events) into the log. No build step, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), send = $("send"), stop = $("stop");
const temperature = $("temperature"), maxTokens = $("max-tokens"), apiKey = $("api-key");
const status = $("status"), speed = $("speed");

let model = null;
let history = [];        // {role, content} turns sent with every request
let controller = null;   // aborts the running request (the stop button)

apiKey.value = localStorage.getItem("choicelm-api-key") || "";
apiKey.addEventListener("change", () => { localStorage.setItem("choicelm-api-key", apiKey.value); loadModel(); });
temperature.addEventListener("input", () => { $("temperature-value").textContent = Number(temperature.value).toFixed(2); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey.value) h["Authorization"] = "Bearer " + apiKey.value;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    model = body.data[0].id;
    $("model").textContent = `model: ${model} (context ${body.data[0].max_model_len} tokens)`;
  } catch (e) {
    $("model").textContent = "no model: " + e.message;
  }
}

function bubble(cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function setBusy(busy) {
  send.disabled = busy;
  stop.disabled = !busy;
}

async function chat(message) {
  history.push({ role: "user", content: message });
  bubble("user", message);
  const reply = bubble("assistant streaming", "");
  controller = new AbortController();
  setBusy(true);
  status.textContent = "generating…";
  speed.textContent = "";
  let text = "", pieces = 0, usage = null, finish = null;
  const t0 = performance.now();
  let tFirst = null;
  const showSpeed = () => {
    if (tFirst === null) return;
    const seconds = (performance.now() - tFirst) / 1000;
    const tokens = usage ? usage.completion_tokens : pieces;
    if (seconds > 0) speed.textContent = `${(tokens / seconds).toFixed(1)} tokens/s`;
  };
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model, messages: history, stream: true, stream_options: { include_usage: true },
        temperature: Number(temperature.value), max_tokens: Number(maxTokens.value),
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {      // one SSE event per blank line
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            if (tFirst === null) tFirst = performance.now();
            text += choice.delta.content;
            pieces += 1;
            reply.textContent = text;
            log.scrollTop = log.scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        showSpeed();
      }
    }
    status.textContent = `done (${finish || "?"}) in ${((performance.now() - t0) / 1000).toFixed(2)} s`;
  } catch (e) {
    if (e.name === "AbortError") {
      status.textContent = "stopped";
    } else {
      bubble("error", e.message);
      status.textContent = "error";
    }
  } finally {
    showSpeed();
    reply.classList.remove("streaming");
    if (text) history.push({ role: "assistant", content: text });
    else { reply.remove(); if (status.textContent !== "error") history.pop(); }
    controller = null;
    setBusy(false);
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const message = input.value.trim();
  if (!message || controller) return;
  input.value = "";
  chat(message);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
stop.addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => { history = []; log.textContent = ""; speed.textContent = ""; status.textContent = "ready"; });

loadModel();
