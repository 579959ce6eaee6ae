// The grading page of `qwen-mlx review RUN`: every answer of the eval report, graded
// correct / partly / wrong by a person, with the right answer where it was not; the people's
// accuracy beside the judge model's, and how often the two agree.
"use strict";

const GRADE_LABELS = { correct: "正确", partly: "部分正确", wrong: "错误", failed: "未评出" };
const MODEL_LABELS = { tuned: "微调模型", base: "基座模型" };
const GRADE_KEYS = { 1: "correct", 2: "partly", 3: "wrong" };

const G = { info: null, blocks: new Map(), order: [], at: -1, seq: 0 };

const percent = (value) => (value === null || value === undefined ? "—" : `${value.toFixed(1)}%`);
const modelName = (label) => MODEL_LABELS[label] || label;

// ------------------------------------------------------------------ the answers

function answerBlock(label, answer) {
  const block = el("article", undefined, "graded");
  block.dataset.id = answer.id;
  block.dataset.label = label;
  block.append(el("header", modelName(label)), el("div", answer.text, "text"));
  if (answer.judge) {
    const reason = answer.judge_reason ? `：${answer.judge_reason}` : "";
    block.append(el("p", `裁判模型：${GRADE_LABELS[answer.judge] || answer.judge}${reason}`, "muted small judge"));
  }
  const buttons = el("div", undefined, "grades");
  for (const grade of ["correct", "partly", "wrong"]) {
    const button = el("button", GRADE_LABELS[grade], "grade");
    button.type = "button";
    button.dataset.grade = grade;
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("click", () => gradeAnswer(answer.id, grade));
    buttons.append(button);
  }
  const corrected = el("textarea", undefined, "corrected");
  corrected.rows = 2;
  corrected.placeholder = "更正后的答案（可选）";
  const save = el("button", "保存更正", "save-correction");
  save.type = "button";
  save.addEventListener("click", () => saveCorrection(answer.id));
  const conflict = el("div", undefined, "conflict");
  conflict.hidden = true;
  block.append(buttons, corrected, save, el("span", "", "state muted small"), el("span", "", "error"), conflict);
  block.addEventListener("click", () => focusAnswer(G.order.indexOf(answer.id)));
  G.blocks.set(answer.id, { block, state: { id: answer.id, grade: null, corrected: null, version: 0 } });
  return block;
}

function questionCard(row) {
  const card = el("section", undefined, "question-card");
  card.append(el("h3", `${row.index + 1}. ${row.question}`), el("p", `参考答案：${row.reference}`, "reference"));
  const answers = el("div", undefined, "answers");
  for (const label of G.info.labels) {
    answers.append(answerBlock(label, row.answers[label]));
    G.order.push(row.answers[label].id);
  }
  card.append(answers);
  return card;
}

function paint(id) {
  const { block, state } = G.blocks.get(id);
  block.dataset.grade = state.grade || "";
  for (const button of block.querySelectorAll("button.grade"))
    button.setAttribute("aria-pressed", String(button.dataset.grade === state.grade));
  const box = block.querySelector("textarea.corrected");
  if (document.activeElement !== box) box.value = state.corrected || "";
  block.querySelector(".state").textContent = state.reviewer ? `${state.reviewer} 评于 ${state.time}` : "";
}

function applyState(state) {
  const entry = G.blocks.get(state.id);
  if (!entry) return;
  entry.state = state;
  paint(state.id);
}

function showStats(stats) {
  let graded = 0;
  let total = 0;
  const rows = G.info.labels.map((label) => {
    const s = stats[label];
    graded += s.human.graded;
    total += s.answers;
    const row = el("tr");
    row.dataset.label = label;
    const agreement = s.agreement.rate === null ? "—" : `${percent(s.agreement.rate)}（${s.agreement.both} 个）`;
    row.append(
      el("td", modelName(label)),
      el("td", `${s.human.graded} / ${s.answers}`),
      el("td", percent(s.human.accuracy), "human-accuracy"),
      el("td", s.judge ? percent(s.judge.accuracy) : "—", "judge-accuracy"),
      el("td", agreement, "agreement"),
    );
    return row;
  });
  $("stats-body").replaceChildren(...rows);
  $("progress").textContent = `${graded} / ${total} 已评分`;
}

// ------------------------------------------------------------------ grading

async function send(id, grade, corrected, baseVersion) {
  const { block, state } = G.blocks.get(id);
  block.querySelector(".error").textContent = "";
  const body = {
    id,
    grade,
    corrected: corrected || null,
    base_version: baseVersion ?? state.version,
    reviewer: reviewerName(G.info),
  };
  const { status, body: reply } = await call("/api/grade", body);
  if (status === 200) {
    block.querySelector(".conflict").hidden = true;
    applyState(reply.state);
    showStats(reply.stats);
  } else if (status === 409) {
    showConflict(id, grade, corrected, reply.current);
  } else {
    block.querySelector(".error").textContent = errorText(reply);
  }
}

function gradeAnswer(id, grade) {
  const { block } = G.blocks.get(id);
  return send(id, grade, block.querySelector("textarea.corrected").value);
}

function saveCorrection(id) {
  const { block, state } = G.blocks.get(id);
  if (!state.grade) {
    block.querySelector(".error").textContent = "请先选择评分（正确 / 部分正确 / 错误）";
    return;
  }
  return send(id, state.grade, block.querySelector("textarea.corrected").value);
}

function showConflict(id, grade, corrected, current) {
  const { block } = G.blocks.get(id);
  const box = block.querySelector(".conflict");
  const theirs = current.corrected ? `，更正为：${current.corrected}` : "";
  const mine = corrected ? `，更正为：${corrected}` : "";
  const mineWins = el("button", "用我的覆盖");
  mineWins.type = "button";
  mineWins.addEventListener("click", () => send(id, grade, corrected, current.version));
  const theirsWin = el("button", "采用对方的");
  theirsWin.type = "button";
  theirsWin.addEventListener("click", () => {
    box.hidden = true;
    applyState(current);
  });
  box.replaceChildren(
    el("p", `${current.reviewer || "其他人"} 在 ${current.time} 已评为“${GRADE_LABELS[current.grade]}”${theirs}（在您载入之后）。`),
    el("p", `您的评分“${GRADE_LABELS[grade]}”${mine} 尚未保存。`),
    mineWins,
    theirsWin,
  );
  box.hidden = false;
}

// ------------------------------------------------------------------ keys, polling, start

function focusAnswer(index) {
  if (index < 0 || index >= G.order.length) return;
  if (G.at >= 0) G.blocks.get(G.order[G.at]).block.classList.remove("selected");
  G.at = index;
  const { block } = G.blocks.get(G.order[index]);
  block.classList.add("selected");
  block.scrollIntoView({ block: "nearest" });
}

function onKey(event) {
  if (typing(event) || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "j") focusAnswer(G.at + 1);
  else if (event.key === "k") focusAnswer(G.at - 1);
  else if (GRADE_KEYS[event.key] && G.at >= 0) gradeAnswer(G.order[G.at], GRADE_KEYS[event.key]);
  else return;
  event.preventDefault();
}

async function poll() {
  try {
    const changes = await getJSON(`/api/changes?since=${G.seq}`);
    for (const state of changes.states) applyState(state);
    G.seq = changes.seq;
    showStats(changes.stats);
  } catch {
    // the server is away for a moment: the next poll tries again
  }
}

async function load(info) {
  G.info = info;
  $("title").textContent = info.title;
  const data = await getJSON("/api/answers");
  $("questions").replaceChildren(...data.rows.map(questionCard));
  for (const state of data.states) applyState(state);
  G.seq = data.seq;
  showStats(data.stats);
  focusAnswer(0);
  setInterval(poll, POLL_MS);
}

document.addEventListener("keydown", onKey);
boot(load);
