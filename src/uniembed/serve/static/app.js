// uniembed image search page: pick or drop an image, POST it to /search, render the nearest thumbnails.
// Plain JS, no framework or CDN: the page must work offline, served by the same process as the API.
"use strict";

const $ = (id) => document.getElementById(id);
const drop = $("drop"), fileInput = $("file"), preview = $("preview"), dropText = $("drop-text");
const statusEl = $("status"), results = $("results"), kSelect = $("k"), again = $("again");
let maxUploadMb = 10;
let current = null; // the File being searched

function setStatus(text, isError = false) {
  statusEl.textContent = text;
  statusEl.classList.toggle("error", isError);
}

async function loadHealth() {
  try {
    const r = await fetch("/health");
    const h = await r.json();
    maxUploadMb = h.max_upload_mb;
    $("health").textContent =
      `${h.count.toLocaleString()} images · ${h.index_type} index · model ${h.model_fingerprint}` +
      (h.projection ? ` · ${h.projection.spec} projection fitted on ${h.projection.fitted_on.toLocaleString()} images` : "");
    for (const opt of Array.from(kSelect.options)) {
      if (Number(opt.value) > h.max_k) opt.remove();
    }
  } catch (e) {
    $("health").textContent = "service unreachable";
  }
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
  meta.append(label, dist, dom);
  li.append(img, meta);
  return li;
}

async function search(file) {
  if (!file) return;
  current = file;
  again.disabled = false;
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
  form.append("k", kSelect.value);
  try {
    const r = await fetch("/search", { method: "POST", body: form });
    const body = await r.json().catch(() => ({ detail: `HTTP ${r.status}` }));
    if (!r.ok) {
      setStatus(`Error ${r.status}: ${body.detail}`, true);
      return;
    }
    body.results.forEach((hit, i) => results.append(card(hit, i + 1)));
    setStatus(`${body.results.length} results in ${body.took_ms.toFixed(0)} ms`);
  } catch (e) {
    setStatus(`Request failed: ${e}`, true);
  }
}

fileInput.addEventListener("change", () => search(fileInput.files[0]));
kSelect.addEventListener("change", () => search(current));
again.addEventListener("click", () => search(current));
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
