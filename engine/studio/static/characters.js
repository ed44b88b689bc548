// The Characters view: create one from 1-5 photos of one person (each uploaded through the init-image
// flow, then POST /refgen/characters {name, anchor, images: [{id, type}]}),
// list them, view the anchors with the face each one was found at (bbox drawn over the photo),
// the identity anchor text, delete; train a LoRA of one and follow its trainings (training.js).

import { blobUrl, request, upload } from "./api.js";
import { el, fill, field } from "./dom.js";
import { trainForm, trainingList } from "./training.js";
import { busy, clearMessage, emit, on, showError, showInfo } from "./ui.js";

let list = null;
let view = null;
let previews = null;

export function mount(section) {
  list = el("ul", { class: "character-list", dataset: { testid: "character-list" } });
  view = el("div", { class: "character-view", dataset: { testid: "character-view" } });
  section.append(el("h2", {}, "Characters"),
    el("div", { class: "characters-layout" }, createForm(), el("div", {}, el("h3", {}, "Saved"), list), view));
  on("characters-changed", load);
  load();
}

export function shown() {
  load();
}

function createForm() {
  const name = el("input", { name: "name", required: true, maxlength: 64, dataset: { testid: "character-new-name" } });
  const anchor = el("input", { name: "anchor", dataset: { testid: "character-new-anchor" },
    placeholder: "a woman with short red hair and freckles" });
  const photos = el("input", { type: "file", name: "photos", multiple: true, accept: "image/png,image/jpeg,image/webp",
    dataset: { testid: "character-new-photos" } });
  previews = el("div", { class: "chips", dataset: { testid: "character-new-previews" } });
  photos.addEventListener("change", () => showPreviews([...photos.files]));
  const create = el("button", { type: "submit", class: "primary", dataset: { testid: "character-create" } }, "Create character");
  const form = el("form", { class: "block", dataset: { testid: "character-form" } },
    el("h3", {}, "New character"),
    field("Name", name),
    field("Identity anchor text (optional: how to describe this person)", anchor),
    field("Photos (1-5, one person each, face clearly visible)", photos),
    previews, create);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(create, async () => {
      const files = [...photos.files];
      if (!name.value.trim()) throw Object.assign(new Error("name"), { readable: "name: give the character a name" });
      if (!files.length || files.length > 5) throw Object.assign(new Error("photos"), { readable: "photos: choose 1 to 5 photos" });
      markPhoto(null);
      const images = [];
      for (const [index, file] of files.entries()) {
        try {
          images.push({ id: await upload(file), type: "UPLOADED" });
        } catch (error) {
          markPhoto(index);
          error.message = `photo ${index + 1} (${file.name}): ${error.message}`;
          throw error;
        }
      }
      const body = { name: name.value.trim(), anchor: anchor.value.trim(), images };
      try {
        const answer = await request("POST", "/refgen/characters", body);
        clearMessage();
        showInfo(`created ${answer.character.name}`);
        form.reset();
        fill(previews);
        emit("characters-changed");
        showCharacter(answer.character);
      } catch (error) {
        markPhoto(photoIndex(error));
        throw error;
      }
    }, "create character");
  });
  return form;
}

function showPreviews(files) {
  fill(previews, files.map((file, index) => el("figure", { class: "chip", dataset: { index } },
    el("img", { class: "thumb", src: URL.createObjectURL(file), alt: `photo ${index + 1}: ${file.name}` }),
    el("figcaption", {}, `${index + 1}. ${file.name}`))));
}

/** Which photo (0-based) an error is about: the field "images[i]..." or the message's "anchor image n". */
function photoIndex(error) {
  const byField = /^images\[(\d+)\]/.exec(error.field || "");
  if (byField) return Number(byField[1]);
  const byMessage = /anchor image (\d+)/.exec(error.message || "");
  return byMessage ? Number(byMessage[1]) - 1 : null;
}

/** Mark that photo's preview (null: none). */
function markPhoto(index) {
  for (const node of previews.children) node.classList.toggle("invalid", index !== null && Number(node.dataset.index) === index);
}

async function load() {
  try {
    const answer = await request("GET", "/refgen/characters");
    fill(list, answer.characters.length ? answer.characters.map(listItem) : el("li", { class: "hint" }, "No characters yet."));
  } catch (error) {
    fill(list, el("li", { class: "hint" }, "The characters could not be listed."));
    showError(error, "could not list the characters");
  }
}

function listItem(character) {
  const open = el("button", { type: "button", class: "link", dataset: { testid: "character-open", name: character.name } },
    `${character.name} (${(character.anchors || []).length} photo${(character.anchors || []).length === 1 ? "" : "s"})`);
  open.addEventListener("click", () => busy(open, async () => {
    const answer = await request("GET", `/refgen/characters/${encodeURIComponent(character.name)}`);
    showCharacter(answer.character);
  }, "character"));
  const remove = el("button", { type: "button", class: "quiet", dataset: { testid: "character-delete", name: character.name },
    "aria-label": `delete ${character.name}` }, "Delete");
  remove.addEventListener("click", () => busy(remove, async () => {
    if (!window.confirm(`Delete the character ${character.name}?`)) return;
    await request("DELETE", `/refgen/characters/${encodeURIComponent(character.name)}`);
    if (view.dataset.name === character.name) fill(view);
    emit("characters-changed");
  }, "delete character"));
  return el("li", { dataset: { testid: "character-item", name: character.name } }, open, remove);
}

/** One character: its anchor text, settings, and every anchor photo with the face box drawn over it. */
function showCharacter(character) {
  view.dataset.name = character.name;
  const anchors = el("div", { class: "anchors" });
  fill(view, el("h3", {}, character.name),
    el("dl", {}, el("dt", {}, "Identity anchor"), el("dd", { dataset: { testid: "character-anchor-text" } }, character.anchor || "(none)"),
      el("dt", {}, "Keeps"), el("dd", {}, character.keep || "face"),
      character.created && [el("dt", {}, "Created"), el("dd", {}, character.created)],
      character.lora && [el("dt", {}, "LoRA"), el("dd", {}, String(character.lora))]),
    anchors, trainingList(character), trainForm(character, showCharacter));
  for (const anchor of character.anchors || []) anchors.append(anchorFigure(anchor));
  if (character.faceUrl) anchors.append(faceFigure(character.faceUrl));
}

/** The aligned face crop the identity is computed from. */
function faceFigure(url) {
  const img = el("img", { class: "face", alt: "the aligned face the identity comes from" });
  blobUrl(url).then((src) => { img.src = src; }).catch(() => { img.alt = "face crop not available"; });
  return el("figure", { dataset: { testid: "character-face" } }, img, el("figcaption", {}, "identity face"));
}

/** The photo (fetched with the key: anchor URLs are API paths) and its bbox as a box in percent. */
function anchorFigure(anchor) {
  const img = el("img", { alt: `anchor photo ${anchor.index}` });
  const frame = el("div", { class: "anchor-frame" }, img);
  if (anchor.bbox && anchor.width && anchor.height) {
    const [x1, y1, x2, y2] = anchor.bbox;
    const box = el("div", { class: "bbox", dataset: { testid: "anchor-bbox" }, title: `face at ${anchor.bbox.map(Math.round).join(", ")}` });
    box.style.left = `${(100 * x1) / anchor.width}%`;
    box.style.top = `${(100 * y1) / anchor.height}%`;
    box.style.width = `${(100 * (x2 - x1)) / anchor.width}%`;
    box.style.height = `${(100 * (y2 - y1)) / anchor.height}%`;
    frame.append(box);
  }
  blobUrl(anchor.url).then((url) => { img.src = url; }).catch((error) => showError(error, `anchor ${anchor.index}`));
  return el("figure", { dataset: { testid: "anchor" } }, frame,
    el("figcaption", {}, `anchor ${anchor.index}${anchor.width ? ` · ${anchor.width}×${anchor.height}` : ""}`));
}
