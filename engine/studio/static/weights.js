// The Weights view: every component (installed or which files are missing) and, per feature, what it
// still needs with the exact `refgen weights fetch` command (GET /refgen/weights; nothing downloads here).

import { request } from "./api.js";
import { catalog } from "./catalog.js";
import { el, fill } from "./dom.js";
import { busy, showError } from "./ui.js";

let body = null;

export function mount(section) {
  body = el("div", { dataset: { testid: "weights-body" } }, el("p", {}, "loading..."));
  const refresh = el("button", { type: "button", dataset: { testid: "weights-refresh" } }, "Refresh");
  refresh.addEventListener("click", () => busy(refresh, load, "weights"));
  section.append(el("div", { class: "row" }, el("h2", {}, "Weights"), refresh), body);
  load();
}

export function shown() {
  load();
}

async function load() {
  try {
    render(await request("GET", "/refgen/weights"));
  } catch (error) {
    fill(body, el("p", {}, "The weights status could not be loaded."));
    showError(error, "could not load the weights status");
  }
}

function render(status) {
  const features = status.features || [];
  const components = status.components || [];
  const tiny = el("p", { class: "hint" });
  catalog().then((c) => {
    if (c.model === "tiny") tiny.textContent = "This server runs the built-in tiny model: every feature works with its random stand-ins, so nothing below is needed to try the page.";
  });
  fill(body, tiny,
    el("p", {}, "Weights folder: ", el("code", {}, status.weights_dir || "?")),
    el("h3", {}, "Features"),
    el("table", { class: "table", dataset: { testid: "features" } },
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Feature"), el("th", { scope: "col" }, "Ready"),
        el("th", { scope: "col" }, "Missing"), el("th", { scope: "col" }, "Fetch command"))),
      el("tbody", {}, features.map((f) => el("tr", { dataset: { testid: "feature", feature: f.feature, ready: String(f.ready) } },
        el("th", { scope: "row" }, f.feature),
        el("td", { class: f.ready ? "ok" : "missing" }, f.ready ? "ready" : "missing"),
        el("td", {}, (f.missing || []).join(", ")),
        el("td", {}, f.fetch ? el("code", { class: "command", dataset: { testid: "fetch-command" } }, f.fetch) : ""))))),
    el("h3", {}, "Components"),
    el("table", { class: "table", dataset: { testid: "components" } },
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Component"), el("th", { scope: "col" }, "Kind"),
        el("th", { scope: "col" }, "Installed"), el("th", { scope: "col" }, "Size"), el("th", { scope: "col" }, "Missing files"))),
      el("tbody", {}, components.map((c) => el("tr", { dataset: { testid: "component", name: c.name } },
        el("th", { scope: "row" }, c.name), el("td", {}, c.kind || ""),
        el("td", { class: c.present ? "ok" : "missing" }, c.present ? "yes" : "no"),
        el("td", {}, size(c.size)), el("td", {}, (c.missing_files || c.missing || []).join(", ")))))));
}

function size(bytes) {
  if (!bytes) return "";
  const units = ["B", "KB", "MB", "GB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}
