// Duplicate groups of the served index: GET /duplicates?threshold=T, drawn as rows of thumbnails.
"use strict";

const slider = document.getElementById("threshold");
const shown = document.getElementById("threshold-value");
const counts = document.getElementById("counts");
const status = document.getElementById("status");
const list = document.getElementById("groups");
let defaultThreshold = null;
let pending = null;
let latest = 0;  // only the newest request may draw: a slow earlier answer must not overwrite it

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function render(data) {
  counts.textContent = `${data.group_count} groups · ${data.files_in_groups} of ${data.total} images in groups`
    + ` · ${data.would_delete} would go`;
  list.replaceChildren();
  for (const g of data.groups) {
    const box = el("article", "group");
    const h = el("h2", null, `group ${g.group}: ${g.size} images `);
    const dist = g.identical ? "identical" : `max distance ${g.max_distance.toFixed(3)}, mean ${g.mean_distance.toFixed(3)}`;
    h.appendChild(el("span", "dist", dist));
    box.appendChild(h);
    const ol = el("ol", "members");
    for (const it of g.items) {
      const li = el("li", "member");
      const img = el("img");
      img.src = it.thumbnail;
      img.alt = it.label;
      img.loading = "lazy";
      li.appendChild(img);
      li.appendChild(el("div", "label", it.label));
      li.appendChild(el("div", "domain", `#${it.id} ${it.path.split("/").pop()}`));
      ol.appendChild(li);
    }
    box.appendChild(ol);
    list.appendChild(box);
  }
  const more = data.group_count > data.groups.length ? ` (first ${data.groups.length} shown)` : "";
  status.classList.remove("error");
  status.textContent = `${data.group_count} groups at threshold ${data.threshold}${more}`;
}

async function load(threshold) {
  const url = threshold === null ? "/duplicates" : `/duplicates?threshold=${encodeURIComponent(threshold)}`;
  const seq = ++latest;
  status.textContent = "grouping…";
  try {
    const r = await fetch(url);
    const data = await r.json();
    if (seq !== latest) return;
    if (!r.ok) throw new Error(data.detail || `HTTP ${r.status}`);
    if (defaultThreshold === null) {
      defaultThreshold = data.default_threshold;
      slider.value = data.threshold;
    }
    shown.textContent = Number(data.threshold).toFixed(2);
    render(data);
  } catch (e) {
    if (seq !== latest) return;
    status.classList.add("error");
    status.textContent = `error: ${e.message}`;
  }
}

slider.addEventListener("input", () => {
  shown.textContent = Number(slider.value).toFixed(2);
  clearTimeout(pending);
  pending = setTimeout(() => load(slider.value), 200);
});
document.getElementById("reset").addEventListener("click", () => {
  if (defaultThreshold === null) return;
  slider.value = defaultThreshold;
  load(defaultThreshold);
});
load(null);
