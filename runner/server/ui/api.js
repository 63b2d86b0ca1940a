// Talking to the llmrun server that served this page: the API key (asked for only when the server answers
// 401, kept in sessionStorage for this tab), JSON calls, the OpenAI streaming route read as server-sent events,
// and errors turned into sentences a person can act on.

const KEY = "llmrun.apiKey";

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let askForKey = async () => null;   // set by the page: shows the key dialog, resolves to a key or null
export function onKeyNeeded(fn) { askForKey = fn; }

function storedKey() {
  try { return sessionStorage.getItem(KEY); } catch (_) { return null; }
}

export function forgetKey() {
  try { sessionStorage.removeItem(KEY); } catch (_) { /* storage off: nothing kept */ }
}

// fetch with the key; on 401 ask for a key and try again, until the server accepts one or the person cancels
export async function call(path, options = {}) {
  let wrong = false;
  for (;;) {
    const key = storedKey();
    const headers = new Headers(options.headers || {});
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers, cache: "no-store" });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(`Cannot reach the llmrun server at ${location.host}: is \`llmrun serve\` still running?`, 0,
                         "unreachable");
    }
    if (response.status !== 401) return response;
    const given = await askForKey(wrong || Boolean(key));
    if (!given) throw new ApiError("This server needs an API key (the one given to `llmrun serve --api-key`).", 401,
                                   "invalid_api_key");
    try { sessionStorage.setItem(KEY, given); } catch (_) { /* storage off: the key is asked again next time */ }
    wrong = true;
  }
}

// the error a response carries, as a sentence (OpenAI shape {"error": {"message"}} or Ollama {"error": "..."})
export async function errorOf(response) {
  let message = "";
  let code = null;
  try {
    const body = await response.json();
    const e = body && body.error;
    message = typeof e === "string" ? e : (e && e.message) || "";
    code = e && typeof e === "object" ? e.code : null;
  } catch (_) { /* not JSON */ }
  const status = response.status;
  if (status === 503) {
    message = `The model is not ready: ${message || "it is still loading"}. Try again in a moment.`;
  } else if (status === 404 && code === "model_not_found") {
    message = `${message} Pick another model at the top.`;
  } else if (status === 429) {
    message = message || "The server is busy. Retry shortly.";
  } else if (!message) {
    message = `The server answered ${status} ${response.statusText}.`;
  }
  return new ApiError(message, status, code);
}

export async function getJSON(path) {
  const response = await call(path);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// POST /v1/chat/completions with stream: true. Calls onStart(response) once the answer's headers are in, then
// yields each parsed event (the objects OpenAI sends); ends at [DONE]. An error event raises ApiError.
export async function* streamChat(body, { signal, onStart }) {
  const response = await call("/v1/chat/completions", {
    method: "POST", signal, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) throw await errorOf(response);
  if (onStart) onStart(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const raw = buffer.slice(0, end);
      buffer = buffer.slice(end + buffer.slice(end).match(/^\r?\n\r?\n/)[0].length);
      const data = raw.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(event.error.message || String(event.error), 500, event.error.code);
      yield event;
    }
  }
  throw new ApiError("The reply ended before the server said it was done (the connection was cut).", 0, "cut");
}
