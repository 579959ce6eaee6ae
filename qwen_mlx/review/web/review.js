// The data review page of `qwen-mlx review DATA`: a list of records (filtered, searched),
// one shown with its source passage; accept, edit or reject it by button or key. Each
// decision is saved at once; one that crosses another person's is shown to choose from.
"use strict";

const STATUS_LABELS = { unreviewed: "未审核", accepted: "已通过", edited: "已修改", rejected: "已驳回" };
const CATEGORY_LABELS = {
  answerable: "可回答",
  paraphrase: "改写问法",
  followup: "追问",
  unanswerable: "细则未涉及",
};
const ROLE_LABELS = { system: "系统", user: "用户", assistant: "助手", tool: "工具" };
const FIELDS = ["question", "input", "answer"];

const S = {
  info: null,
  records: [],
  byId: new Map(),
  passages: {},
  shown: [], // the records the filters let through, in file order
  at: -1, // position of the current record in `shown`
  editing: false,
  conflict: null, // {rec, action, fields, current}
  seq: 0,
  busy: false, // a decision is being saved: keys wait for it (no two at once on one record)
};

const statusOf = (rec) => (rec.status === "accepted" && rec.edited ? "edited" : rec.status);
const textOf = (rec) => rec.edits || rec.fields; // what the record says now
const currentRecord = () => (S.at >= 0 ? S.shown[S.at] : null);

// ------------------------------------------------------------------ the list

function listRow(rec) {
  const row = el("li");
  row.dataset.id = rec.id;
  row.append(el("span", "", "badge"), el("span", "", "q"));
  row.addEventListener("click", () => select(S.shown.indexOf(rec)));
  rec.node = row;
  paintRow(rec);
  return row;
}

function paintRow(rec) {
  const status = statusOf(rec);
  rec.node.dataset.status = status;
  rec.node.querySelector(".badge").textContent = STATUS_LABELS[status];
  rec.node.querySelector(".q").textContent = textOf(rec).question || textOf(rec).answer;
}

function matches(rec, f) {
  if (f.file && rec.file !== f.file) return false;
  if (f.heading && rec.heading !== f.heading) return false;
  if (f.category && rec.category !== f.category) return false;
  if (f.status && statusOf(rec) !== f.status) return false;
  if (!f.search) return true;
  const words = Object.values(textOf(rec)).join("\n").toLowerCase();
  return words.includes(f.search);
}

function applyFilters() {
  const f = {
    file: $("filter-file").value,
    heading: $("filter-heading").value,
    category: $("filter-category").value,
    status: $("filter-status").value,
    search: $("search").value.trim().toLowerCase(),
  };
  const keep = currentRecord();
  S.shown = S.records.filter((rec) => matches(rec, f));
  const shown = new Set(S.shown);
  for (const rec of S.records) rec.node.hidden = !shown.has(rec);
  $("shown").textContent = `显示 ${S.shown.length} 条`;
  const again = S.shown.indexOf(keep);
  select(again >= 0 ? again : S.shown.length ? 0 : -1);
}

function progress(counts) {
  $("progress").textContent = `${counts.reviewed} / ${counts.total} 已审核`;
}

// ------------------------------------------------------------------ one record

function select(index) {
  if (S.editing) stopEditing();
  $("conflict").hidden = true;
  $("cluster").hidden = true;
  for (const rec of S.records) rec.node.classList.remove("selected");
  S.at = index;
  const rec = currentRecord();
  $("record").hidden = !rec;
  $("empty").hidden = !!rec;
  if (!rec) return;
  rec.node.classList.add("selected");
  rec.node.scrollIntoView({ block: "nearest" });
  paintRecord(rec);
}

function paintRecord(rec) {
  const where = [`${rec.file}:${rec.line}`, CATEGORY_LABELS[rec.category]];
  if (rec.kind) where.push(`kind: ${rec.kind}`);
  if (rec.cluster !== null) where.push(`簇 ${rec.cluster}`);
  if (rec.rewords) where.push(`改写自：${rec.rewords}`);
  $("meta").textContent = where.join(" · ");
  const who = rec.reviewer ? `（${rec.reviewer}，${rec.time}）` : "";
  $("state-line").textContent = `${STATUS_LABELS[statusOf(rec)]}${who}`;
  $("state-line").dataset.status = statusOf(rec);
  $("context").replaceChildren(
    ...rec.context.map((turn) => el("p", `${ROLE_LABELS[turn.role] || turn.role}：${turn.content}`, "turn")),
  );
  const text = textOf(rec);
  for (const name of FIELDS) $(`show-${name}`).textContent = text[name] ?? "";
  $("input-field").hidden = !("input" in rec.fields);
  const passage = rec.chunk ? S.passages[rec.chunk] : null;
  $("passage-box").hidden = !passage;
  if (passage) {
    $("passage-where").textContent = [passage.file, rec.heading || passage.heading].filter(Boolean).join(" · ");
    $("passage").textContent = passage.text;
  }
  $("save-error").textContent = "";
}

function startEditing() {
  const rec = currentRecord();
  if (!rec || S.editing) return;
  S.editing = true;
  const text = textOf(rec);
  for (const name of FIELDS) {
    const box = $(`edit-${name}`);
    box.value = text[name] ?? "";
    box.hidden = !(name in rec.fields);
    $(`show-${name}`).hidden = true;
  }
  for (const id of ["accept", "edit", "reject"]) $(id).hidden = true;
  $("save").hidden = $("cancel").hidden = false;
  $("edit-answer").focus();
}

function stopEditing() {
  S.editing = false;
  for (const name of FIELDS) {
    $(`edit-${name}`).hidden = true;
    $(`show-${name}`).hidden = false;
  }
  for (const id of ["accept", "edit", "reject"]) $(id).hidden = false;
  $("save").hidden = $("cancel").hidden = true;
}

function editedFields(rec) {
  const out = {};
  for (const name of FIELDS) if (name in rec.fields) out[name] = $(`edit-${name}`).value;
  return out;
}

// ------------------------------------------------------------------ decisions

function applyState(state) {
  const rec = S.byId.get(state.id);
  if (!rec) return;
  Object.assign(rec, state);
  paintRow(rec);
  if (rec === currentRecord() && !S.editing) paintRecord(rec);
}

async function send(rec, action, fields, baseVersion) {
  const body = { id: rec.id, action, base_version: baseVersion ?? rec.version, reviewer: reviewerName(S.info) };
  if (fields) body.fields = fields;
  const { status, body: reply } = await call("/api/decide", body);
  if (status === 200) {
    applyState(reply.state);
    progress(reply.counts);
  }
  return { status, reply };
}

async function decide(action, fields) {
  const rec = currentRecord();
  if (!rec) return false;
  $("save-error").textContent = "";
  const { status, reply } = await send(rec, action, fields);
  if (status === 409) {
    showConflict(rec, action, fields, reply.current);
    return false;
  }
  if (status !== 200) {
    $("save-error").textContent = errorText(reply);
    return false;
  }
  return true;
}

async function quick(action) {
  if (S.editing || S.busy || !$("conflict").hidden) return;
  S.busy = true;
  try {
    if ((await decide(action)) && S.at < S.shown.length - 1) select(S.at + 1);
  } finally {
    S.busy = false;
  }
}

async function save() {
  if (S.busy) return;
  S.busy = true;
  try {
    await saveEdit();
  } finally {
    S.busy = false;
  }
}

async function saveEdit() {
  const rec = currentRecord();
  const fields = editedFields(rec);
  const before = textOf(rec).answer;
  if (!(await decide("edit", fields))) return;
  stopEditing();
  paintRecord(rec);
  if (fields.answer !== before) offerCluster(rec, fields.answer);
}

// ------------------------------------------------------------------ two people, one record

// Every field of a version, so a clash over the question or input shows too.
function fieldsText(fields) {
  const names = { question: "问题", input: "输入", answer: "答案" };
  return FIELDS.filter((name) => name in fields && (name !== "input" || fields.input))
    .map((name) => `${names[name]}：${fields[name]}`)
    .join("\n");
}

function showConflict(rec, action, fields, current) {
  S.conflict = { rec, action, fields, current };
  const theirs = current.edits || rec.fields;
  const what = current.status === "rejected" ? "驳回了此记录" : current.edited ? "修改了此记录" : "通过了此记录";
  $("conflict-text").textContent =
    `${current.reviewer || "其他人"} 在 ${current.time} ${what}（在您载入之后）。您的${action === "edit" ? "修改" : "决定"}尚未保存：请选择保留哪一个。`;
  $("conflict-theirs").textContent = current.status === "rejected" ? "（已驳回）" : fieldsText(theirs);
  $("conflict-mine").textContent = fields ? fieldsText(fields) : STATUS_LABELS[action === "reject" ? "rejected" : "accepted"];
  $("conflict").hidden = false;
}

async function mineWins() {
  const { rec, action, fields, current } = S.conflict;
  const { status, reply } = await send(rec, action, fields, current.version);
  if (status === 409) return showConflict(rec, action, fields, reply.current);
  if (status !== 200) return ($("save-error").textContent = errorText(reply));
  $("conflict").hidden = true;
  if (S.editing) stopEditing();
  paintRecord(rec);
}

function theirsWin() {
  const { current } = S.conflict;
  $("conflict").hidden = true;
  if (S.editing) stopEditing();
  applyState(current);
}

// ------------------------------------------------------------------ paraphrase clusters

function offerCluster(rec, answer) {
  if (rec.cluster === null) return;
  const siblings = S.records.filter((r) => r.cluster === rec.cluster && r !== rec && r.file === rec.file);
  if (!siblings.length) return;
  $("cluster-text").textContent = `同一簇中还有 ${siblings.length} 条相近问法。把新答案也用到它们吗？`;
  $("cluster-list").replaceChildren(
    ...siblings.map((sib) => {
      const item = el("li");
      const box = el("input");
      box.type = "checkbox";
      box.checked = true;
      box.dataset.id = sib.id;
      const label = el("label");
      label.append(box, ` ${textOf(sib).question}`);
      item.append(label, el("div", textOf(sib).answer, "muted small"));
      return item;
    }),
  );
  $("cluster-result").textContent = "";
  $("cluster").hidden = false;
  S.clusterAnswer = answer;
}

async function applyToCluster() {
  const boxes = [...$("cluster-list").querySelectorAll("input:checked")];
  let done = 0;
  const clashed = [];
  for (const box of boxes) {
    const sib = S.byId.get(box.dataset.id);
    const { status, reply } = await send(sib, "edit", { answer: S.clusterAnswer });
    if (status === 200) done += 1;
    else clashed.push(status === 409 ? `${textOf(sib).question}（已被 ${reply.current.reviewer} 修改）` : errorText(reply));
  }
  $("cluster-result").textContent = `已应用到 ${done} 条` + (clashed.length ? `；未应用：${clashed.join("；")}` : "");
  if (!clashed.length) $("cluster").hidden = true;
}

// ------------------------------------------------------------------ keys, polling, start

function onKey(event) {
  if (S.editing) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      save();
    } else if (event.key === "Escape") {
      stopEditing();
      paintRecord(currentRecord());
    }
    return;
  }
  if (typing(event) || event.ctrlKey || event.metaKey || event.altKey || S.busy) return;
  const actions = {
    j: () => S.at < S.shown.length - 1 && select(S.at + 1),
    k: () => S.at > 0 && select(S.at - 1),
    a: () => quick("accept"),
    r: () => quick("reject"),
    e: () => startEditing(),
  };
  const act = actions[event.key];
  if (act) {
    event.preventDefault();
    act();
  }
}

async function poll() {
  try {
    const changes = await getJSON(`/api/changes?since=${S.seq}`);
    for (const state of changes.states) applyState(state);
    S.seq = changes.seq;
    progress(changes.counts);
  } catch {
    // the server is away for a moment: the next poll tries again
  }
}

function fillFilters(info) {
  for (const name of info.files) $("filter-file").append(new Option(name, name));
  const headings = [...new Set(S.records.map((r) => r.heading).filter(Boolean))].sort();
  for (const heading of headings) $("filter-heading").append(new Option(heading, heading));
  $("drops").hidden = !info.drops.length && !info.problem_count;
  $("drops-body").replaceChildren(
    ...info.drops.map((d) => {
      const row = el("tr");
      row.append(el("td", d.reason), el("td", String(d.count)), el("td", d.meaning));
      return row;
    }),
  );
  if (info.problem_count)
    $("problems").textContent = `${info.problem_count} 条记录无法审核（不在列表中）：${info.problems.join("；")}`;
}

async function load(info) {
  S.info = info;
  $("title").textContent = info.title;
  const data = await getJSON("/api/records");
  S.records = data.records;
  S.passages = data.passages;
  S.seq = data.seq;
  for (const rec of S.records) S.byId.set(rec.id, rec);
  $("list").replaceChildren(...S.records.map(listRow));
  fillFilters(info);
  progress(info.counts);
  applyFilters();
  setInterval(poll, POLL_MS);
}

function wire() {
  for (const id of ["filter-file", "filter-heading", "filter-category", "filter-status"])
    $(id).addEventListener("change", applyFilters);
  $("search").addEventListener("input", applyFilters);
  $("accept").addEventListener("click", () => quick("accept"));
  $("reject").addEventListener("click", () => quick("reject"));
  $("edit").addEventListener("click", startEditing);
  $("save").addEventListener("click", save);
  $("cancel").addEventListener("click", () => {
    stopEditing();
    paintRecord(currentRecord());
  });
  $("conflict-mine-wins").addEventListener("click", mineWins);
  $("conflict-theirs-wins").addEventListener("click", theirsWin);
  $("cluster-apply").addEventListener("click", applyToCluster);
  $("cluster-skip").addEventListener("click", () => ($("cluster").hidden = true));
  document.addEventListener("keydown", onKey);
}

wire();
boot(load);
