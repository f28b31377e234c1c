// genrec web page: pick a user, read and steer their taste profile, see recommendations,
// playlists and a 2-D map of the embedding space. Plain DOM, no framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const USER_ID = /^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$/;
const state = { user: "", revision: null, recs: [], map: null };

// ------------------------------------------------------------------ helpers

// Element with attributes and children (strings become text: nothing is parsed as HTML).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

async function api(method, path, body, headers = {}) {
  const init = { method, headers: { ...headers } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["content-type"] = "application/json";
  }
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({}));
  return { status: r.status, ok: r.ok, data };
}

function say(text, kind = "info") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = !text;
}

function failure(what, r) {
  const detail = r.data.detail ? ` ${JSON.stringify(r.data.detail)}` : "";
  say(`${what} failed (${r.status}): ${r.data.error || "error"}${detail}`, "error");
}

const userPath = (user) => `/v1/users/${encodeURIComponent(user)}/taste-profile`;
const pct = (share) => `${Math.round(share * 100)}%`;

// ------------------------------------------------------------------ taste profile

function renderProfile(p) {
  state.revision = p.revision;
  $("revision").textContent = `revision ${p.revision}`;
  $("summary").textContent = p.summary;
  $("genres").replaceChildren(...p.top_genres.map((g) => el("li", { "data-genre": g.name },
    `${g.name} ${pct(g.share)} `,
    ...["more", "less", "forget"].map((action) => el("button",
      { type: "button", "data-action": action, title: `${action} ${g.name}` }, action)))));
  const e = p.edits;
  $("edits").replaceChildren(...["more", "less", "forget"].map((kind) => el("li",
    { "data-kind": kind }, el("b", {}, `${kind}: `),
    [...e[kind].genres, ...e[kind].creators, ...e[kind].items].join(", ") || "—")));
  const titles = (items) => items.map((i) => el("li", { "data-uri": i.uri }, i.title));
  $("representative").replaceChildren(...titles(p.representative_items));
  $("recent").replaceChildren(...titles(p.recent_items));
  $("neighbourhoods").replaceChildren(...p.neighbourhoods.map((n) =>
    el("li", {}, `code ${n.prefix} · ${n.genre} · ${pct(n.share)} of items`)));
  if (p.degraded.length) say(`Profile degraded: ${p.degraded.join(", ")}`, "error");
}

async function loadProfile() {
  const user = state.user;
  const r = await api("GET", userPath(user));
  if (user !== state.user) return;
  if (r.ok) renderProfile(r.data);
  else failure("Loading the profile", r);
}

// One edit (PATCH, or DELETE for a reset) against the revision the page shows.
async function edit(method, path, body) {
  const r = await api(method, path, body, { "If-Match": `"${state.revision}"` });
  if (r.status === 412) {
    say("Someone else changed this profile meanwhile: reloaded it, nothing was applied. " +
        "Check it and try again.", "error");
    await loadProfile();
    return;
  }
  if (!r.ok) return failure("The edit", r);
  say(method === "DELETE" ? "Edits reset." : `Saved (revision ${r.data.revision}).`);
  renderProfile(r.data);
  await refresh();
}

const editGenre = (action, genre) =>
  edit("PATCH", userPath(state.user), { [action]: { genres: [genre] } });

// ------------------------------------------------------------------ lists

function renderItems(table, resp) {
  table.setAttribute("data-request-id", resp.request_id);
  const head = el("tr", {}, ...["#", "title", "kind", "semantic id", "why"].map((h) =>
    el("th", {}, h)));
  table.replaceChildren(head, ...resp.items.map((item, i) => el("tr", { "data-uri": item.uri },
    el("td", {}, String(i + 1)),
    el("td", {}, item.title, el("div", { class: "uri" }, item.uri)),
    el("td", {}, item.kind),
    el("td", { class: "sid" }, item.semantic_id),
    el("td", { class: "why" }, item.why))));
}

function meta(resp) {
  const degraded = resp.degraded.length ? ` (degraded: ${resp.degraded.join(", ")})` : "";
  return `served by ${resp.served_by}${degraded} · ${Math.round(resp.timings_ms.total)} ms`;
}

async function loadRecs() {
  const user = state.user;
  const r = await api("POST", "/v1/recommendations", { user_id: user, k: 10 });
  if (user !== state.user) return;
  if (!r.ok) return failure("Recommendations", r);
  state.recs = r.data.items.map((i) => i.uri);
  renderItems($("recs"), r.data);
  $("recs-meta").textContent = meta(r.data);
  drawMap();
}

async function makePlaylist(event) {
  event.preventDefault();
  const length = Number($("length").value) || 10;
  const body = { user_id: state.user, prompt: $("prompt").value.trim(), length };
  $("playlist-meta").textContent = "…";
  const r = await api("POST", "/v1/playlists", body);
  if (!r.ok) return failure("The playlist", r);
  renderItems($("playlist"), r.data);
  $("playlist-meta").textContent = `“${body.prompt}” · ${meta(r.data)}`;
}

// ------------------------------------------------------------------ map

async function loadMap() {
  const user = state.user;
  const r = await api("GET", `/v1/ui/map?user_id=${encodeURIComponent(user)}&k=0`);
  if (user !== state.user) return;
  if (!r.ok) return failure("The map", r);
  state.map = r.data;
  const v = r.data.explained_variance.map(pct).join(" + ");
  $("map-meta").textContent = `PCA of item vectors, ${v} of variance`;
  drawMap();
}

// Five-pointed star centred on (x, y).
function starPoints(x, y, r) {
  return Array.from({ length: 10 }, (_, i) => {
    const a = (Math.PI / 5) * i - Math.PI / 2;
    const d = i % 2 ? r * 0.45 : r;
    return `${(x + d * Math.cos(a)).toFixed(1)},${(y + d * Math.sin(a)).toFixed(1)}`;
  }).join(" ");
}

function drawMap() {
  const m = state.map;
  const map = $("map");
  if (!m) return;
  const all = m.user ? [...m.items, m.user] : m.items;
  const xs = all.map((p) => p.x), ys = all.map((p) => p.y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const size = 600, pad = 20;
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (size - 2 * pad);
  const sy = (y) => size - pad - ((y - y0) / (y1 - y0 || 1)) * (size - 2 * pad);
  const seen = new Set(m.history), recs = new Set(state.recs);
  const layers = { item: [], history: [], rec: [] };
  for (const item of m.items) {
    const kind = recs.has(item.uri) ? "rec" : seen.has(item.uri) ? "history" : "item";
    const dot = svg("circle", { cx: sx(item.x).toFixed(1), cy: sy(item.y).toFixed(1),
      r: kind === "item" ? 2 : 4, class: kind, "data-uri": item.uri });
    dot.append(svg("title"));
    dot.firstChild.textContent = item.title;
    layers[kind].push(dot);
  }
  map.replaceChildren(...layers.item, ...layers.history, ...layers.rec); // recs drawn on top
  if (m.user) {
    map.append(svg("polygon", { class: "user", points: starPoints(sx(m.user.x), sy(m.user.y), 11) }));
  }
}

// ------------------------------------------------------------------ wiring

async function refresh() {
  await Promise.all([loadRecs(), loadMap()]);
}

async function pickUser(user) {
  if (!USER_ID.test(user)) return say(`Not a user id: ${user}`, "error");
  state.user = user;
  state.recs = [];
  say("");
  history.replaceState(null, "", `?user=${encodeURIComponent(user)}`);
  await Promise.all([loadProfile(), refresh()]);
}

async function init() {
  const r = await api("GET", "/v1/ui/users?limit=50");
  if (!r.ok) return failure("Listing users", r);
  const wanted = new URLSearchParams(location.search).get("user");
  const users = wanted && !r.data.users.includes(wanted) ? [wanted, ...r.data.users] : r.data.users;
  $("user").replaceChildren(el("option", { value: "" }, "pick a user…"),
    ...users.map((u) => el("option", { value: u }, u)));
  $("genre-list").replaceChildren(...r.data.genres.map((g) => el("option", { value: g })));
  $("bundle").textContent = `${r.data.total} users · bundle ${r.data.bundle_version}`;
  $("user").addEventListener("change", (e) => e.target.value && pickUser(e.target.value));
  $("genres").addEventListener("click", (e) => {
    const action = e.target.dataset.action;
    if (action) editGenre(action, e.target.closest("li").dataset.genre);
  });
  $("edit-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (state.user) editGenre($("action").value, $("genre").value.trim().toLowerCase());
  });
  $("reset").addEventListener("click", () =>
    state.user && edit("DELETE", `${userPath(state.user)}/edits`));
  $("playlist-form").addEventListener("submit", (e) => state.user ? makePlaylist(e) : e.preventDefault());
  if (wanted) {
    $("user").value = wanted;
    await pickUser(wanted);
  }
}

init();
