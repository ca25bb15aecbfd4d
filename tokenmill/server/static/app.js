"use strict";
// The batches page of `tokenmill serve`. It lists /v1/batches newest first, refreshing every second
// while any batch runs (every 15 s otherwise); uploads a JSONL file to /v1/files and creates a batch
// on it; cancels batches; downloads their output and error files. With --api-key, every call sends
// the key kept in localStorage as a bearer token; a 401 says so and asks for the key again.
// NOTE: everything from the server is shown as text (textContent), never parsed as HTML: batch
// fields and error messages can carry what an uploaded file held.

const KEY_ITEM = "tokenmill.apiKey";
const ACTIVE = new Set(["validating", "in_progress", "finalizing", "cancelling"]);
const CANCELLABLE = new Set(["validating", "in_progress"]);
const RUNNING_REFRESH_MS = 1000;
const IDLE_REFRESH_MS = 15000;

const $ = (id) => document.getElementById(id);
const rows = new Map(); // batch id -> its row, updated in place so that a click is never lost to a refresh
const fileNames = new Map(); // file id -> the name it was uploaded with
let timer = null;
let generation = 0; // of refreshes: only the newest renders and sets the next timer

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// A call to the API: the key (if any) as a bearer token; an error status throws an ApiError
// carrying the API's own message.
async function api(path, options = {}) {
  const headers = new Headers(options.headers);
  const key = localStorage.getItem(KEY_ITEM);
  if (key !== null) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message;
    } catch {
      // not OpenAI's error shape: the status line says it
    }
    throw new ApiError(response.status, message);
  }
  return response;
}

function askForKey(message) {
  clearTimeout(timer);
  $("content").hidden = true;
  $("forget-key").hidden = true;
  $("key-message").textContent = `The server answered 401 (${message}): enter its API key.`;
  $("key-form").hidden = false;
  $("key-fields").disabled = false; // before the focus: a disabled field takes none
  $("key").value = "";
  $("key").focus();
}

// An action's failure: a 401 asks for the key, anything else is said beside the upload form.
function failed(error) {
  if (error instanceof ApiError && error.status === 401) askForKey(error.message);
  else $("upload-status").textContent = error.message;
}

async function refresh() {
  const mine = ++generation;
  clearTimeout(timer);
  try {
    const page = await (await api("/v1/batches?limit=100")).json();
    await learnFileNames(page.data);
    if (!$("model").textContent) {
      $("model").textContent = (await (await api("/v1/models")).json()).data[0].id;
    }
    if (mine !== generation) return; // an action refreshed meanwhile: its answer is newer
    $("key-form").hidden = true;
    $("content").hidden = false;
    $("forget-key").hidden = localStorage.getItem(KEY_ITEM) === null;
    $("error").hidden = true;
    render(page);
    const running = page.data.some((batch) => ACTIVE.has(batch.status));
    timer = setTimeout(refresh, running ? RUNNING_REFRESH_MS : IDLE_REFRESH_MS);
  } catch (error) {
    if (mine !== generation) return;
    if (error instanceof ApiError && error.status === 401) {
      askForKey(error.message);
      return;
    }
    $("error").textContent = `Could not read the batches: ${error.message}`;
    $("error").hidden = false;
    timer = setTimeout(refresh, IDLE_REFRESH_MS);
  }
}

async function learnFileNames(batches) {
  if (batches.every((batch) => fileNames.has(batch.input_file_id))) return;
  for (const file of (await (await api("/v1/files?purpose=batch")).json()).data) {
    fileNames.set(file.id, file.filename);
  }
}

function render(page) {
  const body = $("batches").tBodies[0];
  const shown = new Set();
  page.data.forEach((batch, i) => {
    let row = rows.get(batch.id);
    if (row === undefined) {
      row = newRow();
      rows.set(batch.id, row);
    }
    row.batch = batch;
    fill(row, batch);
    if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] ?? null);
    shown.add(batch.id);
  });
  for (const [id, row] of rows) {
    if (!shown.has(id)) {
      row.tr.remove();
      rows.delete(id);
    }
  }
  $("empty").hidden = page.data.length > 0;
  $("more").hidden = !page.has_more;
}

function element(tag, className, parent) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  if (parent) parent.append(made);
  return made;
}

function newRow() {
  const tr = element("tr", "batch");
  const row = { tr };
  const cell = (name) => element("td", name, tr);
  const batchCell = cell("id");
  row.id = element("code", "", batchCell);
  row.meta = element("div", "meta", batchCell);
  const statusCell = cell("status");
  row.status = element("span", "badge", statusCell);
  row.problem = element("div", "meta problem", statusCell);
  const progressCell = cell("progress");
  row.bar = element("div", "bar", progressCell);
  row.bar.setAttribute("role", "progressbar");
  row.bar.setAttribute("aria-valuemin", "0");
  row.completed = element("span", "completed", row.bar);
  row.failed = element("span", "failed", row.bar);
  row.counts = element("div", "meta counts", progressCell);
  row.speed = cell("speed");
  row.hits = cell("hits");
  row.elapsed = cell("elapsed");
  row.eta = cell("eta");
  const actions = cell("actions");
  const button = (label, className, action) => {
    const made = element("button", className, actions);
    made.type = "button";
    made.textContent = label;
    made.addEventListener("click", () => action(row.batch).catch(failed));
    return made;
  };
  row.cancel = button("Cancel", "cancel", cancel);
  row.output = button("Output", "output", (batch) => download(batch.output_file_id, `${batch.id}_output.jsonl`));
  row.errors = button("Errors", "errors", (batch) => download(batch.error_file_id, `${batch.id}_errors.jsonl`));
  return row;
}

function fill(row, batch) {
  const counts = batch.request_counts ?? { total: 0, completed: 0, failed: 0 };
  const progress = batch.progress ?? {};
  const usage = batch.usage ?? { input_tokens: 0, output_tokens: 0 };
  const running = ACTIVE.has(batch.status);
  row.tr.dataset.id = batch.id;
  row.tr.dataset.status = batch.status;
  row.id.textContent = batch.id;
  const created = new Date(batch.created_at * 1000).toLocaleString();
  const input = fileNames.get(batch.input_file_id) ?? batch.input_file_id;
  row.meta.textContent = `${batch.endpoint} · ${input} · ${created}`;
  row.status.textContent = batch.status.replace("_", " ");
  row.status.className = `badge status-${batch.status}`;
  row.problem.textContent = batch.errors?.data?.[0]?.message ?? "";
  row.bar.setAttribute("aria-valuemax", String(counts.total));
  row.bar.setAttribute("aria-valuenow", String(counts.completed + counts.failed));
  row.completed.style.width = percent(counts.completed, counts.total);
  row.failed.style.width = percent(counts.failed, counts.total);
  row.counts.textContent = counts.total
    ? `${counts.completed} completed · ${counts.failed} failed · ${counts.total} total`
    : "counting lines…";
  row.speed.textContent = usage.output_tokens || usage.input_tokens
    ? `${amount(progress.output_tokens_per_second)} out · ${amount(progress.input_tokens_per_second)} in`
    : "—";
  row.hits.textContent = usage.input_tokens ? `${(100 * progress.prefix_cache_hit_rate).toFixed(1)}%` : "—";
  row.elapsed.textContent = progress.elapsed_seconds ? duration(progress.elapsed_seconds) : "—";
  row.eta.textContent = running && progress.eta_seconds != null ? duration(progress.eta_seconds) : "—";
  row.cancel.hidden = !CANCELLABLE.has(batch.status);
  row.output.hidden = !batch.output_file_id;
  row.errors.hidden = !batch.error_file_id;
}

function percent(part, whole) {
  return whole ? `${(100 * part) / whole}%` : "0%";
}

function amount(value) {
  if (value >= 1000) return `${(value / 1000).toFixed(1)}k`;
  return value >= 10 ? value.toFixed(0) : value.toFixed(1);
}

function duration(seconds) {
  if (seconds < 10) return `${seconds.toFixed(1)}s`;
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
}

async function cancel(batch) {
  await api(`/v1/batches/${encodeURIComponent(batch.id)}/cancel`, { method: "POST" });
  await refresh();
}

// Fetched with the key (a plain link could not send it), then saved under `name`.
async function download(fileId, name) {
  const blob = await (await api(`/v1/files/${encodeURIComponent(fileId)}/content`)).blob();
  const url = URL.createObjectURL(blob);
  const link = element("a", "", document.body);
  link.href = url;
  link.download = name;
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// The endpoint is preselected from the file's first line's url, when it names one of them.
async function guessEndpoint() {
  const file = $("file").files[0];
  if (!file) return;
  const firstLine = (await file.slice(0, 1 << 16).text()).split("\n").find((line) => line.trim());
  try {
    const url = JSON.parse(firstLine).url;
    if ([...$("endpoint").options].some((option) => option.value === url)) $("endpoint").value = url;
  } catch {
    // not a whole JSON line: the choice stays the person's
  }
}

async function createBatch(event) {
  event.preventDefault();
  const file = $("file").files[0];
  $("create").disabled = true;
  $("upload-status").textContent = `Uploading ${file.name}…`;
  try {
    const form = new FormData();
    form.append("purpose", "batch");
    form.append("file", file);
    const uploaded = await (await api("/v1/files", { method: "POST", body: form })).json();
    fileNames.set(uploaded.id, uploaded.filename);
    const request = { input_file_id: uploaded.id, endpoint: $("endpoint").value, completion_window: "24h" };
    const batch = await (await api("/v1/batches", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
    })).json();
    $("upload-status").textContent = `Created ${batch.id} from ${file.name}.`;
    $("file").value = "";
    await refresh();
  } catch (error) {
    failed(error);
  } finally {
    $("create").disabled = false;
  }
}

// NOTE: the form is disabled until the server has answered for the key: a 401 that came while the
// next key was being typed would empty the field under it (and a key submitted meanwhile would be
// the one the late answer is taken for).
$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_ITEM, $("key").value);
  $("key-fields").disabled = true;
  $("key-message").textContent = "Checking the key…";
  await refresh();
  $("key-fields").disabled = false; // also when no answer came (the error says why): it can be tried again
});
$("forget-key").addEventListener("click", () => {
  localStorage.removeItem(KEY_ITEM);
  location.reload();
});
$("file").addEventListener("change", guessEndpoint);
$("upload-form").addEventListener("submit", createBatch);
refresh();
