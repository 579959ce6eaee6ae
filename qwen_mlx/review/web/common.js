// Shared by the review and grading pages of `qwen-mlx review`: the server's API (with the
// key, asked for once per tab), the reviewer's name (asked for once per tab unless the
// server was started with --reviewer) and building nodes from text.
// Data and model text is untrusted: it only ever reaches the page as text nodes.
"use strict";

const KEY_STORE = "qwen-mlx-api-key";
const NAME_STORE = "qwen-mlx-reviewer";
const POLL_MS = 4000; // how often the page looks for other people's decisions
const $ = (id) => document.getElementById(id);

class NeedKey extends Error {}

// A node with `text` as its text (never parsed as HTML) and an optional class.
function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("key").focus();
}

// A call to the server; 401 asks for the key. Returns {status, body} for the caller to
// read (a 409 conflict carries the other decision).
async function call(path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const options = { headers };
  if (body !== undefined) {
    options.method = "POST";
    headers["content-type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const reply = await fetch(path, options);
  if (reply.status === 401) {
    sessionStorage.removeItem(KEY_STORE);
    askForKey(key ? "密钥无效，请重新输入。" : "");
    throw new NeedKey("the API key is missing or wrong");
  }
  let parsed = null;
  try {
    parsed = await reply.json();
  } catch {
    parsed = { error: { message: `HTTP ${reply.status}` } };
  }
  return { status: reply.status, body: parsed };
}

async function getJSON(path) {
  const { status, body } = await call(path);
  if (status !== 200) throw new Error(body.error ? body.error.message : `HTTP ${status}`);
  return body;
}

function errorText(body) {
  return body && body.error ? body.error.message : "保存失败";
}

// The name decisions are recorded under: the server's --reviewer, else asked once per tab.
function reviewerName(info) {
  return info.reviewer || sessionStorage.getItem(NAME_STORE);
}

function askForName(then) {
  $("name-form").hidden = false;
  $("name").focus();
  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name").value.trim();
    if (!name) return;
    sessionStorage.setItem(NAME_STORE, name);
    $("name-form").hidden = true;
    then();
  });
}

function showReviewer(info) {
  $("reviewer").textContent = `审核人：${reviewerName(info)}`;
}

// Loads the page's data (after the key and the name, when needed), then marks it ready.
function boot(load) {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key").value.trim());
    $("key").value = "";
    begin();
  });
  async function begin() {
    let info;
    try {
      info = await getJSON("/api/info");
    } catch (err) {
      if (!(err instanceof NeedKey)) $("title").textContent = `无法连接服务器：${err.message}`;
      return;
    }
    $("key-form").hidden = true;
    const go = async () => {
      showReviewer(info);
      await load(info);
      document.body.dataset.ready = "true";
    };
    if (reviewerName(info)) go();
    else askForName(go);
  }
  begin();
}

// Whether a key press belongs to a text field (then it types, it is no shortcut).
function typing(event) {
  const tag = event.target.tagName;
  return tag === "TEXTAREA" || tag === "INPUT" || tag === "SELECT";
}
