// The Generate view: prompt bar, references (style / content / character), ControlNet units, init
// image, trained LoRA elements, aspect ratio, mode, preset, count, seed, advanced sampling. It builds one
// Leonardo generation body (plus refgen's extension object) and hands it to jobs.js.

import { request, upload } from "./api.js";
import { catalog } from "./catalog.js";
import { el, fill, field, select, uid } from "./dom.js";
import { runGeneration } from "./jobs.js";
import { busy, clearMessage, go, on, showError } from "./ui.js";

const REMIX_INIT_STRENGTH = 0.35; // engine/remix.py: closeness to the original (Leonardo's meaning)
const REMIX_EDGE_WEIGHT = 0.6; // and an Edge (canny) unit of the same image holding its outlines

// What the form holds besides its plain inputs. An image "source" is {type: "UPLOADED"|"GENERATED", id, url}.
const state = {
  styles: [], // {source, strengthType, influence}
  content: null, // {source, strengthType}
  character: { mode: "none", name: "", photos: [], strengthType: "Mid", keep: "", mask: null, bestOf: "" },
  controls: [], // {preprocessorId, source, weight}
  init: null, // {source, strength}
  elements: [], // {userLoraId, name, weight}: trained LoRAs (GET /elements) -> userElements
};

const ELEMENT_WEIGHT = { min: -4, max: 4, default: 1 }; // GET /elements' weightMin/weightMax/weightDefault

let form = null; // the <form>; its inputs are found by name
let cat = null; // the catalog
const parts = {}; // containers re-rendered when state changes

export function mount(section) {
  form = el("form", { class: "generate", dataset: { testid: "generate-form" }, novalidate: true });
  section.append(el("h2", { class: "visually-hidden" }, "Generate"), form);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.append(el("p", { class: "hint" }, "loading the catalog..."));
  catalog().then((answer) => {
    cat = answer;
    build();
  });
  on("characters-changed", () => cat && renderCharacter());
  on("elements-changed", () => cat && loadElementChoices()); // a training ended (training.js)
}

// ------------------------------------------------------------------------------------------ layout

function build() {
  fill(form, promptBar(), settingsRow(), referencesBlock(), controlsBlock(), initBlock(), elementsBlock(), advancedBlock());
  renderAll();
  loadElementChoices();
}

function promptBar() {
  const prompt = el("textarea", { name: "prompt", rows: 2, required: true, dataset: { testid: "prompt" },
    placeholder: "a lighthouse on a cliff at dusk" });
  prompt.addEventListener("keydown", (event) => {
    // Enter generates (Shift+Enter: a new line); Ctrl+Enter works anywhere in the form.
    if (event.key === "Enter" && !event.shiftKey && !event.ctrlKey && !event.metaKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  const negative = el("textarea", { name: "negative_prompt", rows: 1, dataset: { testid: "negative-prompt" },
    placeholder: "blurry, text, watermark" });
  const button = el("button", { type: "submit", class: "primary", dataset: { testid: "generate" } }, "Generate");
  return el("div", { class: "prompt-bar" },
    field("Prompt (Enter or Ctrl+Enter to generate, Shift+Enter for a new line)", prompt),
    field("Negative prompt", negative),
    el("div", { class: "generate-button" }, button));
}

function settingsRow() {
  const ratios = cat.aspectRatios.map((r) => [r.ratio, `${r.ratio} (${r.width}×${r.height})`]);
  const ratio = select([["", cat.nativeSize ? `native (${cat.nativeSize}×${cat.nativeSize})` : "model default"], ...ratios],
    { name: "aspectRatio", dataset: { testid: "aspect-ratio" } });
  const one = cat.aspectRatios.find((r) => r.ratio === "1:1");
  if (one) ratio.value = "1:1";
  const size = el("output", { dataset: { testid: "resolved-size" } });
  const showSize = () => {
    const chosen = cat.aspectRatios.find((r) => r.ratio === ratio.value);
    size.textContent = chosen ? `${chosen.width} × ${chosen.height} px` : "";
  };
  ratio.addEventListener("change", showSize);
  showSize();

  const modes = el("fieldset", { class: "modes", dataset: { testid: "mode" } }, el("legend", {}, "Mode"));
  for (const mode of cat.modes) {
    const id = uid("mode");
    modes.append(el("input", { type: "radio", name: "mode", id, value: mode, checked: mode === "fast",
      dataset: { testid: `mode-${mode}` } }), el("label", { for: id }, mode[0].toUpperCase() + mode.slice(1)));
  }

  const preset = el("select", { name: "preset", dataset: { testid: "preset" } }, el("option", { value: "" }, "none"));
  for (const [source, label] of [["builtin", "Built-in"], ["user", "Yours"]]) {
    const group = el("optgroup", { label });
    for (const p of cat.presets.filter((x) => (x.source || "builtin") === source)) {
      group.append(el("option", { value: p.name, title: p.description || "" }, p.name));
    }
    if (group.children.length) preset.append(group);
  }

  const count = el("input", { type: "number", name: "num_images", min: 1, max: 8, value: "1", dataset: { testid: "num-images" } });
  const seedMode = select([["random", "random"], ["fixed", "fixed"]], { name: "seedMode", dataset: { testid: "seed-mode" } });
  const seed = el("input", { type: "number", name: "seed", min: 0, step: 1, disabled: true, dataset: { testid: "seed" },
    placeholder: "random" });
  seedMode.addEventListener("change", () => {
    seed.disabled = seedMode.value !== "fixed";
  });
  return el("div", { class: "settings" },
    el("div", { class: "field" }, field("Aspect ratio", ratio), size),
    modes, field("Preset", preset), field("Images", count),
    el("div", { class: "seed" }, field("Seed", seedMode), field("Seed value", seed, "image i uses seed + i")));
}

function referencesBlock() {
  parts.styles = el("div", { class: "chips", dataset: { testid: "style-chips" } });
  parts.content = el("div", { class: "chips", dataset: { testid: "content-chips" } });
  parts.character = el("div", { class: "character", dataset: { testid: "character-block" } });
  const addStyle = imagePicker("Add style reference", "add-style", (source) => {
    state.styles.push({ source, strengthType: "Mid", influence: 1 });
    renderStyles();
  });
  const addContent = imagePicker("Set content reference", "add-content", (source) => {
    state.content = { source, strengthType: "Mid" };
    renderContent();
  });
  return el("fieldset", { class: "block" }, el("legend", {}, "References"),
    el("div", { class: "row wrap" }, addStyle, addContent), parts.styles, parts.content, parts.character);
}

function controlsBlock() {
  parts.controls = el("div", { class: "chips", dataset: { testid: "control-chips" } });
  const type = select(cat.controls.map((c) => [String(c.preprocessorId), c.name]), { dataset: { testid: "control-type" } });
  const add = imagePicker("Add ControlNet image", "add-control", (source) => {
    state.controls.push({ preprocessorId: Number(type.value), source, weight: 0.8 });
    renderControls();
  });
  return el("fieldset", { class: "block" }, el("legend", {}, "ControlNet"),
    el("div", { class: "row wrap" }, field("Type", type), add), parts.controls);
}

function initBlock() {
  parts.init = el("div", { class: "chips", dataset: { testid: "init-chips" } });
  const pick = imagePicker("Set init image", "set-init", (source) => {
    state.init = { source, strength: 0.5 };
    renderInit();
  });
  return el("fieldset", { class: "block" }, el("legend", {}, "Init image"), pick, parts.init);
}

/** Trained LoRA elements: pick one of GET /elements' COMPLETE trainings, add it with a weight. */
function elementsBlock() {
  parts.elements = el("div", { class: "chips", dataset: { testid: "element-chips" } });
  parts.elementChoice = select([["", "loading..."]], { dataset: { testid: "element-choice" } });
  const add = el("button", { type: "button", dataset: { testid: "element-add" } }, "Add LoRA");
  add.addEventListener("click", () => {
    const choice = parts.elementChoice.selectedOptions[0];
    if (!choice || !choice.value) return showError("LoRA elements: none trained yet (Characters: Train a LoRA)");
    addElement({ userLoraId: Number(choice.value), name: choice.dataset.name });
  });
  return el("fieldset", { class: "block" }, el("legend", {}, "LoRA elements"),
    el("div", { class: "row wrap" }, field("Trained LoRA", parts.elementChoice), add), parts.elements);
}

async function loadElementChoices() {
  let loras = [];
  try {
    loras = (await request("GET", "/elements")).loras || [];
  } catch (error) {
    showError(error, "could not list the trained LoRA elements");
  }
  fill(parts.elementChoice, loras.length
    ? loras.map((l) => el("option", { value: l.refgen.userLoraId, dataset: { name: l.name || "" } }, elementName(l.name, l.refgen.userLoraId)))
    : el("option", { value: "" }, "none trained yet"));
}

function elementName(name, id) {
  return name ? `${name} (element ${id})` : `element ${id}`;
}

function addElement(element) {
  if (!state.elements.some((x) => x.userLoraId === element.userLoraId)) {
    state.elements.push({ weight: ELEMENT_WEIGHT.default, ...element });
  }
  renderElements();
}

function advancedBlock() {
  const steps = el("input", { type: "number", name: "num_inference_steps", min: 1, max: 150, // the API's limit placeholder: "preset's",
    dataset: { testid: "steps" } });
  const guidance = el("input", { type: "number", name: "guidance_scale", min: 0, max: 30, step: 0.5, placeholder: "preset's",
    dataset: { testid: "guidance" } });
  const names = cat.schedulers.map((x) => (typeof x === "string" ? [x, x] : [x.name, x.label ? `${x.name} (${x.label})` : x.name]));
  const scheduler = select([["", "preset's"], ...names], { name: "scheduler", dataset: { testid: "scheduler" } });
  return el("details", { class: "block advanced", dataset: { testid: "advanced" } }, el("summary", {}, "Advanced"),
    el("div", { class: "row wrap" }, field("Steps", steps), field("Guidance scale", guidance), field("Scheduler", scheduler)));
}

/** A button-like file input that uploads the chosen file at once (so a bad file is reported now,
 *  with the server's message) and hands the new source to `use`. */
function imagePicker(text, testid, use, { multiple = false } = {}) {
  const id = uid("file");
  const input = el("input", { type: "file", id, accept: "image/png,image/jpeg,image/webp", multiple,
    class: "file", dataset: { testid: `${testid}-file` } });
  const label = el("label", { for: id, class: "button" }, text);
  input.addEventListener("change", async () => {
    const files = [...input.files];
    input.value = ""; // the same file can be picked again
    for (const file of files) {
      label.classList.add("working");
      try {
        const id = await upload(file);
        clearMessage();
        use({ type: "UPLOADED", id, url: URL.createObjectURL(file), name: file.name });
      } catch (error) {
        showError(error, `upload of ${file.name}`);
      } finally {
        label.classList.remove("working");
      }
    }
  });
  return el("span", { class: "picker" }, input, label);
}

// ------------------------------------------------------------------------------------------ chips

function renderAll() {
  renderStyles();
  renderContent();
  renderCharacter();
  renderControls();
  renderInit();
  renderElements();
}

function thumb(source) {
  return el("img", { class: "thumb", src: source.url, alt: source.name || `${source.type.toLowerCase()} image` });
}

function removeButton(what, onRemove) {
  return el("button", { type: "button", class: "quiet", "aria-label": `remove ${what}`, onclick: onRemove }, "Remove");
}

function numberInput(label, value, attrs, onChange) {
  const input = el("input", { type: "number", value: String(value), ...attrs });
  input.addEventListener("input", () => onChange(Number(input.value)));
  return field(label, input);
}

function strengthSelect(label, options, value, onChange, testid) {
  const node = select(options, { dataset: { testid } });
  node.value = value;
  node.addEventListener("change", () => onChange(node.value));
  return field(label, node);
}

function renderStyles() {
  fill(parts.styles, state.styles.map((style, index) => el("div", { class: "chip", dataset: { testid: "style-chip" } },
    thumb(style.source), el("strong", {}, `Style ${index + 1}`),
    strengthSelect("Strength", cat.referenceStrengths, style.strengthType, (v) => { style.strengthType = v; }, "style-strength"),
    numberInput("Influence", style.influence, { min: 0.01, step: 0.1, dataset: { testid: "style-influence" } },
      (v) => { style.influence = v; }),
    removeButton(`style ${index + 1}`, () => { state.styles.splice(index, 1); renderStyles(); }))));
}

function renderContent() {
  const content = state.content;
  fill(parts.content, content && el("div", { class: "chip", dataset: { testid: "content-chip" } },
    thumb(content.source), el("strong", {}, "Content"),
    strengthSelect("Strength", cat.referenceStrengths, content.strengthType, (v) => { content.strengthType = v; }, "content-strength"),
    removeButton("content reference", () => { state.content = null; renderContent(); })));
}

function renderControls() {
  const names = Object.fromEntries(cat.controls.map((c) => [c.preprocessorId, c.name]));
  fill(parts.controls, state.controls.map((unit, index) => el("div", { class: "chip", dataset: { testid: "control-chip" } },
    thumb(unit.source), el("strong", {}, names[unit.preprocessorId] || `preprocessor ${unit.preprocessorId}`),
    numberInput("Weight (0-2)", unit.weight, { min: 0, max: 2, step: 0.05, dataset: { testid: "control-weight" } },
      (v) => { unit.weight = v; }),
    removeButton(`control ${index + 1}`, () => { state.controls.splice(index, 1); renderControls(); }))));
}

function renderInit() {
  const init = state.init;
  fill(parts.init, init && el("div", { class: "chip", dataset: { testid: "init-chip" } },
    thumb(init.source), el("strong", {}, "Init image"),
    numberInput("Init strength (0.1-0.9, higher = closer)", init.strength,
      { min: 0.1, max: 0.9, step: 0.05, dataset: { testid: "init-strength" } }, (v) => { init.strength = v; }),
    removeButton("init image", () => { state.init = null; renderInit(); })));
}

function renderElements() {
  fill(parts.elements, state.elements.map((element, index) => el("div", { class: "chip", dataset: { testid: "element-chip", id: element.userLoraId } },
    el("strong", {}, elementName(element.name, element.userLoraId)),
    numberInput(`Weight (${ELEMENT_WEIGHT.min} to ${ELEMENT_WEIGHT.max})`, element.weight,
      { min: ELEMENT_WEIGHT.min, max: ELEMENT_WEIGHT.max, step: 0.1, dataset: { testid: "element-weight" } }, (v) => { element.weight = v; }),
    removeButton(elementName(element.name, element.userLoraId), () => { state.elements.splice(index, 1); renderElements(); }))));
}

/** The character: none, a saved character (by name), or 1-5 photos; strength, what to keep, mask, best-of. */
async function renderCharacter() {
  const c = state.character;
  const mode = select([["none", "none"], ["saved", "saved character"], ["photos", "photos"]], { dataset: { testid: "character-mode" } });
  mode.value = c.mode;
  mode.addEventListener("change", () => { c.mode = mode.value; renderCharacter(); });
  const body = el("div", { class: "row wrap" });
  fill(parts.character, el("div", { class: "row wrap" }, el("strong", {}, "Character"), field("Character from", mode)), body);
  if (c.mode === "none") return;
  if (c.mode === "saved") body.append(await savedCharacterSelect(c));
  else body.append(photoChips(c));
  body.append(
    strengthSelect("Strength", cat.characterStrengths, c.strengthType, (v) => { c.strengthType = v; }, "character-strength"),
    strengthSelect("Keep", [["", "character's default"], ...cat.characterParts], c.keep, (v) => { c.keep = v; }, "character-keep"),
    maskChip(c),
    numberInput("Best of N (2-8, ranked by identity; empty: off)", c.bestOf, { min: 2, max: 8, dataset: { testid: "best-of" } },
      (v) => { c.bestOf = v ? String(v) : ""; }));
}

async function savedCharacterSelect(c) {
  let names = [];
  try {
    names = (await request("GET", "/refgen/characters")).characters.map((x) => x.name);
  } catch (error) {
    showError(error, "could not list the saved characters");
  }
  if (!names.includes(c.name)) c.name = names[0] || "";
  const node = select(names.length ? names : [["", "no saved characters yet"]], { dataset: { testid: "character-name" } });
  node.value = c.name;
  node.addEventListener("change", () => { c.name = node.value; });
  return field("Saved character", node);
}

function photoChips(c) {
  const list = el("div", { class: "chips", dataset: { testid: "character-photos" } },
    c.photos.map((source, index) => el("div", { class: "chip" }, thumb(source),
      removeButton(`photo ${index + 1}`, () => { c.photos.splice(index, 1); renderCharacter(); }))));
  const add = c.photos.length < 5 && imagePicker("Add photo (1-5, one person)", "character-photo", (source) => {
    if (c.photos.length < 5) c.photos.push(source);
    renderCharacter();
  }, { multiple: true });
  return el("div", {}, list, add);
}

function maskChip(c) {
  if (c.mask) {
    return el("div", { class: "chip" }, thumb(c.mask), el("span", {}, "mask (white = carried)"),
      removeButton("mask", () => { c.mask = null; renderCharacter(); }));
  }
  return el("span", { class: "row" },
    imagePicker("Mask image (optional)", "character-mask", (source) => { c.mask = source; renderCharacter(); }),
    el("small", { class: "hint" }, "greyscale, the size of the first photo or anchor; white = carried"));
}

// ------------------------------------------------------------------------------------------ body

/** The form as one POST /generations body. Throws an Error naming what is missing. */
export function buildBody() {
  const data = new FormData(form);
  const text = (name) => String(data.get(name) || "").trim();
  const body = { prompt: text("prompt") };
  if (!body.prompt) throw Object.assign(new Error("write a prompt first"), { readable: "prompt: write a prompt first" });
  const refgen = {};
  if (text("negative_prompt")) body.negative_prompt = text("negative_prompt");
  const mode = text("mode") || "fast";
  if (mode === "ultra") body.ultra = true;
  else body.alchemy = mode === "quality";
  if (text("aspectRatio")) refgen.aspectRatio = text("aspectRatio");
  if (text("preset")) refgen.preset = text("preset");
  if (text("seedMode") === "fixed" && text("seed") !== "") body.seed = Number(text("seed"));
  for (const name of ["num_inference_steps", "guidance_scale"]) if (text(name) !== "") body[name] = Number(text(name));
  if (text("scheduler")) body.scheduler = text("scheduler");

  const units = [];
  const ref = (source) => ({ initImageId: source.id, initImageType: source.type });
  for (const s of state.styles) units.push({ ...ref(s.source), preprocessorId: 67, strengthType: s.strengthType, influence: s.influence });
  if (state.content) units.push({ ...ref(state.content.source), preprocessorId: 100, strengthType: state.content.strengthType });
  characterPart(units, refgen);
  for (const u of state.controls) units.push({ ...ref(u.source), preprocessorId: u.preprocessorId, weight: u.weight });
  if (units.length) body.controlnets = units;

  if (state.init) {
    body[state.init.source.type === "GENERATED" ? "init_generation_image_id" : "init_image_id"] = state.init.source.id;
    body.init_strength = state.init.strength;
  }
  if (state.elements.length) body.userElements = state.elements.map((x) => ({ userLoraId: x.userLoraId, weight: x.weight }));
  if (refgen.bestOf) delete body.num_images;
  else body.num_images = Number(text("num_images") || 1);
  if (Object.keys(refgen).length) body.refgen = refgen;
  return body;
}

function characterPart(units, refgen) {
  const c = state.character;
  if (c.mode === "none") return;
  const extra = {};
  if (c.keep) extra.keep = c.keep;
  if (c.mask) extra.maskImageId = c.mask.id;
  if (c.mode === "saved") {
    if (!c.name) throw Object.assign(new Error("no saved character chosen"), { readable: "character: choose a saved character (or create one)" });
    refgen.character = { name: c.name, strengthType: c.strengthType, ...extra };
  } else {
    if (!c.photos.length) throw Object.assign(new Error("no photo"), { readable: "character: add 1-5 photos of the person" });
    for (const photo of c.photos) {
      units.push({ initImageId: photo.id, initImageType: photo.type, preprocessorId: 133, strengthType: c.strengthType });
    }
    if (Object.keys(extra).length) refgen.character = extra;
  }
  if (c.bestOf) refgen.bestOf = Number(c.bestOf);
}

async function submit() {
  const button = form.querySelector("[data-testid=generate]");
  if (button.disabled) return; // one submission at a time
  let body;
  try {
    body = buildBody();
  } catch (error) {
    showError(error);
    return;
  }
  // Disabled while the POST runs only: once queued, the job card follows it and the form is free again.
  // Returned inside an object: an async function returning the promise itself would wait for the whole job.
  const started = await busy(button, async () => {
    clearMessage();
    const job = runGeneration(body, body.prompt.slice(0, 60));
    const queued = await Promise.race([job.then(() => true), new Promise((resolve) => setTimeout(resolve, 300, true))]);
    return queued && { job };
  }, "generate");
  if (started) started.job.catch(() => {}); // the job card shows the outcome
}

// ------------------------------------------------------------------------- from the gallery

/** The gallery's "use as init / style / content reference": a GENERATED image as a source. */
export function useImage(kind, image) {
  const source = { type: "GENERATED", id: image.id, url: image.url, name: "generated image" };
  go("generate");
  whenBuilt(() => {
    if (kind === "init") state.init = { source, strength: 0.5 };
    else if (kind === "style") state.styles.push({ source, strengthType: "Mid", influence: 1 });
    else if (kind === "content") state.content = { source, strengthType: "Mid" };
    renderAll();
  });
}

/** The Characters view's "Use in Generate" after a training: that element, weight 1. */
export function useElement(element) {
  go("generate");
  whenBuilt(() => addElement(element));
}

/** "Reuse this seed": fixed mode with that image's seed. */
export function reuseSeed(seed) {
  go("generate");
  whenBuilt(() => {
    form.elements.seedMode.value = "fixed";
    form.elements.seed.disabled = false;
    form.elements.seed.value = String(seed);
    form.elements.seed.focus();
  });
}

/** Remix: the image as init at 0.35 plus an Edge unit of it at 0.6 (engine/remix.py's recipe); the
 *  prompt is prefilled, the user edits it and presses Generate. */
export function remix(image, prompt) {
  const source = { type: "GENERATED", id: image.id, url: image.url, name: "remixed image" };
  go("generate");
  whenBuilt(() => {
    state.init = { source, strength: REMIX_INIT_STRENGTH };
    state.controls = state.controls.filter((u) => u.source.id !== image.id);
    state.controls.push({ preprocessorId: 19, source, weight: REMIX_EDGE_WEIGHT });
    renderAll();
    form.elements.prompt.value = prompt || "";
    form.elements.prompt.focus();
  });
}

function whenBuilt(action) {
  if (form && cat && form.elements.prompt) action();
  else setTimeout(() => whenBuilt(action), 50); // the view mounts on navigation; the catalog may still load
}
