// The Gallery view: every generation (newest first) with its images; a picked image opens a detail
// panel with its recipe (GET /refgen/images/{id}: the PNG's provenance) and the actions. Each image lists
// its earlier upscales (generated_image_variation_generics). A contact sheet shows every loaded image in one
// dense grid.

import { me, request } from "./api.js";
import { el, fill, field, select } from "./dom.js";
import { remix, reuseSeed, useImage } from "./generate.js";
import { runGeneration, runUpscale } from "./jobs.js";
import { busy, emit, on, showError, showInfo } from "./ui.js";

const PAGE = 20;
let root = null;
let list = null;
let detail = null;
let more = null;
let generations = [];
let sheet = false;
let stale = false; // a job finished while the gallery was hidden

export function mount(section) {
  root = section;
  const refresh = el("button", { type: "button", dataset: { testid: "gallery-refresh" } }, "Refresh");
  const toggle = el("button", { type: "button", "aria-pressed": "false", dataset: { testid: "contact-sheet-toggle" } }, "Contact sheet");
  refresh.addEventListener("click", () => busy(refresh, load, "gallery"));
  toggle.addEventListener("click", () => {
    sheet = !sheet;
    toggle.setAttribute("aria-pressed", String(sheet));
    render();
  });
  list = el("div", { class: "gallery", dataset: { testid: "gallery-list" } });
  detail = el("aside", { class: "detail", dataset: { testid: "image-detail" }, "aria-label": "image details", hidden: true });
  more = el("button", { type: "button", hidden: true, dataset: { testid: "gallery-more" } }, "Load more");
  more.addEventListener("click", () => busy(more, () => load(generations.length), "gallery"));
  section.append(el("div", { class: "row" }, el("h2", {}, "Gallery"), refresh, toggle),
    el("div", { class: "gallery-layout" }, el("div", {}, list, more), detail));
  on("generations-changed", () => {
    if (root.hidden) stale = true;
    else load();
  });
  load();
}

export function shown() {
  if (stale) load();
  stale = false;
}

/** Load the first page (offset 0) again, or append the next one. */
async function load(offset = 0) {
  try {
    const user = await me();
    const answer = await request("GET", `/generations/user/${user}?offset=${offset}&limit=${PAGE}`);
    generations = offset ? generations.concat(answer.generations) : answer.generations;
    more.hidden = answer.generations.length < PAGE;
    render();
  } catch (error) {
    showError(error, "could not load the gallery");
  }
}

/** A generation's images with their refgen facts (seed, identity score, rank), best first when the server
 *  ranked them (best-of: refgen.images[].rank, 1-based; null otherwise: the generation's order). */
function imagesOf(generation) {
  const facts = Object.fromEntries(((generation.refgen && generation.refgen.images) || []).map((x) => [x.id, x]));
  const images = (generation.generated_images || []).map((image) => ({ ...image, ...(facts[image.id] || {}),
    generationId: generation.id, prompt: generation.prompt }));
  if (images.some((x) => x.rank)) images.sort((a, b) => (a.rank || Infinity) - (b.rank || Infinity));
  return images;
}

function render() {
  if (sheet) return renderSheet();
  fill(list, generations.length ? generations.map(generationCard) : el("p", { class: "hint" }, "No generations yet."));
}

function renderSheet() {
  const images = generations.flatMap(imagesOf);
  fill(list, el("div", { class: "contact-sheet", dataset: { testid: "contact-sheet" } },
    images.map((image) => thumbButton(image, "sheet-image"))));
}

function generationCard(generation) {
  const images = imagesOf(generation);
  const ranked = images.some((x) => x.rank);
  const remove = el("button", { type: "button", class: "quiet", dataset: { testid: "generation-delete" } }, "Delete generation");
  remove.addEventListener("click", () => busy(remove, async () => {
    await request("DELETE", `/generations/${generation.id}`);
    emit("generations-changed");
  }, "delete"));
  const status = generation.status === "FAILED" ? `failed${generation.refgen && generation.refgen.error ? `: ${generation.refgen.error}` : ""}`
    : generation.status;
  return el("article", { class: "generation", dataset: { testid: "generation", id: generation.id } },
    el("header", {}, el("p", { class: "prompt" }, generation.prompt || "(no prompt)"),
      el("span", { class: "meta" }, [generation.imageWidth && `${generation.imageWidth}×${generation.imageHeight}`,
        status, ranked && "best-of: ranked by identity"].filter(Boolean).join(" · ")), remove),
    el("div", { class: "images" }, images.map((image) => el("figure", {}, thumbButton(image, "gallery-image"),
      el("figcaption", {}, [image.rank && `#${image.rank}`, image.seed !== undefined && `seed ${image.seed}`,
        typeof image.identityScore === "number" && `identity ${image.identityScore.toFixed(3)}`].filter(Boolean).join(" · ")),
      upscaleLinks(image)))));
}

/** The image's earlier upscales (Leonardo's generated_image_variation_generics), each a link to the PNG
 *  with a small thumbnail and its size (read from the loaded picture: the API gives no size). */
function upscaleLinks(image) {
  const upscales = (image.generated_image_variation_generics || []).filter((v) => v.transformType === "UPSCALE");
  if (!upscales.length) return null;
  return el("ul", { class: "upscales", dataset: { testid: "image-upscales" }, "aria-label": "upscales of this image" },
    upscales.map((v) => {
      if (v.status !== "COMPLETE" || !v.url) return el("li", { class: "meta" }, `upscale ${v.status.toLowerCase()}`);
      const size = el("span", { dataset: { testid: "upscale-size" } }, "upscale");
      const img = el("img", { src: v.url, alt: "", loading: "lazy" });
      img.addEventListener("load", () => { size.textContent = `${img.naturalWidth}×${img.naturalHeight}`; });
      return el("li", {}, el("a", { href: v.url, download: `refgen-upscale-${v.id}.png`, dataset: { testid: "image-upscale", id: v.id },
        title: "download this upscale" }, img, size));
    }));
}

function thumbButton(image, testid) {
  const button = el("button", { type: "button", class: "thumb-button", dataset: { testid, imageId: image.id },
    "aria-label": `open image (seed ${image.seed ?? "?"}) of: ${image.prompt || ""}` },
  el("img", { src: image.url, alt: "", loading: "lazy" }));
  button.addEventListener("click", () => openDetail(image, button));
  return button;
}

// ------------------------------------------------------------------------------------------ detail

async function openDetail(image, opener) {
  detail.hidden = false;
  fill(detail, el("p", {}, "loading the recipe..."));
  let info = null;
  try {
    info = await request("GET", `/refgen/images/${image.id}`);
  } catch (error) {
    showError(error, "could not load this image's recipe");
  }
  const facts = { ...image, ...(info || {}) };
  fill(detail,
    el("div", { class: "row" }, el("h3", {}, "Image"),
      el("button", { type: "button", class: "quiet", dataset: { testid: "detail-close" }, onclick: () => {
        detail.hidden = true;
        if (opener && opener.isConnected) opener.focus(); // keyboard users continue where they were
      } }, "Close")),
    el("img", { class: "big", src: facts.url, alt: `image of: ${image.prompt || ""}`, dataset: { testid: "detail-image" } }),
    el("p", { class: "meta" }, [facts.rank && `rank #${facts.rank}`, facts.seed !== undefined && `seed ${facts.seed}`,
      typeof facts.identityScore === "number" && `identity score ${facts.identityScore.toFixed(3)}`].filter(Boolean).join(" · ")),
    actions(facts, info),
    el("h4", {}, "Recipe (from the PNG's provenance)"),
    info ? recipeSummary(info.recipe) : null,
    el("details", { open: true }, el("summary", {}, "everything (JSON)"),
      el("pre", { class: "recipe", dataset: { testid: "recipe" }, tabindex: 0 },
        info ? JSON.stringify(info.recipe, null, 2) : "not available")));
  detail.querySelector("button").focus();
}

/** The recipe's main facts (what ran, from "resolved": preset and mode defaults filled in) as a short list. */
function recipeSummary(recipe) {
  const r = (recipe && recipe.resolved) || {};
  const image = (recipe && recipe.image) || {};
  const refs = (r.references || []).map((x) => `${x.kind} (${x.strength_type || x.weight}${x.influence ? `, influence ${x.influence}` : ""})`);
  const controls = (r.controlnets || []).map((x) => `${x.type} ${x.weight}`);
  const loras = (r.loras || []).map((x) => `${String(x.path || x.name || "?").split("/").pop()} (${x.weight})`); // userElements
  const character = r.character ? (r.character.name || `${(r.character.images || []).length || "?"} photo(s)`) : null;
  const rows = [
    ["Prompt", r.prompt], ["Negative", r.negative_prompt], ["Size", image.width && `${image.width} × ${image.height}`],
    ["Seed", image.seed], ["Steps", r.steps], ["Guidance", r.guidance_scale], ["Scheduler", r.scheduler],
    ["Mode", r.mode], ["Preset", r.preset], ["Init strength", r.init_strength],
    ["References", refs.join(", ")], ["ControlNet", controls.join(", ")], ["Character", character], ["LoRAs", loras.join(", ")],
  ].filter(([, value]) => value !== null && value !== undefined && value !== "");
  return el("dl", { class: "summary", dataset: { testid: "recipe-summary" } },
    rows.map(([key, value]) => [el("dt", {}, key), el("dd", {}, String(value))]));
}

function actions(image, info) {
  const button = (text, testid, action, context) => {
    const node = el("button", { type: "button", dataset: { testid } }, text);
    node.addEventListener("click", () => busy(node, action, context));
    return node;
  };
  const prompt = (info && info.recipe && info.recipe.prompt) || image.prompt || "";
  const group = el("div", { class: "actions", role: "group", "aria-label": "image actions" },
    button("Replay", "action-replay", async () => {
      if (!info || !info.replay) throw new Error("this image has no replay recipe");
      await runGeneration(info.replay, `replay of seed ${image.seed}`);
    }, "replay"),
    button("Upscale x2", "action-upscale-2", () => runUpscale(image.id, 2), "upscale"),
    button("Upscale x4", "action-upscale-4", () => runUpscale(image.id, 4), "upscale"),
    button("Remix", "action-remix", async () => remix(image, prompt)),
    button("Use as init", "action-use-init", async () => useImage("init", image)),
    button("Use as style reference", "action-use-style", async () => useImage("style", image)),
    button("Use as content reference", "action-use-content", async () => useImage("content", image)),
    button("Reuse this seed", "action-reuse-seed", async () => reuseSeed(image.seed)),
    el("a", { class: "button", href: image.url, download: `refgen-${image.id}.png`, dataset: { testid: "action-download" } }, "Download PNG"),
    button("Delete image", "action-delete", async () => {
      await request("DELETE", `/refgen/images/${image.id}`);
      detail.hidden = true;
      emit("generations-changed");
    }, "delete"));
  group.append(addToCharacter(image));
  return group;
}

/** "Add to character": this image as one more anchor of a saved character (max 5). */
function addToCharacter(image) {
  const wrapper = el("div", { class: "row" });
  request("GET", "/refgen/characters").then((answer) => {
    const names = answer.characters.map((c) => c.name);
    if (!names.length) return;
    const choice = select(names, { dataset: { testid: "add-to-character-name" } });
    const add = el("button", { type: "button", dataset: { testid: "action-add-to-character" } }, "Add to character");
    add.addEventListener("click", () => busy(add, async () => {
      await request("POST", `/refgen/characters/${encodeURIComponent(choice.value)}/anchors`, { id: image.id, type: "GENERATED" });
      showInfo(`added to ${choice.value}`);
      emit("characters-changed");
    }, "add to character"));
    wrapper.append(field("Character", choice), add);
  }).catch(() => {}); // no characters endpoint: the action is simply not offered
  return wrapper;
}
