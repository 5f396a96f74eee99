// uniembed image search page: pick or drop an image, POST it to /search, render the nearest thumbnails;
// filters (domain, label prefix, any column), a distance threshold, query expansion on/off and "more like this"
// (GET /search?id=N). When /health says edits are on: add the query image (POST /items) and remove a result
// (DELETE /items/{id}) with the edit token, which stays in sessionStorage (never in a URL).
// Plain JS, no framework or CDN: the page must work offline, served by the same process as the API.
"use strict";

const $ = (id) => document.getElementById(id);
const drop = $("drop"), fileInput = $("file"), preview = $("preview"), dropText = $("drop-text");
const statusEl = $("status"), results = $("results"), kSelect = $("k"), again = $("again");
let maxUploadMb = 10;
const domainSel = $("domain"), prefixSel = $("prefix"), moreFilters = $("more-filters");
const maxDist = $("maxdist"), maxDistOut = $("maxdist-value"), expand = $("expand");
const edits = $("edits"), tokenInput = $("token"), addBtn = $("add"), editMsg = $("edit-msg");
const TOKEN_KEY = "uniembed.editToken";
let editsOn = false;
let current = null; // what is being searched: {file} for an upload, {id, label} for "more like this"

function setStatus(text, isError = false) {
  statusEl.textContent = text;
  statusEl.classList.toggle("error", isError);
}

async function loadHealth() {
  try {
    const r = await fetch("/health");
    const h = await r.json();
    maxUploadMb = h.max_upload_mb;
    setEdits(Boolean(h.edits));
    $("health").textContent =
      `${h.count.toLocaleString()} images · ${h.index_type} index · model ${h.model_fingerprint}` +
      (h.projection ? ` · ${h.projection.spec} projection fitted on ${h.projection.fitted_on.toLocaleString()} images` : "") +
      (h.edits ? " · edits on" : "");
    for (const opt of Array.from(kSelect.options)) {
      if (Number(opt.value) > h.max_k) opt.remove();
    }
  } catch (e) {
    $("health").textContent = "service unreachable";
  }
}

function addOptions(select, entries) {
  for (const e of entries) {
    const opt = document.createElement("option");
    opt.value = e.value;
    opt.textContent = `${e.value} (${e.count.toLocaleString()})`;
    select.append(opt);
  }
}

async function loadFacets() {
  try {
    const f = await (await fetch("/facets")).json();
    addOptions(domainSel, f.domains.filter((d) => d.value !== ""));
    addOptions(prefixSel, f.label_prefixes);
    $("columns").textContent = `columns: ${f.columns.join(", ")}`;
  } catch (e) {
    $("columns").textContent = "filter choices unavailable";
  }
}

// The filters and threshold as request parameters (shared by uploads and "more like this").
function searchParams() {
  const params = [["k", kSelect.value]];
  if (Number(maxDist.value) < 2) params.push(["max_distance", maxDist.value]);
  if (!expand.checked) params.push(["expand", "false"]);
  if (domainSel.value) params.push(["filter", `domain=${domainSel.value}`]);
  if (prefixSel.value) params.push(["filter", `label^=${prefixSel.value}`]);
  for (const f of moreFilters.value.split(";")) {
    if (f.trim()) params.push(["filter", f.trim()]);
  }
  return params;
}

function card(hit, rank) {
  const li = document.createElement("li");
  li.className = "result";
  li.title = hit.path;
  const img = document.createElement("img");
  img.src = hit.thumbnail;
  img.alt = hit.label;
  img.loading = "lazy";
  const meta = document.createElement("div");
  meta.className = "meta";
  const label = document.createElement("div");
  label.className = "label";
  label.textContent = `${rank}. ${hit.label}`;
  const dist = document.createElement("div");
  dist.className = "distance";
  dist.textContent = `distance ${hit.distance.toFixed(3)}`;
  const dom = document.createElement("div");
  dom.className = "domain";
  dom.textContent = hit.domain || "";
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more";
  more.textContent = "more like this";
  more.addEventListener("click", () => moreLike(hit));
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "remove";
  remove.textContent = "remove";
  remove.title = `remove #${hit.id} from the index`;
  remove.addEventListener("click", () => removeItem(hit));
  meta.append(label, dist, dom, more, remove);
  li.append(img, meta);
  return li;
}

function show(r, body) {
  if (!r.ok) {
    setStatus(`Error ${r.status}: ${body.detail}`, true);
    return;
  }
  body.results.forEach((hit, i) => results.append(card(hit, i + 1)));
  const of = body.matched < body.total ? ` of ${body.matched.toLocaleString()} matching` : "";
  const cut = body.max_distance !== null ? ` within ${body.max_distance}` : "";
  const n = body.results.length;
  setStatus(`${n} result${n === 1 ? "" : "s"}${of}${cut} in ${body.took_ms.toFixed(0)} ms`);
}

async function moreLike(hit) {
  current = { id: hit.id, label: hit.label, thumbnail: hit.thumbnail };
  again.disabled = false;
  addBtn.disabled = true; // already indexed
  preview.src = hit.thumbnail;
  preview.hidden = false;
  dropText.textContent = `more like #${hit.id} (${hit.label})`;
  setStatus("searching…");
  results.replaceChildren();
  const query = new URLSearchParams([["id", String(hit.id)], ...searchParams()]);
  try {
    const r = await fetch(`/search?${query}`);
    show(r, await r.json().catch(() => ({ detail: `HTTP ${r.status}` })));
  } catch (e) {
    setStatus(`Request failed: ${e}`, true);
  }
}

function rerun() {
  if (current && current.id !== undefined) moreLike(current);
  else if (current) search(current.file);
}

async function search(file) {
  if (!file) return;
  current = { file };
  again.disabled = false;
  addBtn.disabled = false;
  if (file.size > maxUploadMb * 1024 * 1024) {
    setStatus(`That file is ${(file.size / 1048576).toFixed(1)} MiB; the limit is ${maxUploadMb} MiB.`, true);
    return;
  }
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  dropText.textContent = file.name;
  setStatus("searching…");
  results.replaceChildren();
  const form = new FormData();
  form.append("image", file, file.name);
  for (const [name, value] of searchParams()) form.append(name, value);
  try {
    const r = await fetch("/search", { method: "POST", body: form });
    show(r, await r.json().catch(() => ({ detail: `HTTP ${r.status}` })));
  } catch (e) {
    setStatus(`Request failed: ${e}`, true);
  }
}

// Edits: the token goes in the Authorization header only; it lives in this tab's sessionStorage.
function setEdits(on) {
  editsOn = on;
  edits.hidden = !on;
  edits.disabled = !on;
  document.body.classList.toggle("edits-on", on);
}

function editHeaders() {
  const token = tokenInput.value.trim();
  if (!token) throw new Error("Enter the edit token first.");
  return { Authorization: `Bearer ${token}` };
}

// One readable line for a refused edit (401/403/405/409/413/422, ...).
function editError(what, r, body) {
  const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
  const hint = r.status === 401 || r.status === 403 ? " (check the edit token)" : "";
  return `${what} failed, error ${r.status}: ${detail}${hint}`;
}

async function editRequest(what, url, init) {
  let headers;
  try {
    headers = editHeaders();
  } catch (e) {
    setStatus(e.message, true);
    return null;
  }
  try {
    const r = await fetch(url, { ...init, headers });
    const body = await r.json().catch(() => ({ detail: `HTTP ${r.status}` }));
    if (r.ok) return body;
    setStatus(editError(what, r, body), true);
  } catch (e) {
    setStatus(`${what} failed: ${e}`, true);
  }
  return null;
}

async function addCurrent() {
  if (!editsOn || !current || !current.file) return;
  const form = new FormData();
  form.append("image", current.file, current.file.name);
  const label = $("add-label").value.trim(), domain = $("add-domain").value.trim();
  if (label) form.append("label", label);
  if (domain) form.append("domain", domain);
  setStatus("adding…");
  const body = await editRequest("Adding", "/items", { method: "POST", body: form });
  if (!body) return;
  editMsg.textContent = `added #${body.id}${body.label ? ` (${body.label})` : ""}; ${body.count} images`;
  loadHealth();
  rerun();
}

async function removeItem(hit) {
  if (!editsOn || !confirm(`Remove #${hit.id} (${hit.label}) from the index?`)) return;
  setStatus("removing…");
  const body = await editRequest("Removing", `/items/${encodeURIComponent(hit.id)}`, { method: "DELETE" });
  if (!body) return;
  editMsg.textContent = `removed #${body.removed}; ${body.count} images`;
  loadHealth();
  if (current && current.id === hit.id) {
    results.replaceChildren();
    setStatus(`#${hit.id} was the query and is no longer indexed; choose another image.`);
  } else {
    rerun();
  }
}

tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
tokenInput.addEventListener("input", () => {
  const token = tokenInput.value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
});
addBtn.addEventListener("click", addCurrent);
fileInput.addEventListener("change", () => search(fileInput.files[0]));
for (const el of [kSelect, domainSel, prefixSel, moreFilters, maxDist, expand]) el.addEventListener("change", rerun);
maxDist.addEventListener("input", () => {
  maxDistOut.textContent = Number(maxDist.value) < 2 ? Number(maxDist.value).toFixed(2) : "off";
});
again.addEventListener("click", rerun);
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") fileInput.click();
});
for (const ev of ["dragenter", "dragover"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const ev of ["dragleave", "drop"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => {
  const f = e.dataTransfer && e.dataTransfer.files[0];
  if (f) search(f);
});

loadHealth();
loadFacets();
