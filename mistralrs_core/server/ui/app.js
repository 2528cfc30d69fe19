// The chat page: models from /v1/models, answers streamed from /v1/chat/completions
// (server-sent events read from fetch's body), Stop through an AbortController.
"use strict";

const $ = (id) => document.getElementById(id);
const api = (path) => new URL("../v1/" + path, location.href).toString();
const conversation = []; // the conversation, in the chat API's message shape
let image = null;        // data: URI of the attached image, sent with the next message
let controller = null;   // aborts the answer being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text, imageUrl) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "attached image";
    div.appendChild(img);
  }
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) {
    return res.status + " " + res.statusText;
  }
}

async function loadModels() {
  try {
    const res = await fetch(api("models"), { headers: headers() });
    if (!res.ok) throw new Error(await errorText(res));
    const select = $("model");
    select.textContent = "";
    for (const m of (await res.json()).data) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      select.appendChild(opt);
    }
    $("status").textContent = select.options.length ? "" : "no model is loaded";
  } catch (err) {
    $("status").textContent = "could not list models: " + err.message;
  }
}

function settings() {
  const body = {};
  const t = parseFloat($("temperature").value);
  if (!Number.isNaN(t)) body.temperature = t;
  const n = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(n)) body.max_tokens = n;
  return body;
}

// Yields the JSON payload of each `data:` event until [DONE].
async function* events(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send(text) {
  // The image first, then the question about it (the order most vision templates expect).
  const content = image
    ? [{ type: "image_url", image_url: { url: image } }, { type: "text", text }]
    : text;
  bubble("user", text, image);
  conversation.push({ role: "user", content });
  clearImage();
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...conversation] : conversation;
  const body = { model: $("model").value || "default", messages, stream: true,
                 stream_options: { include_usage: true }, ...settings() };
  const out = bubble("assistant streaming", "");
  let answer = "";
  controller = new AbortController();
  busy(true);
  $("status").textContent = "generating…";
  const t0 = performance.now();
  try {
    const res = await fetch(api("chat/completions"), { method: "POST", headers: headers(),
                                                       body: JSON.stringify(body), signal: controller.signal });
    if (!res.ok) throw new Error(await errorText(res));
    let usage = null;
    for await (const chunk of events(res)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        out.textContent = answer;
        out.scrollIntoView({ block: "end" });
      }
    }
    const secs = (performance.now() - t0) / 1000;
    $("status").textContent = usage
      ? `${usage.completion_tokens} tokens in ${secs.toFixed(1)} s (${(usage.completion_tokens / secs).toFixed(1)} tok/s)`
      : `done in ${secs.toFixed(1)} s`;
  } catch (err) {
    if (err.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      bubble("error", err.message);
      $("status").textContent = "";
      // The refused turn leaves the conversation, so the next message does not repeat it.
      if (!answer) conversation.pop();
    }
  } finally {
    out.classList.remove("streaming");
    if (answer) conversation.push({ role: "assistant", content: answer });
    else if (!out.textContent) out.remove();
    controller = null;
    busy(false);
  }
}

function clearImage() {
  image = null;
  $("image").value = "";
  $("attachment").hidden = true;
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").textContent = "";
  $("status").textContent = "";
});
$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    image = reader.result;
    $("preview").src = image;
    $("attachment").hidden = false;
  };
  reader.readAsDataURL(file);
});
$("remove-image").addEventListener("click", clearImage);
$("api-key").value = localStorage.getItem("mistralrs-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("mistralrs-api-key", $("api-key").value.trim());
  loadModels();
});
loadModels();
