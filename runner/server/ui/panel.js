// The settings panel's two read-only parts, from GET /llmrun/status: the model (what is loaded, its context and
// slots, llama.cpp's real buffers per device as a stacked bar against the device's memory) and the machine.

const TERM_NAMES = { weights: "weights", repack: "repacked weights", kv_cache: "KV cache", compute: "compute",
                     output: "output" };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function formatBytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

function fact(dl, term, value) {
  if (value === null || value === undefined || value === "") return;
  dl.append(el("dt", "", term), el("dd", "", String(value)));
}

// `model`: the entry of status.models this conversation talks to, or null
export function renderModel(mf, box, s, model) {
  mf.replaceChildren();
  box.replaceChildren();
  if (!model) {
    fact(mf, "state", s.state === "loading" ? "loading…" : s.error || s.state);
  } else {
    fact(mf, "name", model.name);
    fact(mf, "model", [model.family, model.parameter_size, model.quantization].filter(Boolean).join(" · "));
    fact(mf, "file", model.size_bytes ? formatBytes(model.size_bytes) : null);
    fact(mf, "context", `${model.context_per_slot} tokens per request` +
      (model.trained_context ? ` (trained on ${model.trained_context})` : ""));
    fact(mf, "slots", `${model.busy_slots} busy of ${model.slots}` + (model.queued ? `, ${model.queued} waiting` : ""));
    if (model.load_seconds) fact(mf, "loaded in", `${model.load_seconds.toFixed(1)} s`);
    renderMemory(box, model.memory);
  }
}

export function renderMachine(hf, notes, s) {
  const m = s.machine;
  hf.replaceChildren();
  notes.replaceChildren();
  if (!m) {
    fact(hf, "probe", s.machine_error || "…");
  } else {
    fact(hf, "CPU", m.cpu);
    fact(hf, "cores", `${m.physical_cores} physical, ${m.logical_cores} logical; ${m.threads} threads`);
    fact(hf, "RAM", `${formatBytes(m.ram_total_bytes)}, ${formatBytes(m.ram_available_bytes)} free`);
    m.gpus.forEach((g) => fact(hf, `GPU ${g.index}`, `${g.name}, ${formatBytes(g.total_bytes)} (${formatBytes(g.free_bytes)} free)`));
    if (!m.gpus.length) fact(hf, "GPU", "none");
    if (m.memory_bandwidth_gbps) fact(hf, "bandwidth", `${m.memory_bandwidth_gbps.toFixed(1)} GB/s`);
    if (m.disk_free_bytes) fact(hf, "disk free", formatBytes(m.disk_free_bytes));
    for (const note of m.notes) notes.appendChild(el("li", "", note));
  }
}

function renderMemory(box, devices) {
  for (const d of devices) {
    const row = el("div", "mem");
    const label = el("div", "mem-label");
    label.append(el("strong", "", d.device === "CPU" ? "RAM" : d.device),
                 el("span", "", d.capacity_bytes ? `${formatBytes(d.total_bytes)} of ${formatBytes(d.capacity_bytes)}`
                   : formatBytes(d.total_bytes)));
    const bar = el("div", "mem-bar");
    bar.setAttribute("role", "img");
    const scale = d.capacity_bytes || d.total_bytes || 1;
    const described = [];
    for (const [term, bytes] of Object.entries(d.terms)) {
      const seg = el("span", `seg t-${term}`);
      seg.style.width = `${Math.max(0.6, (100 * bytes) / scale)}%`;
      seg.title = `${TERM_NAMES[term] || term}: ${formatBytes(bytes)}`;
      bar.appendChild(seg);
      described.push(seg.title);
    }
    bar.setAttribute("aria-label", `${d.device}: ${described.join(", ")}`);
    const legend = el("ul", "mem-legend");
    for (const [term, bytes] of Object.entries(d.terms)) {
      const li = el("li", `t-${term}`);
      li.append(el("i"), document.createTextNode(`${TERM_NAMES[term] || term} ${formatBytes(bytes)}`));
      legend.appendChild(li);
    }
    row.append(label, bar, legend);
    box.appendChild(row);
  }
  if (devices.length) box.appendChild(el("p", "mem-note", "llama.cpp's own buffers for this model, per device."));
}
