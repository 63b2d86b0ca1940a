// The chat page: conversations (kept in localStorage), streaming replies through the server's own OpenAI
// route, Stop, edit / resend / regenerate, and what the launcher knows (GET /llmrun/status) on screen.
// Model output only ever reaches the page through markdown.js, which builds text nodes.

import { ApiError, call, errorOf, getJSON, onKeyNeeded, streamChat } from "./api.js";
import { renderMarkdown, setCopyHandler } from "./markdown.js";
import { renderMachine, renderModel } from "./panel.js";
import {
  loadConversations, loadSettings, newConversation, onStorageError, saveConversations, saveSettings, titleOf,
} from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"), list: $("conversations"), messages: $("messages"), empty: $("empty"), emptyModel: $("empty-model"),
  input: $("input"), composer: $("composer"), send: $("send"), stop: $("stop"), model: $("model"),
  serverState: $("server-state"), banner: $("banner"), system: $("system"), temperature: $("temperature"),
  temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"), modelFacts: $("model-facts"),
  modelMemory: $("model-memory"), machineFacts: $("machine-facts"), machineNotes: $("machine-notes"),
  ctxFill: $("ctx-fill"), ctxText: $("ctx-text"), speed: $("speed"), ttft: $("ttft"), scrim: $("scrim"),
  keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("key-input"), keyError: $("key-error"),
};

const state = {
  settings: loadSettings(),
  conversations: loadConversations(),
  current: null,          // the conversation on screen
  models: [],             // ids from /v1/models
  status: null,           // the last GET /llmrun/status
  running: null,          // { controller, conversation, message }
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, className, onClick, title) {
  const b = el("button", className, label);
  b.type = "button";
  if (title) b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

// one line above the conversation for what is wrong beyond a single reply; `kind` lets the cause clear it
function showBanner(text, kind) {
  ui.banner.textContent = text;
  ui.banner.hidden = !text;
  ui.banner.dataset.kind = kind || "";
}

function clearBanner(...kinds) {
  if (kinds.includes(ui.banner.dataset.kind)) showBanner("");
}

onStorageError(() => showBanner("This browser's storage is full: delete old conversations to keep new ones.",
                                "storage"));

// ---- copying ----

async function copyText(text, target) {
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) { await navigator.clipboard.writeText(text); ok = true; }
  } catch (_) { ok = false; }
  if (!ok) {   // plain http from another machine is not a secure context: the old way still works there
    const area = el("textarea", "offscreen");
    area.value = text;
    area.readOnly = true;
    document.body.appendChild(area);
    area.select();
    try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
    area.remove();
  }
  const before = target.textContent;
  target.textContent = ok ? "Copied" : "Copy failed";
  target.classList.add("flash");
  setTimeout(() => { target.textContent = before; target.classList.remove("flash"); }, 1400);
}
setCopyHandler(copyText);

// ---- the API key ----

let keyPrompt = null;
let keyDeclined = false;   // Cancel: the background refreshes stop asking until the person acts again
onKeyNeeded((wrong) => {
  if (keyPrompt) return keyPrompt;   // several calls got 401 at once: one dialog
  if (keyDeclined) return Promise.resolve(null);
  ui.serverState.textContent = "API key needed";
  keyPrompt = new Promise((resolve) => {
    ui.keyError.hidden = !wrong;
    ui.keyInput.value = "";
    const done = (value) => {
      ui.keyForm.removeEventListener("submit", submit);
      $("key-cancel").removeEventListener("click", cancel);
      ui.keyDialog.removeEventListener("cancel", cancel);
      if (ui.keyDialog.open) ui.keyDialog.close();
      keyPrompt = null;
      resolve(value);
    };
    const submit = (e) => { e.preventDefault(); done(ui.keyInput.value.trim() || null); };
    const cancel = (e) => { e.preventDefault(); keyDeclined = true; done(null); };
    ui.keyForm.addEventListener("submit", submit);
    $("key-cancel").addEventListener("click", cancel);
    ui.keyDialog.addEventListener("cancel", cancel);
    ui.keyDialog.showModal();
    ui.keyInput.focus();
  });
  return keyPrompt;
});

// ---- conversations ----

function persist() {
  state.conversations.sort((a, b) => b.updated - a.updated);
  saveConversations(state.conversations.filter((c) => c.messages.length));
}

function renderList() {
  ui.list.replaceChildren();
  for (const c of state.conversations) {
    if (!c.messages.length) continue;
    const li = el("li", c === state.current ? "active" : "");
    const open = button(titleOf(c), "conv-open", () => { select(c); closeDrawers(); });
    open.title = titleOf(c);
    if (c === state.current) open.setAttribute("aria-current", "true");
    const del = button("×", "conv-delete", () => {
      if (!del.classList.contains("confirm")) {   // a second click deletes: nothing goes by accident
        del.classList.add("confirm");
        del.textContent = "Delete";
        setTimeout(() => { del.classList.remove("confirm"); del.textContent = "×"; }, 3000);
        return;
      }
      remove(c);
    }, "Delete this conversation");
    del.setAttribute("aria-label", `Delete conversation: ${titleOf(c)}`);
    li.append(open, del);
    ui.list.appendChild(li);
  }
}

function select(conversation) {
  if (state.running && state.running.conversation !== conversation) stop();
  state.current = conversation;
  ui.system.value = conversation.system || "";
  syncModelPicker();
  renderList();
  renderMessages();
}

function startNew() {
  const empty = state.conversations.find((c) => !c.messages.length);
  select(empty || (() => { const c = newConversation(state.settings); state.conversations.unshift(c); return c; })());
  ui.input.focus();
}

function remove(conversation) {
  if (state.running && state.running.conversation === conversation) stop();
  state.conversations = state.conversations.filter((c) => c !== conversation);
  persist();
  if (state.current === conversation) startNew(); else renderList();
}

// ---- messages ----

function metaLine(m) {
  const meta = m.meta || {};
  const parts = [];
  if (meta.usage) parts.push(`${meta.usage.completion_tokens} tokens`);
  if (meta.tps) parts.push(`${meta.tps.toFixed(1)} tok/s`);
  if (meta.ttft !== undefined && meta.ttft !== null) parts.push(`first token ${meta.ttft.toFixed(2)} s`);
  if (meta.finish === "length") parts.push("cut at max tokens");
  if (meta.stopped) parts.push("stopped");
  if (meta.model) parts.push(meta.model);
  return parts.join(" · ");
}

function messageView(m, index, conversation) {
  const article = el("article", `msg ${m.role}`);
  article.dataset.index = String(index);
  const bubble = el("div", "bubble");
  const meta = m.meta || {};
  if (meta.notice) bubble.appendChild(el("div", "notice", meta.notice));
  const content = el("div", m.role === "assistant" ? "content md" : "content plain");
  bubble.appendChild(content);
  article.appendChild(bubble);
  const view = { article, bubble, content, metaNode: el("div", "meta"), actions: el("div", "actions") };
  fillContent(view, m);
  if (meta.error) bubble.appendChild(el("div", "error", meta.error));
  view.metaNode.textContent = metaLine(m);
  article.append(view.metaNode, view.actions);
  fillActions(view, m, index, conversation);
  return view;
}

function fillContent(view, m) {
  if (m.role === "user") {
    view.content.textContent = m.content;
  } else if (m.content) {
    view.content.replaceChildren(renderMarkdown(m.content));
  } else if (!(m.meta && (m.meta.error || m.meta.stopped))) {
    view.content.replaceChildren(el("span", "loading", m.meta && m.meta.loading ? m.meta.loading : "loading…"));
  } else {
    view.content.replaceChildren();
  }
}

function fillActions(view, m, index, conversation) {
  view.actions.replaceChildren();
  if (state.running) return;
  const last = index === conversation.messages.length - 1;
  if (m.content) view.actions.appendChild(button("Copy", "act", (e) => copyText(m.content, e.currentTarget)));
  if (m.role === "user") {
    view.actions.appendChild(button("Edit", "act", () => edit(view, m, index, conversation)));
    view.actions.appendChild(button("Resend", "act", () => {
      conversation.messages = conversation.messages.slice(0, index + 1);
      generate(conversation);
    }, "Send this message again (the replies after it are replaced)"));
  } else if (last) {
    view.actions.appendChild(button("Regenerate", "act", () => {
      conversation.messages = conversation.messages.slice(0, index);
      generate(conversation);
    }));
  }
}

function edit(view, m, index, conversation) {
  const area = el("textarea", "edit-area");
  area.value = m.content;
  area.rows = Math.min(12, m.content.split("\n").length + 1);
  const save = button("Save & send", "btn primary", () => {
    const text = area.value.trim();
    if (!text) return;
    conversation.messages = conversation.messages.slice(0, index);
    conversation.messages.push({ role: "user", content: text });
    generate(conversation);
  });
  const cancel = button("Cancel", "btn", () => renderMessages());
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); save.click(); }
    if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); cancel.click(); }
  });
  view.content.replaceChildren(area);
  view.actions.replaceChildren(cancel, save);
  view.article.classList.add("editing");
  area.focus();
}

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 120;
}

function scrollToEnd() { ui.messages.scrollTop = ui.messages.scrollHeight; }

function renderMessages() {
  const c = state.current;
  for (const node of [...ui.messages.children]) if (node !== ui.empty) node.remove();
  ui.empty.hidden = Boolean(c && c.messages.length);
  if (c) c.messages.forEach((m, i) => { ui.messages.appendChild(messageView(m, i, c).article); });
  scrollToEnd();
  renderStats();
}

function renderStats() {
  const c = state.current;
  const last = c && [...c.messages].reverse().find((m) => m.role === "assistant" && m.meta);
  const meta = (last && last.meta) || {};
  const used = meta.usage ? meta.usage.prompt_tokens + meta.usage.completion_tokens : null;
  const max = meta.ctxMax || (loadedModel() || {}).context_per_slot || null;
  ui.ctxText.textContent = used !== null && max ? `context ${used} / ${max}` : max ? `context — / ${max}` : "context —";
  ui.ctxFill.style.width = used !== null && max ? `${Math.min(100, (100 * used) / max)}%` : "0%";
  ui.ctxFill.classList.toggle("high", Boolean(used !== null && max && used / max > 0.85));
  ui.speed.textContent = meta.tps ? `${meta.tps.toFixed(1)} tok/s` : "— tok/s";
  ui.ttft.textContent = meta.ttft !== undefined && meta.ttft !== null ? `first token ${meta.ttft.toFixed(2)} s`
    : "first token —";
}

// ---- generating ----

function requestBody(conversation, model) {
  const messages = [];
  if (conversation.system && conversation.system.trim()) messages.push({ role: "system", content: conversation.system });
  for (const m of conversation.messages) {
    if (m.content) messages.push({ role: m.role, content: m.content });
  }
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  const t = state.settings.temperature;
  if (typeof t === "number" && t >= 0 && t <= 2) body.temperature = t;
  if (state.settings.maxTokens) body.max_tokens = state.settings.maxTokens;
  return body;
}

function setRunning(running) {
  state.running = running;
  ui.messages.setAttribute("aria-busy", String(Boolean(running)));   // screen readers: read the reply once done
  ui.send.hidden = Boolean(running);
  ui.stop.hidden = !running;
  ui.app.classList.toggle("running", Boolean(running));
}

function modelFor(conversation) {
  return conversation.model || ui.model.value || state.models[0] || null;
}

function noModel() {
  const loading = !state.status || state.status.state === "loading";
  showBanner(`No model to talk to yet: ${loading ? "the server is still loading it; try again in a moment"
    : "the server lists none"}.`, "model");
}

async function generate(conversation) {
  const model = modelFor(conversation);
  if (!model) { noModel(); renderMessages(); return; }
  clearBanner("model");
  conversation.model = model;
  const loaded = (state.status && state.status.models || []).some((m) => m.name === model);
  const message = { role: "assistant", content: "", meta: { model, loading: loaded ? "loading…" : `loading ${model}…` } };
  conversation.messages.push(message);
  conversation.updated = Date.now();
  const controller = new AbortController();
  setRunning({ controller, conversation, message });
  persist();
  renderList();
  renderMessages();
  const view = { content: ui.messages.lastElementChild.querySelector(".content"),
                 bubble: ui.messages.lastElementChild.querySelector(".bubble") };
  const started = performance.now();
  let first = null;
  let pending = false;
  const waiting = setInterval(() => {   // a slow first token (a model being loaded): show that time passes
    if (first === null && state.current === conversation) {
      const s = Math.round((performance.now() - started) / 1000);
      message.meta.loading = `${loaded ? "loading…" : `loading ${model}…`} ${s} s`;
      fillContent(view, message);
    }
  }, 1000);
  const paint = () => {
    pending = false;
    if (state.current !== conversation) return;
    const follow = nearBottom();
    fillContent(view, message);
    if (follow) scrollToEnd();
  };
  try {
    const events = streamChat(requestBody(conversation, model), {
      signal: controller.signal,
      onStart: (response) => {
        const notice = response.headers.get("X-Llmrun-Notice");
        if (notice) {
          message.meta.notice = notice;
          view.bubble.insertBefore(el("div", "notice", notice), view.content);
        }
      },
    });
    for await (const event of events) {
      if (event.usage) message.meta.usage = event.usage;
      if (event.timings) message.meta.timings = event.timings;   // the engine's own clock (llama-server's shape)
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) message.meta.finish = choice.finish_reason;
      const delta = choice.delta && choice.delta.content;
      if (delta) {
        if (first === null) { first = performance.now(); refreshStatus(); }   // the panel: a slot is busy
        message.content += delta;
        if (!pending) { pending = true; requestAnimationFrame(paint); }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") message.meta.stopped = true;
    else message.meta.error = e instanceof ApiError ? e.message : `The reply failed: ${e.message}`;
  } finally {
    clearInterval(waiting);
    const end = performance.now();
    delete message.meta.loading;
    if (first !== null) message.meta.ttft = (first - started) / 1000;
    // decode speed as the engine measured it; the page's clock only when the server sent no timings
    const t = message.meta.timings;
    const n = message.meta.usage ? message.meta.usage.completion_tokens : 0;
    if (t && t.predicted_per_second > 0) message.meta.tps = t.predicted_per_second;
    else if (n > 1 && first !== null && end - first > 0) message.meta.tps = (n - 1) / ((end - first) / 1000);
    const info = (state.status && state.status.models || []).find((m) => m.name === model);
    if (info) message.meta.ctxMax = info.context_per_slot;
    conversation.updated = Date.now();
    setRunning(null);
    persist();
    if (state.current === conversation) renderMessages();
    renderList();
    refreshStatus();
  }
}

function stop() {
  if (state.running) state.running.controller.abort();
}

function send() {
  const text = ui.input.value.trim();
  if (!text || state.running) return;
  if (keyDeclined) { keyDeclined = false; refreshStatus(); return; }   // ask for the key again; the text stays
  const c = state.current;
  if (!modelFor(c)) { noModel(); return; }   // the text stays in the box
  c.messages.push({ role: "user", content: text });
  ui.input.value = "";
  autosize();
  generate(c);
}

// ---- models and status ----

function loadedModel() {
  const models = (state.status && state.status.models) || [];
  const want = state.current && state.current.model;
  return models.find((m) => m.name === want) || models[0] || null;
}

function syncModelPicker() {
  const c = state.current;
  const ids = [...state.models];
  const loadedNames = new Set(((state.status && state.status.models) || []).map((m) => m.name));
  const want = (c && c.model) || state.settings.model;
  if (want && !ids.includes(want)) ids.push(want);   // e.g. a saved conversation's model this server lacks
  ui.model.replaceChildren(...ids.map((id) => {
    const o = el("option", "", id);
    o.value = id;
    if (!state.models.includes(id)) o.textContent = `${id} (not served)`;
    else if (loadedNames.size && !loadedNames.has(id)) o.textContent = `${id} (not loaded)`;
    return o;
  }));
  if (!ids.length) {
    const none = el("option", "", "no model yet");
    none.value = "";
    ui.model.appendChild(none);
  }
  ui.model.value = want && ids.includes(want) ? want : ids[0] || "";
  if (c && !c.model && ui.model.value) c.model = ui.model.value;
  ui.emptyModel.textContent = ui.model.value
    ? `${ui.model.value}, running on this machine through llama.cpp.`
    : "Everything runs on this machine through llama.cpp.";
}

async function refreshModels() {
  try {
    const body = await getJSON("/v1/models");
    state.models = (body.data || []).map((m) => m.id);
    syncModelPicker();
  } catch (e) {
    if (e.status !== 503) showBanner(e.message, "models");   // 503: still loading; the status poll tries again
  }
}

let statusTimer = null;
async function refreshStatus() {
  clearTimeout(statusTimer);
  let next = 15000;
  try {
    const response = await call("/llmrun/status");
    if (!response.ok) throw await errorOf(response);
    state.status = await response.json();
    if (state.status.state !== "ready") next = 2000;
    else if (!state.models.length) await refreshModels();
    clearBanner("status", state.status.state === "ready" ? "model" : "");
  } catch (e) {
    next = keyDeclined ? 60000 : 5000;
    state.status = null;
    ui.serverState.textContent = e.status === 401 ? "API key needed" : "server unreachable";
    ui.serverState.className = "chip bad";
    showBanner(e.status === 401 && keyDeclined ? `${e.message} Press Send to enter it.` : e.message, "status");
  }
  if (state.status) renderStatus();
  statusTimer = setTimeout(refreshStatus, next);
}

function renderStatus() {
  const s = state.status;
  const model = loadedModel();
  const chip = ui.serverState;
  chip.className = `chip ${s.state === "ready" ? "ok" : s.state === "loading" ? "wait" : "bad"}`;
  const slots = s.models.reduce((n, m) => n + m.slots, 0);
  chip.textContent = s.state === "ready"
    ? `ready · ${s.models.length > 1 ? `${s.models.length} models` : `${slots} slot${slots === 1 ? "" : "s"}`}`
    : s.state === "loading" ? "loading model…" : s.state === "error" ? "model failed to load" : "unavailable";
  chip.title = s.error || "";
  if (s.error) showBanner(s.error, "status");

  renderModel(ui.modelFacts, ui.modelMemory, s, model);
  renderMachine(ui.machineFacts, ui.machineNotes, s);
  syncModelPicker();
  renderStats();
}

// ---- layout: drawers, the settings panel ----

const wide = window.matchMedia("(min-width: 1200px)");
const narrow = window.matchMedia("(max-width: 760px)");

function docked() { return wide.matches && state.settings.panel !== false; }

function layout() {
  ui.app.classList.toggle("panel-open", docked());
  $("open-panel").setAttribute("aria-expanded", String(docked() || ui.app.classList.contains("panel-drawer")));
}

function closeDrawers() {
  ui.app.classList.remove("sidebar-drawer", "panel-drawer");
  ui.scrim.hidden = true;
  layout();
}

function openDrawer(which) {
  ui.app.classList.add(which);
  ui.scrim.hidden = false;
  layout();
}

$("open-sidebar").addEventListener("click", () => openDrawer("sidebar-drawer"));
$("open-panel").addEventListener("click", () => {
  if (!wide.matches) { openDrawer("panel-drawer"); return; }   // narrower screens: the panel slides over
  state.settings.panel = !docked();
  saveSettings(state.settings);
  layout();
});
$("close-panel").addEventListener("click", () => {
  if (ui.app.classList.contains("panel-drawer")) { closeDrawers(); return; }
  state.settings.panel = false;
  saveSettings(state.settings);
  layout();
});
ui.scrim.addEventListener("click", closeDrawers);
wide.addEventListener("change", closeDrawers);
narrow.addEventListener("change", closeDrawers);

// ---- inputs ----

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

ui.input.addEventListener("input", autosize);
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
ui.stop.addEventListener("click", stop);
document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape" || ui.keyDialog.open) return;
  if (state.running) { e.preventDefault(); stop(); } else closeDrawers();
});
$("new-chat").addEventListener("click", () => { startNew(); closeDrawers(); });

ui.model.addEventListener("change", () => {
  if (!ui.model.value) return;
  state.current.model = ui.model.value;
  state.settings.model = ui.model.value;
  saveSettings(state.settings);
  persist();
  renderStats();
});

ui.system.addEventListener("input", () => {
  state.current.system = ui.system.value;
  state.settings.system = ui.system.value;
  saveSettings(state.settings);
  persist();
});

function showTemperature() { ui.temperatureValue.textContent = Number(state.settings.temperature).toFixed(2); }
ui.temperature.value = String(state.settings.temperature);
showTemperature();
ui.temperature.addEventListener("input", () => {
  state.settings.temperature = Number(ui.temperature.value);
  showTemperature();
  saveSettings(state.settings);
});

ui.maxTokens.value = state.settings.maxTokens ? String(state.settings.maxTokens) : "";
ui.maxTokens.addEventListener("input", () => {
  const v = ui.maxTokens.value.trim();
  const n = Number(v);
  const ok = v === "" || (Number.isInteger(n) && n >= 1);
  ui.maxTokens.classList.toggle("invalid", !ok);
  if (ok) {
    state.settings.maxTokens = v === "" ? null : n;
    saveSettings(state.settings);
  }
});

// ---- start ----

window.addEventListener("storage", (e) => {   // another tab changed the conversations: show them
  if (e.key !== "llmrun.conversations" || state.running) return;
  const id = state.current && state.current.id;
  state.conversations = loadConversations();
  const again = state.conversations.find((c) => c.id === id);
  if (again) select(again); else startNew();
});

state.conversations.sort((a, b) => b.updated - a.updated);
if (state.conversations.length) select(state.conversations[0]); else startNew();
layout();
ui.input.focus();
refreshStatus();
document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshStatus(); });
