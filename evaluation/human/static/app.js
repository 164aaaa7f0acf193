// The annotation page. No framework and no build step; every text from the server goes into
// the page through textContent, never innerHTML, so HTML in a response is shown, not run.
"use strict";

const STORE = "crs-annotate";
const $ = (id) => document.getElementById(id);
let cfg = null;          // /api/config
let who = null;          // {annotator, group, key}
let index = 0;           // position in this annotator's prompt sequence
let item = null;         // /api/items/{index}
let ranks = {};          // response key -> rank (0 = not ranked yet)

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.appendChild(c);
  return node;
}

function say(text, kind = "error") {
  const m = $("message");
  m.textContent = text || "";
  m.className = text ? kind : "";
}

// Name, group and position survive a reload in localStorage; the key only in this tab's
// sessionStorage, so it is not left behind on a shared machine.
function remember() {
  localStorage.setItem(STORE, JSON.stringify({ annotator: who.annotator, group: who.group, index }));
  if (who.key) sessionStorage.setItem(STORE, who.key);
}

function forget() {
  localStorage.removeItem(STORE);
  sessionStorage.removeItem(STORE);
}

async function api(path, options = {}) {
  const headers = { "content-type": "application/json" };
  if (who && who.key) headers.authorization = "Bearer " + who.key;
  const r = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON: reported below */ }
  if (!r.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${r.status}`;
    const err = new Error(message);
    err.status = r.status;
    throw err;
  }
  return body;
}

function query() {
  return `annotator=${encodeURIComponent(who.annotator)}&group=${encodeURIComponent(who.group)}`;
}

function showLogin(message) {
  $("task").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  for (const id of ["progress", "done", "who"]) $(id).textContent = "";
  const saved = JSON.parse(localStorage.getItem(STORE) || "null");
  if (saved) {
    $("name").value = saved.annotator || "";
    if (saved.group) $("group").value = saved.group;
  }
  say(message || "");
}

async function start(annotator, group, key, resumeIndex) {
  who = { annotator, group, key };
  try {
    const s = await api(`/api/session?${query()}`);
    who.annotator = s.annotator;
    index = Number.isInteger(resumeIndex) && resumeIndex >= 0 && resumeIndex < s.total
      ? resumeIndex : Math.min(s.next_index, s.total - 1);
  } catch (e) {
    if (e.status === 401) sessionStorage.removeItem(STORE);
    showLogin(e.message);
    return;
  }
  remember();
  // The task appears only with its item in place: a page shown first and filled later would
  // leave an empty progress line and board for as long as the item takes to arrive.
  if (!(await load(index))) return;
  $("login").hidden = true;
  $("task").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = `${who.annotator} · group ${who.group}`;
}

// Fetches and shows item i; false (with the reason shown) when it could not.
async function load(i) {
  try {
    item = await api(`/api/items/${i}?${query()}`);
  } catch (e) {
    if (e.status === 401) showLogin(e.message);
    else say(e.message);
    return false;
  }
  index = item.index;
  remember();
  ranks = {};
  for (const r of item.responses) ranks[r.key] = item.ranking ? (item.ranking[r.key] || 0) : 0;
  render();
  return true;
}

function setProgress() {
  $("progress").textContent = `${item.index + 1} of ${item.total}`;
  $("done").textContent = `${item.done} answered`;
  $("state").textContent = item.ranking
    ? "You answered this one; your saved ranking is shown. Change it and save again to update it."
    : "";
}

function render() {
  setProgress();
  $("instruction").textContent = item.instruction;
  const board = $("board");
  board.replaceChildren();
  const rows = {};
  for (let r = 1; r <= cfg.k; r++) rows[r] = rankRow(r, r === 1 ? "Rank 1 (best)" : `Rank ${r}`);
  rows[0] = rankRow(0, "Not ranked");
  for (let r = 1; r <= cfg.k; r++) board.appendChild(rows[r]);
  board.appendChild(rows[0]);
  for (const resp of item.responses) rows[ranks[resp.key]].querySelector(".slot").appendChild(card(resp));
  $("prev").disabled = item.index === 0;
  $("next").disabled = item.index >= item.total - 1;
}

function rankRow(rank, label) {
  const row = el("div", { class: "rank-row", dataset: { rank: String(rank) } }, [
    el("span", { class: "rank-label", text: label }),
    el("div", { class: "slot" }),
  ]);
  row.addEventListener("dragover", (ev) => { ev.preventDefault(); row.classList.add("over"); });
  row.addEventListener("dragleave", () => row.classList.remove("over"));
  row.addEventListener("drop", (ev) => {
    ev.preventDefault();
    row.classList.remove("over");
    const key = ev.dataTransfer.getData("text/plain");
    if (key in ranks) setRank(key, rank);
  });
  return row;
}

function card(resp) {
  const buttons = el("span", { class: "rank-buttons" });
  for (let r = 1; r <= cfg.k; r++) {
    const b = el("button", { type: "button", text: String(r), title: `rank ${r}`, dataset: { rank: String(r) } });
    if (ranks[resp.key] === r) b.classList.add("on");
    b.setAttribute("aria-pressed", ranks[resp.key] === r ? "true" : "false");
    b.addEventListener("click", () => setRank(resp.key, r));
    buttons.appendChild(b);
  }
  const node = el("article", { class: "card", draggable: "true", tabindex: "0", dataset: { key: resp.key } }, [
    el("header", {}, [el("span", { text: `Response ${resp.key}` }), buttons]),
    el("div", { class: "text response-text", text: resp.text }),
  ]);
  node.addEventListener("dragstart", (ev) => ev.dataTransfer.setData("text/plain", resp.key));
  node.addEventListener("keydown", (ev) => {
    const n = Number(ev.key);
    if (ev.key.length === 1 && Number.isInteger(n) && n >= 0 && n <= cfg.k) {
      ev.preventDefault();
      setRank(resp.key, n);
    }
  });
  return node;
}

function setRank(key, rank) {
  ranks[key] = rank;
  render();
  const again = document.querySelector(`.card[data-key="${key}"]`);
  if (again) again.focus();
}

async function submit() {
  // Unranked responses are left out on purpose: the server says what is missing.
  const ranking = {};
  for (const [k, r] of Object.entries(ranks)) if (r > 0) ranking[k] = r;
  try {
    const res = await api("/api/annotations", {
      method: "POST",
      body: JSON.stringify({ annotator: who.annotator, group: who.group, prompt_id: item.prompt_id, ranking }),
    });
    item.done = res.done;
    if (item.index < item.total - 1) {
      await load(item.index + 1);
      say(`Saved. ${res.done} of ${res.total} answered.`, "ok");
    } else {
      item.ranking = { ...ranks };
      setProgress();
      say(res.done === res.total
        ? `Saved. All ${res.total} answered, thank you. You can still go back and change any answer.`
        : `Saved. ${res.done} of ${res.total} answered; use Previous to find the rest.`, "ok");
    }
  } catch (e) {
    if (e.status === 401) return showLogin(e.message);
    say(e.message);
  }
}

async function init() {
  try {
    cfg = await api("/api/config");
  } catch (e) {
    return say("cannot reach the annotation server: " + e.message);
  }
  document.title = cfg.title;
  $("title").textContent = cfg.title;
  for (const g of cfg.groups) $("group").appendChild(el("option", { value: g, text: g }));
  $("key-label").hidden = !cfg.auth_required;
  $("key").required = cfg.auth_required;

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    say("");
    start($("name").value.trim(), $("group").value, cfg.auth_required ? $("key").value : null, null);
  });
  $("logout").addEventListener("click", () => { forget(); who = null; showLogin(""); });
  $("prev").addEventListener("click", () => { say(""); load(index - 1); });
  $("next").addEventListener("click", () => { say(""); load(index + 1); });
  $("submit").addEventListener("click", submit);

  const saved = JSON.parse(localStorage.getItem(STORE) || "null");
  const key = sessionStorage.getItem(STORE);
  if (saved && saved.annotator && cfg.groups.includes(saved.group) && (!cfg.auth_required || key)) {
    await start(saved.annotator, saved.group, key, saved.index);
  } else {
    showLogin("");
  }
}

init();
