// Start-up: the views behind hash links (#generate, #gallery, #characters, #weights), the API key
// dialog (asked for on a 401, kept in sessionStorage), and the message area's close button.

import { onKeyNeeded, getKey, setKey, request } from "./api.js";
import { clearMessage } from "./ui.js";
import * as generate from "./generate.js";
import * as gallery from "./gallery.js";
import * as characters from "./characters.js";
import * as weights from "./weights.js";

const VIEWS = { generate, gallery, characters, weights };
const mounted = new Set();

function route() {
  const name = location.hash.replace(/^#/, "") in VIEWS ? location.hash.slice(1) : "generate";
  for (const key of Object.keys(VIEWS)) {
    const section = document.getElementById(`view-${key}`);
    section.hidden = key !== name;
    const tab = document.querySelector(`nav a[data-view=${key}]`);
    if (key === name) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  const section = document.getElementById(`view-${name}`);
  if (!mounted.has(name)) {
    mounted.add(name);
    VIEWS[name].mount(section);
  } else if (VIEWS[name].shown) {
    VIEWS[name].shown(); // e.g. the gallery reloads
  }
  document.body.dataset.view = name;
}

/** The key dialog: resolves to the key typed, or null when cancelled. One dialog at a time. */
let pending = null;
function askForKey(reason) {
  if (pending) return pending;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason || "This server needs an API key.";
  input.value = getKey();
  pending = new Promise((resolve) => {
    const done = (key) => {
      dialog.removeEventListener("close", onClose);
      pending = null;
      resolve(key);
    };
    const onClose = () => done(dialog.returnValue === "save" && input.value.trim() ? input.value.trim() : null);
    dialog.addEventListener("close", onClose);
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
  return pending;
}

async function serverInfo() {
  const info = document.querySelector("[data-testid=server-info]");
  try {
    const catalog = await request("GET", "/refgen/catalog");
    info.textContent = `model: ${catalog.model}`;
  } catch {
    info.textContent = "";
  }
}

function start() {
  onKeyNeeded(askForKey);
  document.getElementById("key-cancel").addEventListener("click", () => document.getElementById("key-dialog").close(""));
  document.getElementById("key-button").addEventListener("click", async () => {
    const key = await askForKey("Set or change the API key this page sends (empty: none).");
    if (key !== null) setKey(key);
  });
  document.querySelector("[data-testid=message-close]").addEventListener("click", clearMessage);
  window.addEventListener("hashchange", route);
  route();
  serverInfo();
}

start();
