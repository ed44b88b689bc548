// The page's only way to the server: refgen's public HTTP API (/api/rest/v1), exactly what a script
// would call. Auth: `Authorization: Bearer <key>` when the server has a key (kept in sessionStorage,
// asked for on a 401). Errors: the server's {"error", "field"} become an ApiError.

export const BASE = "/api/rest/v1";
const KEY_STORAGE = "refgen.apiKey";

export class ApiError extends Error {
  constructor(message, { status = 0, field = null } = {}) {
    super(message);
    this.status = status;
    this.field = field;
  }
  /** "field: message" when the server named the field. */
  get readable() {
    const named = this.field && !this.message.startsWith(`${this.field}:`); // some messages name it already
    return named ? `${this.field}: ${this.message}` : this.message;
  }
}

let askForKey = async () => null; // app.js installs the dialog

/** app.js registers how to ask the user for the key (a promise of the key, or null when cancelled). */
export function onKeyNeeded(asker) {
  askForKey = asker;
}

export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** fetch() with the key; on a 401 ask for the key once and try again. */
async function send(path, init = {}) {
  const url = resolve(path);
  let response;
  for (let attempt = 0; attempt < 3; attempt += 1) {
    try {
      response = await fetch(url, { ...init, headers: headers(init.headers) });
    } catch (error) {
      throw new ApiError(`cannot reach the refgen server (${error.message})`);
    }
    if (response.status !== 401) return response;
    const message = await errorMessage(response);
    const key = await askForKey(message);
    if (!key) throw new ApiError(`${message} (no API key given)`, { status: 401 });
    setKey(key);
  }
  return response;
}

/** "/me" -> "/api/rest/v1/me"; full URLs and "/api/..." paths (as the server hands them out) stay. */
function resolve(path) {
  return /^https?:/.test(path) || path.startsWith("/api/") ? path : BASE + path;
}

async function errorMessage(response) {
  return (await readError(response)).message;
}

/** The server's {"error", "field"} as an ApiError (or the HTTP status when the body is not that). */
async function readError(response) {
  let error = `HTTP ${response.status} ${response.statusText}`.trim();
  let field = null;
  try {
    const body = await response.clone().json();
    if (body && typeof body.error === "string") error = body.error;
    else if (body && typeof body.detail === "string") error = body.detail;
    if (body && typeof body.field === "string") field = body.field;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(error, { status: response.status, field });
}

/** A JSON call: request("GET", "/me"), request("POST", "/generations", body). */
export async function request(method, path, body) {
  const init = { method };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers = { "Content-Type": "application/json" };
  }
  const response = await send(path, init);
  if (!response.ok) throw await readError(response);
  if (response.status === 204) return null;
  return response.json();
}

/** An API path that needs the key (character anchors) as an object URL an <img> can show. */
export async function blobUrl(path) {
  const response = await send(path);
  if (!response.ok) throw await readError(response);
  return URL.createObjectURL(await response.blob());
}

const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };

/** Upload a File/Blob through Leonardo's presigned flow; resolves to the init image id (type UPLOADED).
 *  A file that is not an image type we know is still sent as png: the server judges the bytes and its
 *  422 ("file": ...) is what the user sees. */
export async function upload(file) {
  const extension = EXTENSIONS[file.type] || extensionOf(file.name) || "png";
  const slot = (await request("POST", "/init-image", { extension })).uploadInitImage;
  const form = new FormData();
  for (const [key, value] of Object.entries(JSON.parse(slot.fields))) form.append(key, value);
  form.append("file", file, file.name || `upload.${extension}`);
  const response = await send(slot.url, { method: "POST", body: form });
  if (!response.ok) throw await readError(response);
  return slot.id;
}

function extensionOf(name) {
  const match = /\.(png|jpe?g|webp)$/i.exec(name || "");
  return match ? match[1].toLowerCase() : null;
}

/** The user's id (GET /me), asked once. */
let userId = null;
export async function me() {
  if (!userId) {
    const answer = await request("GET", "/me");
    userId = answer.user_details[0].user.id;
  }
  return userId;
}

/** Follow a generation's server-sent events (GET /generations/{id}/events). EventSource cannot send the
 *  Authorization header, so this reads the stream with fetch() and splits it on blank lines.
 *  onProgress({status, progress}) per "progress" event; resolves to the final GET answer
 *  (the "done" event's data) or {deleted: true}. `signal` aborts the reading. */
export async function followEvents(generationId, onProgress, signal) {
  const response = await send(`/generations/${generationId}/events`, { signal });
  if (!response.ok) throw await readError(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event.name === "progress") onProgress(event.data);
      else if (event.name === "done") return event.data;
      else if (event.name === "deleted") return { deleted: true };
    }
  }
  // The stream ended without "done" (server restart, proxy): fall back to one GET.
  return request("GET", `/generations/${generationId}`);
}

function parseEvent(text) {
  let name = "message";
  const data = [];
  for (const line of text.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  let parsed = null;
  try {
    parsed = data.length ? JSON.parse(data.join("\n")) : null;
  } catch {
    parsed = null;
  }
  return { name, data: parsed };
}

/** Poll an upscale variation until it is no longer PENDING; resolves to the variation record. */
export async function waitForVariation(variationId, { every = 500, signal } = {}) {
  for (;;) {
    const answer = await request("GET", `/variations/${variationId}`);
    const variation = answer.generated_image_variation_generic[0];
    if (variation.status !== "PENDING") {
      if (variation.status === "FAILED") throw new ApiError(answer.error || "the upscale failed");
      return variation;
    }
    if (signal && signal.aborted) throw new ApiError("stopped");
    await new Promise((resolve) => setTimeout(resolve, every));
  }
}

/** Poll a LoRA training (GET /elements/{id}) until it is no longer PENDING. onUpdate(record) gets every
 *  answer's user_loras_by_pk (with refgen.progress {step,total,loss}); resolves to the last one (COMPLETE
 *  or FAILED, the reason in its `error`). Stops (resolves null) once `keepGoing()` says no: the view it
 *  draws into is gone. */
export async function watchElement(loraId, onUpdate, { every = 500, keepGoing = () => true } = {}) {
  for (;;) {
    const answer = await request("GET", `/elements/${loraId}`);
    const record = { ...answer.user_loras_by_pk, error: answer.error || null };
    if (!keepGoing()) return null;
    onUpdate(record);
    if (record.status !== "PENDING") return record;
    await new Promise((resolve) => setTimeout(resolve, every));
  }
}
