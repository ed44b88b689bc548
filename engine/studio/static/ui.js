// What every view shares: the message area (role="alert"), a small event bus, and navigation.
// Kept apart from app.js so views can import it without importing each other's start-up.

const listeners = new Map();

/** Subscribe to a page event ("generations-changed", "characters-changed"). */
export function on(name, handler) {
  if (!listeners.has(name)) listeners.set(name, new Set());
  listeners.get(name).add(handler);
}

export function emit(name, detail) {
  for (const handler of listeners.get(name) || []) handler(detail);
}

function messageParts() {
  const box = document.getElementById("message");
  return { box, text: box.querySelector("[data-testid=message-text]") };
}

/** Show an error where the user sees it: the server's message, with the field it names. */
export function showError(error, context) {
  const text = error && error.readable ? error.readable : String((error && error.message) || error);
  show(context ? `${context}: ${text}` : text, "error");
  console.error(error); // the stack for whoever debugs
}

export function showInfo(text) {
  show(text, "info");
}

function show(text, kind) {
  const { box, text: span } = messageParts();
  span.textContent = text;
  box.dataset.kind = kind;
  box.hidden = false;
}

export function clearMessage() {
  messageParts().box.hidden = true;
}

/** Go to a view ("generate", "gallery", ...). */
export function go(view) {
  if (location.hash !== `#${view}`) location.hash = `#${view}`;
}

/** Run an async action from a button: disabled while it runs (never stuck: re-enabled in finally),
 *  errors shown. Resolves to the action's result or undefined on error. */
export async function busy(button, action, context) {
  if (button) button.disabled = true;
  try {
    return await action();
  } catch (error) {
    showError(error, context);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}
