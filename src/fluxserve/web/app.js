// The page: a key, a form that submits a task, its progress (streamed, or
// polled where the server has no stream route), the image, and the account's
// history. Every request goes to this server; nothing is fetched from elsewhere.

import { readEventStream } from "./sse.js";

const KEY_ITEM = "fluxserve.key";
const POLL_MS = 500;
const HISTORY_PAGE = 12;
const MAX_REFERENCES = Number(document.getElementById("references").dataset.max);
const TERMINAL = new Set(["finished", "failed"]);

const $ = (id) => document.getElementById(id);

class ApiError extends Error {}

// --- the key -----------------------------------------------------------------------

function apiKey() {
  return localStorage.getItem(KEY_ITEM) || "";
}

// A link can carry the key as `#key=...`: kept, then taken out of the address
// bar (and so out of the history and of screenshots).
function takeKeyFromFragment() {
  const key = new URLSearchParams(location.hash.slice(1)).get("key");
  if (!key) return;
  localStorage.setItem(KEY_ITEM, key);
  history.replaceState(null, "", location.pathname + location.search);
}

function showKeyState() {
  const saved = apiKey() !== "";
  $("key").value = apiKey();
  $("key-state").textContent = saved ? "Key saved in this browser." : "No key saved.";
}

// --- requests ----------------------------------------------------------------------

function authHeaders() {
  return { Authorization: `Bearer ${apiKey()}` };
}

// The `data` of a success envelope; an error envelope throws its own message.
async function envelopeData(response) {
  let envelope = null;
  try {
    envelope = await response.json();
  } catch {
    // Not JSON: described by the HTTP status below.
  }
  if (response.ok && envelope && "data" in envelope) return envelope.data;
  const message = envelope?.error?.message;
  throw new ApiError(message || `HTTP ${response.status} ${response.statusText}`.trim());
}

async function send(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...options.headers } });
  } catch (error) {
    throw new ApiError(`The server could not be reached (${error.message})`);
  }
  return envelopeData(response);
}

function sendJson(path, body) {
  return send(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

// --- errors ------------------------------------------------------------------------

function showError(error) {
  const box = $("error");
  box.textContent = error instanceof Error ? error.message : String(error);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// --- following a task --------------------------------------------------------------

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });
}

async function poll(taskId, onData, signal) {
  for (;;) {
    const data = await send(`/api/generate/status/${encodeURIComponent(taskId)}`, { signal });
    onData(data);
    if (TERMINAL.has(data.status)) return data;
    await sleep(POLL_MS, signal);
  }
}

// Each event's data is the status answer at that moment. A server without the
// stream route (404 that is not an event stream), or a stream that breaks off
// before the task's end, leaves the rest to polling.
async function watch(taskId, onData, signal) {
  let response;
  try {
    response = await fetch(`/api/generate/stream/${encodeURIComponent(taskId)}`, {
      headers: { ...authHeaders(), Accept: "text/event-stream" },
      signal,
    });
  } catch (error) {
    if (signal.aborted) throw error;
    return poll(taskId, onData, signal);
  }
  const isStream = (response.headers.get("content-type") || "").startsWith("text/event-stream");
  if (response.status === 404 || (response.ok && !isStream)) {
    await response.body?.cancel();
    return poll(taskId, onData, signal);
  }
  if (!response.ok) return envelopeData(response);
  try {
    for await (const event of readEventStream(response.body)) {
      const data = JSON.parse(event.data).data;
      onData(data);
      if (TERMINAL.has(data.status)) return data;
    }
  } catch (error) {
    if (signal.aborted) throw error;
  }
  return poll(taskId, onData, signal);
}

let following = null;

async function follow(taskId) {
  following?.abort();
  const controller = new AbortController();
  following = controller;
  try {
    await watch(taskId, (data) => following === controller && showTask(data), controller.signal);
    loadHistory();
  } catch (error) {
    if (!controller.signal.aborted) showError(error);
  }
}

// Tasks this page asked to cancel: a running one says so until it stops, since
// its status answers do not.
const stopping = new Set();

// Shows a task in the task panel, in place of the one there, and follows it
// until it ends.
function showAndFollow(data) {
  following?.abort();
  showTask(data);
  if (!TERMINAL.has(data.status)) follow(data.task_id);
}

function describe(data) {
  switch (data.status) {
    case "not_started":
      return data.queue_position ? `Queued, position ${data.queue_position}` : "Queued";
    case "running":
      return stopping.has(data.task_id) ? "Stopping…" : `Running: ${data.progress}%`;
    case "finished":
      return "Finished";
    default:
      return data.cancelled ? "Cancelled" : `Failed: ${data.error_message}`;
  }
}

function showTask(data) {
  $("task-id").textContent = `Task ${data.task_id} (${data.model})`;
  $("task-status").textContent = describe(data);
  const bar = $("task-progress");
  bar.hidden = false;
  bar.value = data.progress;
  bar.setAttribute("aria-valuetext", `${data.progress}%`);
  const cancel = $("cancel");
  cancel.hidden = TERMINAL.has(data.status);
  cancel.disabled = stopping.has(data.task_id);
  cancel.dataset.taskId = data.task_id;
  const file = data.status === "finished" ? data.files[0] : undefined;
  $("result").hidden = !file;
  if (file) {
    const image = $("result-image");
    if (image.getAttribute("src") !== file.file_url) image.src = file.file_url;
    image.alt = `The generated image, seed ${data.seed}`;
    image.width = data.width;
    image.height = data.height;
    $("result-meta").textContent = `Seed ${data.seed} · ${data.width}×${data.height} · ${data.engine}`;
    $("result-link").href = file.file_url;
  } else if (data.files_expired) {
    $("task-status").textContent += " (its files have been removed)";
  }
}

async function cancelTask() {
  clearError();
  try {
    const taskId = $("cancel").dataset.taskId;
    const data = await send(`/api/generate/cancel/${encodeURIComponent(taskId)}`, { method: "POST" });
    if (data.cancel_requested) stopping.add(taskId);
    showTask(data);
  } catch (error) {
    showError(error);
  }
}

// --- the form ----------------------------------------------------------------------

const references = [];

function isEdit() {
  return $("model").value.endsWith("-edit");
}

function fitFormToModel() {
  $("references").hidden = !isEdit();
  $("flex-options").hidden = !$("model").value.includes("-flex");
}

function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function submitBody() {
  const input = {
    prompt: $("prompt").value,
    size: $("size").value,
    resolution: $("resolution").value,
    output_format: $("output-format").value,
    seed: numberField("seed"),
  };
  if (!$("flex-options").hidden) {
    input.steps = numberField("steps");
    input.guidance = numberField("guidance");
  }
  if (isEdit()) input.image_urls = references.map((ref) => ref.fileUrl);
  return { model: $("model").value, input };
}

async function generate(event) {
  event.preventDefault();
  clearError();
  if (!apiKey()) {
    showError("Save an API key first.");
    return;
  }
  const button = $("submit");
  button.disabled = true;
  try {
    if (isEdit()) await Promise.all(references.map((ref) => ref.upload));
    const created = await sendJson("/api/generate/submit", submitBody());
    showAndFollow({ ...created, model: $("model").value, progress: 0 });
    loadHistory();
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

// --- reference images --------------------------------------------------------------

function addReferences(files) {
  clearError();
  for (const file of files) {
    if (references.length >= MAX_REFERENCES) {
      showError(`At most ${MAX_REFERENCES} reference images.`);
      return;
    }
    const ref = { fileUrl: null };
    const item = document.createElement("li");
    const preview = document.createElement("img");
    preview.src = URL.createObjectURL(file);
    preview.alt = "";
    const label = document.createElement("span");
    label.textContent = `${file.name}: uploading…`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove ${file.name}`);
    remove.addEventListener("click", () => dropReference(ref));
    item.append(preview, label, remove);
    $("reference-list").append(item);
    ref.item = item;
    references.push(ref);

    const form = new FormData();
    form.append("file", file);
    form.append("file_name", file.name);
    // Uploaded as soon as chosen; a submit waits for whatever is still on its way.
    ref.upload = send("/api/common/upload/stream", { method: "POST", body: form }).then(
      (data) => {
        ref.fileUrl = data.file_url;
        label.textContent = `${file.name}: uploaded`;
        item.dataset.fileUrl = data.file_url;
      },
      (error) => {
        dropReference(ref);
        throw error;
      },
    );
    ref.upload.catch(showError);
  }
}

function dropReference(ref) {
  const at = references.indexOf(ref);
  if (at >= 0) references.splice(at, 1);
  URL.revokeObjectURL(ref.item.querySelector("img").src);
  ref.item.remove();
}

function setUpDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    addReferences(event.dataTransfer.files);
  });
  $("reference-files").addEventListener("change", (event) => {
    addReferences(event.target.files);
    event.target.value = "";
  });
}

// --- history -----------------------------------------------------------------------

let nextCursor = null;

function historyItem(data) {
  const item = document.createElement("li");
  const file = data.status === "finished" ? data.files[0] : undefined;
  if (file) {
    const thumb = document.createElement("img");
    thumb.src = file.file_url;
    thumb.alt = `Image of task ${data.task_id}`;
    thumb.loading = "lazy";
    item.append(thumb);
  } else {
    const blank = document.createElement("div");
    blank.className = "no-image";
    blank.textContent = data.status === "failed" ? "failed" : "…";
    item.append(blank);
  }
  const text = document.createElement("span");
  text.textContent = `${data.model} · ${describe(data)} · ${data.created_time}` + (data.seed == null ? "" : ` · seed ${data.seed}`);
  const show = document.createElement("button");
  show.type = "button";
  show.textContent = "Show";
  show.setAttribute("aria-label", `Show task ${data.task_id}`);
  show.addEventListener("click", () => {
    clearError();
    showAndFollow(data);
  });
  item.append(text, show);
  return item;
}

async function loadHistory(more = false) {
  if (!apiKey()) return;
  const params = new URLSearchParams({ limit: String(HISTORY_PAGE) });
  if (more && nextCursor) params.set("cursor", nextCursor);
  try {
    const page = await send(`/api/generate/tasks?${params}`);
    const list = $("history");
    if (!more) list.replaceChildren();
    list.append(...page.tasks.map(historyItem));
    nextCursor = page.next_cursor;
    $("history-more").hidden = !nextCursor;
  } catch (error) {
    showError(error);
  }
}

// --- start -------------------------------------------------------------------------

function start() {
  takeKeyFromFragment();
  showKeyState();
  fitFormToModel();
  setUpDropZone();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    clearError();
    const key = $("key").value.trim();
    if (key) localStorage.setItem(KEY_ITEM, key);
    else localStorage.removeItem(KEY_ITEM);
    showKeyState();
    loadHistory();
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_ITEM);
    showKeyState();
    $("history").replaceChildren();
    $("history-more").hidden = true;
  });
  $("model").addEventListener("change", fitFormToModel);
  $("generate").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancelTask);
  $("history-refresh").addEventListener("click", () => loadHistory());
  $("history-more").addEventListener("click", () => loadHistory(true));
  loadHistory();
}

start();
