// What the page keeps in this browser's localStorage: the conversations and the settings. Nothing leaves the
// browser except the requests the page sends to the llmrun server that served it.

const CONVERSATIONS = "llmrun.conversations";
const SETTINGS = "llmrun.settings";
export const DEFAULT_SYSTEM = "You are a helpful assistant.";   // as `llmrun chat`
const DEFAULTS = { temperature: 0.8, maxTokens: null, system: DEFAULT_SYSTEM, model: null, panel: null };

let onError = () => {};
export function onStorageError(fn) { onError = fn; }

function read(key, fallback) {
  try {
    const text = localStorage.getItem(key);
    return text === null ? fallback : JSON.parse(text);
  } catch (_) {
    return fallback;
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch (e) {
    onError(e);
    return false;
  }
}

export function loadSettings() {
  const s = read(SETTINGS, {});
  return { ...DEFAULTS, ...(s && typeof s === "object" ? s : {}) };
}

export function saveSettings(settings) { write(SETTINGS, settings); }

function valid(c) {
  return c && typeof c.id === "string" && Array.isArray(c.messages) &&
    c.messages.every((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string");
}

export function loadConversations() {
  const list = read(CONVERSATIONS, []);
  return Array.isArray(list) ? list.filter(valid) : [];
}

export function saveConversations(list) { return write(CONVERSATIONS, list); }

export function newConversation(settings) {
  const id = (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`).toString();
  return { id, title: "", model: settings.model, system: settings.system, messages: [], updated: Date.now() };
}

export function titleOf(conversation) {
  if (conversation.title) return conversation.title;
  const first = conversation.messages.find((m) => m.role === "user");
  if (!first) return "New chat";
  const line = first.content.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}
