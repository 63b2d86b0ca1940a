// Markdown to DOM nodes, for model output. Every piece of text becomes a text node (createTextNode /
// textContent); no string is ever parsed as HTML, so `<img onerror=...>` in a reply is shown as the characters
// it is. Links keep only http(s) and mailto targets. Handles a reply that is still streaming: an unclosed code
// fence is shown as code so far.
//
// Blocks: fenced code (``` or ~~~, with a language and a copy button), headings, paragraphs, lists (nested by
// indentation, ordered or not, task boxes as text), block quotes, tables, rules. Inline: `code`, **bold**,
// *italic*, ~~strike~~, [links](url) and bare web addresses (http, https and mailto only).

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// The copy action for code blocks is given by the page (clipboard handling lives there).
let copyHandler = null;
export function setCopyHandler(fn) { copyHandler = fn; }

export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  for (const node of blocks(text.replace(/\r\n?/g, "\n").split("\n"))) fragment.appendChild(node);
  return fragment;
}

function startsBlock(line, next) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line) ||
    (line.includes("|") && next !== undefined && TABLE_SEP.test(next) && next.includes("-"));
}

function blocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }
    let m;
    if ((m = FENCE.exec(line))) {
      const fence = m[1], lang = m[2];
      const closing = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}\\s*$`);
      const body = [];
      i++;
      while (i < lines.length && !closing.test(lines[i])) { body.push(lines[i]); i++; }
      if (i >= lines.length) while (body.length && !body[body.length - 1].trim()) body.pop();   // still streaming
      i++;   // past the closing fence
      out.push(codeBlock(body.join("\n"), lang));
      continue;
    }
    if ((m = HEADING.exec(line))) {
      const h = el(`h${Math.min(m[1].length + 2, 6)}`, "md-h");
      inline(m[2], h);
      out.push(h);
      i++;
      continue;
    }
    if (RULE.test(line)) { out.push(el("hr")); i++; continue; }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && lines[i].trim() && QUOTE.test(lines[i])) { inner.push(QUOTE.exec(lines[i])[1]); i++; }
      const q = el("blockquote");
      for (const node of blocks(inner)) q.appendChild(node);
      out.push(q);
      continue;
    }
    if (ITEM.test(line)) { i = list(lines, i, out); continue; }
    if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      i = table(lines, i, out);
      continue;
    }
    const para = [line];
    i++;
    while (i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1])) { para.push(lines[i]); i++; }
    const p = el("p");
    inline(para.join("\n"), p);
    out.push(p);
  }
  return out;
}

function list(lines, i, out) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    i++;
    // the item goes on over indented lines, nested items and blank lines followed by indented lines
    while (i < lines.length) {
      const l = lines[i];
      const nested = ITEM.exec(l);
      if (l.trim() && (l.length - l.trimStart().length) > indent && (!nested || nested[1].length > indent)) {
        body.push(l.slice(Math.min(indent + 2, l.length - l.trimStart().length)));
        i++;
      } else if (!l.trim() && i + 1 < lines.length && lines[i + 1].trim() &&
                 (lines[i + 1].length - lines[i + 1].trimStart().length) > indent) {
        body.push("");
        i++;
      } else {
        break;
      }
    }
    const li = el("li");
    const inner = blocks(body);
    // a one-paragraph item shows its text without a paragraph margin
    if (inner.length && inner[0].tagName === "P") {
      while (inner[0].firstChild) li.appendChild(inner[0].firstChild);
      inner.shift();
    }
    for (const n of inner) li.appendChild(n);
    node.appendChild(li);
    while (i < lines.length && !lines[i].trim() && i + 1 < lines.length && ITEM.test(lines[i + 1]) &&
           ITEM.exec(lines[i + 1])[1].length === indent) i++;   // loose lists: a blank line between items
  }
  out.push(node);
  return i;
}

function cells(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function table(lines, i, out) {
  const head = cells(lines[i]);
  const aligns = cells(lines[i + 1]).map((c) => (c.startsWith(":") && c.endsWith(":") ? "center"
    : c.endsWith(":") ? "right" : ""));
  const wrap = el("div", "md-table");
  const t = el("table");
  const tr = el("tr");
  head.forEach((c, k) => { const th = el("th"); if (aligns[k]) th.className = `a-${aligns[k]}`; inline(c, th); tr.appendChild(th); });
  t.appendChild(el("thead")).appendChild(tr);
  const body = el("tbody");
  i += 2;
  while (i < lines.length && lines[i].trim() && lines[i].includes("|")) {
    const row = el("tr");
    cells(lines[i]).slice(0, head.length).forEach((c, k) => {
      const td = el("td");
      if (aligns[k]) td.className = `a-${aligns[k]}`;
      inline(c, td);
      row.appendChild(td);
    });
    body.appendChild(row);
    i++;
  }
  t.appendChild(body);
  wrap.appendChild(t);
  out.push(wrap);
  return i;
}

function codeBlock(code, lang) {
  const figure = el("figure", "code");
  const bar = el("figcaption", "code-bar");
  bar.appendChild(el("span", "code-lang", lang || "text"));
  const copy = el("button", "code-copy", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => copyHandler && copyHandler(code, copy));
  bar.appendChild(copy);
  figure.appendChild(bar);
  const pre = el("pre");
  pre.appendChild(el("code", lang ? `lang-${lang.replace(/[^\w-]/g, "")}` : "", code));
  figure.appendChild(pre);
  return figure;
}

// inline spans, found left to right; the earliest match wins, then the rest of the text is scanned again
const SPANS = [
  { re: /(`+)([\s\S]*?[^`])\1(?!`)/, make: (m) => el("code", "", m[2].replace(/^ (.*) $/, "$1")) },
  // an image is never loaded (the page shows no remote content): it becomes a link to it
  { re: /!\[([^\]\n]*)\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)/, make: (m) => link(`image: ${m[1] || m[2]}`, m[2], m[0]) },
  { re: /\[([^\]\n]+)\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)/, make: (m) => link(m[1], m[2], m[0]) },
  { re: /\bhttps?:\/\/[^\s<>()]*[^\s<>().,;:!?'"*_~]/, make: (m) => link(m[0], m[0], m[0], true) },
  { re: /(\*\*|__)(?=\S)([\s\S]*?\S)\1/, make: (m) => wrap("strong", m[2]) },
  { re: /~~(?=\S)([\s\S]*?\S)~~/, make: (m) => wrap("del", m[1]) },
  { re: /(^|[^\w*])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?![\w*])/, make: (m) => wrap("em", m[2]), lead: 1 },
  { re: /(^|[^\w_])_(?=[^\s_])([^_\n]*?[^\s_])_(?![\w_])/, make: (m) => wrap("em", m[2]), lead: 1 },
];

function wrap(tag, text) {
  const node = el(tag);
  inline(text, node);
  return node;
}

// an <a> to an absolute http(s) or mailto address, or else the source text as it was written
function link(label, href, source, plain) {
  let url = null;
  try {
    const u = new URL(href);   // absolute addresses only: a relative one would point into this server
    if (u.protocol === "http:" || u.protocol === "https:" || u.protocol === "mailto:") url = u.href;
  } catch (_) { url = null; }
  if (url === null) return document.createTextNode(source);
  const a = el("a");
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  if (plain) a.textContent = label; else inline(label, a);
  return a;
}

function inline(text, parent) {
  let rest = text;
  while (rest) {
    let best = null;
    for (const span of SPANS) {
      const m = span.re.exec(rest);
      if (!m) continue;
      const lead = span.lead ? m[span.lead].length : 0;
      const at = m.index + lead;
      if (best === null || at < best.at) best = { at, m, span, lead };
    }
    if (best === null) { parent.appendChild(document.createTextNode(rest)); return; }
    if (best.at > 0) parent.appendChild(document.createTextNode(rest.slice(0, best.at)));
    parent.appendChild(best.span.make(best.m));
    rest = rest.slice(best.m.index + best.m[0].length);
  }
}
