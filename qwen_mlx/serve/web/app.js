// The chat page of `qwen-mlx serve`: streams replies from /v1/chat/completions and, on a run
// served with its base model, asks both and shows the answers side by side.
// Model output is untrusted: it only ever reaches the page as text nodes (never innerHTML),
// so no HTML or script in a reply can run.
"use strict";

const KEY_STORE = "qwen-mlx-api-key";
const END_OF_TURN = "<|im_end|>";
const $ = (id) => document.getElementById(id);

const state = { info: null, turns: [], controller: null };

// ------------------------------------------------------------------ the server's API

class NeedKey extends Error {}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const reply = await fetch(path, { ...options, headers });
  if (reply.status === 401) {
    sessionStorage.removeItem(KEY_STORE);
    askForKey(key ? "密钥无效，请重新输入。" : "");
    throw new NeedKey("the API key is missing or wrong");
  }
  if (!reply.ok) throw new Error(await errorMessage(reply));
  return reply;
}

async function errorMessage(reply) {
  try {
    return (await reply.json()).error.message;
  } catch {
    return `HTTP ${reply.status}`;
  }
}

// Reads the server-sent events of a streamed completion, handing each text delta to onText.
async function streamChat(model, messages, onText, signal) {
  const body = {
    model,
    messages,
    stream: true,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    stop: [END_OF_TURN],
  };
  const reply = await api("/v1/chat/completions", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
  const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) readEvent(event, onText);
  }
}

function readEvent(event, onText) {
  const data = event.replace(/^data: /, "");
  if (data === "[DONE]") return;
  const message = JSON.parse(data);
  if (message.error) throw new Error(message.error.message);
  const delta = message.choices.length ? message.choices[0].delta : {};
  if (delta.content) onText(delta.content);
}

// ------------------------------------------------------------------ safe Markdown
// A small subset (paragraphs, headings, lists, tables, code, bold, italics), built as DOM
// nodes from text, so nothing in the text is ever parsed as HTML.

function el(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) appendInline(node, text);
  return node;
}

function appendInline(parent, text) {
  const pattern = /(`[^`]+`)|(\*\*[^*]+\*\*)|(\*[^*\s][^*]*\*)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    parent.append(text.slice(last, match.index));
    const token = match[0];
    const [tag, inner] = token.startsWith("`")
      ? ["code", token.slice(1, -1)]
      : token.startsWith("**")
        ? ["strong", token.slice(2, -2)]
        : ["em", token.slice(1, -1)];
    const node = document.createElement(tag);
    node.textContent = inner;
    parent.append(node);
    last = match.index + token.length;
  }
  parent.append(text.slice(last));
}

const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;

const BLOCKS = [
  { starts: (l) => l.trimStart().startsWith("```"), read: readFence },
  { starts: (l, next) => l.includes("|") && TABLE_RULE.test(next || ""), read: readTable },
  { starts: (l) => LIST_ITEM.test(l), read: readList },
  { starts: (l) => HEADING.test(l), read: readHeading },
];

function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    if (!lines[i].trim()) {
      i += 1;
      continue;
    }
    const block = BLOCKS.find((b) => b.starts(lines[i], lines[i + 1])) || { read: readParagraph };
    i = block.read(lines, i, out);
  }
  return out;
}

function readFence(lines, i, out) {
  let end = i + 1;
  while (end < lines.length && !lines[end].trimStart().startsWith("```")) end += 1;
  const code = document.createElement("code");
  code.textContent = lines.slice(i + 1, end).join("\n");
  out.append(el("pre")).lastChild.append(code);
  return end + 1;
}

function cells(line) {
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

function readTable(lines, i, out) {
  const table = el("table");
  const head = table.appendChild(el("tr"));
  for (const cell of cells(lines[i])) head.append(el("th", cell));
  let end = i + 2;
  for (; end < lines.length && lines[end].includes("|"); end += 1) {
    const row = table.appendChild(el("tr"));
    for (const cell of cells(lines[end])) row.append(el("td", cell));
  }
  out.append(table);
  return end;
}

function readList(lines, i, out) {
  const ordered = /^\s*\d/.test(lines[i]);
  const list = el(ordered ? "ol" : "ul");
  let end = i;
  for (; end < lines.length && LIST_ITEM.test(lines[end]); end += 1) {
    list.append(el("li", lines[end].match(LIST_ITEM)[2]));
  }
  out.append(list);
  return end;
}

function readHeading(lines, i, out) {
  const [, marks, title] = lines[i].match(HEADING);
  out.append(el(`h${Math.min(marks.length + 2, 6)}`, title));
  return i + 1;
}

function readParagraph(lines, i, out) {
  const p = el("p");
  let end = i;
  const startsBlock = (j) => BLOCKS.some((b) => b.starts(lines[j], lines[j + 1]));
  for (; end < lines.length && lines[end].trim() && (end === i || !startsBlock(end)); end += 1) {
    if (end > i) p.append(el("br"));
    appendInline(p, lines[end]);
  }
  out.append(p);
  return end;
}

// ------------------------------------------------------------------ the conversation

function models() {
  const { info } = state;
  const compare = info.base && $("compare").checked;
  return compare
    ? [
        { id: info.base, label: `基座 · ${info.base}` },
        { id: info.model, label: `微调 · ${info.model}` },
      ]
    : [{ id: info.model, label: info.model }];
}

function history(modelId) {
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }] : [];
  for (const turn of state.turns) {
    messages.push({ role: "user", content: turn.question });
    const answer = turn.answers[modelId];
    if (answer) messages.push({ role: "assistant", content: answer });
  }
  return messages;
}

function addTurn(question, columns) {
  const turn = { question, answers: {} };
  const node = $("log").appendChild(el("section"));
  node.className = "turn";
  node.append(el("div", question));
  node.lastChild.className = "user";
  const row = node.appendChild(el("div"));
  row.className = `answers columns-${columns.length}`;
  const bodies = {};
  for (const { id, label } of columns) {
    const answer = row.appendChild(el("article"));
    answer.className = "answer";
    answer.dataset.model = id;
    answer.dataset.state = "waiting";
    answer.append(el("header", label));
    bodies[id] = answer.appendChild(el("div"));
    bodies[id].className = "body";
  }
  state.turns.push(turn);
  node.scrollIntoView({ block: "end" });
  return { turn, bodies };
}

async function answerWith(model, turn, body, signal) {
  const answer = body.parentElement;
  let text = "";
  let pending = false;
  const paint = () => {
    pending = false;
    body.replaceChildren(renderMarkdown(text));
  };
  answer.dataset.state = "streaming";
  try {
    await streamChat(model, history(model), (piece) => {
      text += piece;
      turn.answers[model] = text;
      if (!pending) pending = requestAnimationFrame(paint);
    }, signal);
    answer.dataset.state = "done";
  } catch (err) {
    answer.dataset.state = signal.aborted ? "stopped" : "error";
    const note = el("p", signal.aborted ? "（已停止）" : err.message);
    note.className = "error";
    if (!(err instanceof NeedKey)) body.after(note);
  }
  paint();
}

async function send() {
  const question = $("question").value.trim();
  if (!question || state.controller || !state.info) return;
  $("question").value = "";
  const columns = models();
  const { turn, bodies } = addTurn(question, columns);
  state.controller = new AbortController();
  $("send").textContent = "停止";
  // One model in memory answers one request at a time, so the columns are asked in turn.
  for (const { id } of columns) {
    if (state.controller.signal.aborted) break;
    delete turn.answers[id];
    await answerWith(id, turn, bodies[id], state.controller.signal);
  }
  state.controller = null;
  $("send").textContent = "发送";
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.turns = [];
  $("log").replaceChildren();
}

// ------------------------------------------------------------------ the page around it

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("key").focus();
}

async function showFile(path, title) {
  const reply = await api(path);
  $("panel-title").textContent = title;
  const isImage = path.endsWith(".png");
  $("report-frame").hidden = isImage;
  $("loss-image").hidden = !isImage;
  if (isImage) $("loss-image").src = URL.createObjectURL(await reply.blob());
  else $("report-frame").srcdoc = await reply.text(); // sandboxed: its scripts cannot run
  $("panel").hidden = false;
}

async function start() {
  let info;
  try {
    info = await (await api("/ui/info")).json();
  } catch (err) {
    if (!(err instanceof NeedKey)) $("model-name").textContent = `cannot reach the server: ${err.message}`;
    return;
  }
  state.info = info;
  $("key-form").hidden = true;
  $("model-name").textContent = info.model;
  $("compare-label").hidden = !info.base;
  $("show-report").hidden = !info.report;
  $("show-loss").hidden = !info.loss;
  if (info.system_prompt && !$("system").value) $("system").value = info.system_prompt;
  document.body.dataset.ready = "true";
}

function onEnter(event) {
  // While an IME is composing (Chinese pinyin …), Enter picks the candidate: never send then.
  if (event.key !== "Enter" || event.shiftKey) return;
  if (event.isComposing || event.keyCode === 229) return;
  event.preventDefault();
  send();
}

function wire() {
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.controller) state.controller.abort();
    else send();
  });
  $("question").addEventListener("keydown", onEnter);
  $("new-chat").addEventListener("click", newChat);
  $("compare").addEventListener("change", newChat); // each side keeps its own history
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key").value.trim());
    $("key").value = "";
    start();
  });
  $("show-report").addEventListener("click", () => showFile("/run/eval/report.html", "评估报告"));
  $("show-loss").addEventListener("click", () => showFile("/run/loss.png", "损失曲线"));
  $("panel-close").addEventListener("click", () => ($("panel").hidden = true));
}

wire();
start();
