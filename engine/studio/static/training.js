// A character's LoRA trainings (Characters view): the "Train a LoRA" form (extra pictures picked from the
// gallery, epochs, learning rate; POST /refgen/characters/{slug}/train) and the list of its trainings, each
// watched through GET /elements/{userLoraId} while PENDING (progress bar, step/total, loss; the error when
// FAILED), with "Use in Generate" once COMPLETE.

import { me, request, watchElement } from "./api.js";
import { el, fill, field } from "./dom.js";
import { useElement } from "./generate.js";
import { busy, clearMessage, emit, showInfo } from "./ui.js";

export const MIN_PICTURES = 5; // the server's minimum (anchors + picked); its 422 says so too
const GALLERY_PICKS = 24; // the newest gallery images offered as extra pictures

/** The trainings of `character` (newest first), PENDING ones watched until they end. */
export function trainingList(character) {
  const trainings = character.trainings || [];
  return el("section", { class: "trainings" }, el("h4", {}, "Trained LoRAs"),
    trainings.length ? el("ul", { class: "training-list", dataset: { testid: "character-trainings" } },
      trainings.map((t) => trainingItem(character, t)))
      : el("p", { class: "hint", dataset: { testid: "character-trainings" } }, "None yet."));
}

function trainingItem(character, training) {
  const bar = el("progress", { max: 1, value: 0, dataset: { testid: "training-progress" },
    "aria-label": `training of element ${training.userLoraId}` });
  const status = el("span", { class: "status", dataset: { testid: "training-status" } });
  const step = el("span", { class: "meta", dataset: { testid: "training-step" } });
  const error = el("span", { class: "bad", dataset: { testid: "training-error" } });
  const use = el("button", { type: "button", hidden: true, dataset: { testid: "training-use" },
    onclick: () => useElement({ userLoraId: training.userLoraId, name: character.name }) }, "Use in Generate");
  const item = el("li", { class: "training", dataset: { testid: "training", id: training.userLoraId } },
    el("div", { class: "row" }, el("strong", {}, `element ${training.userLoraId}`), status, use), el("div", { class: "row" }, bar, step), error);
  const show = (record) => {
    item.dataset.status = record.status;
    status.textContent = record.status;
    const p = record.progress;
    if (p && p.total) {
      bar.max = p.total;
      bar.value = p.step;
      step.textContent = `step ${p.step}/${p.total}${typeof p.loss === "number" ? ` · loss ${p.loss.toFixed(4)}` : ""}`;
    }
    if (record.status === "COMPLETE") bar.value = bar.max;
    error.textContent = record.status === "FAILED" ? `failed: ${record.error || "no reason given"}` : "";
    use.hidden = record.status !== "COMPLETE";
  };
  show(training);
  if (training.status === "PENDING") watch(training.userLoraId, item, show);
  return item;
}

/** Poll one training while its list item is on the page; tell the rest of the page when it ends. */
async function watch(loraId, item, show) {
  try {
    const last = await watchElement(loraId, (record) => show({ status: record.status, error: record.error,
      progress: record.refgen && record.refgen.progress }), { keepGoing: () => item.isConnected });
    if (!last) return; // the character view was redrawn: its new list watches it
    emit("elements-changed"); // Generate's LoRA list gains it (COMPLETE) or not
    if (last.status === "COMPLETE") showInfo(`the LoRA of ${last.name} (element ${loraId}) is trained`);
  } catch (error) {
    show({ status: "unknown", error: error.readable || error.message });
  }
}

/** "Train a LoRA": gallery images to add to the anchors, epochs, learning rate. `done(character)` redraws. */
export function trainForm(character, done) {
  const anchors = (character.anchors || []).length;
  const picks = el("div", { class: "pick-grid", dataset: { testid: "train-picks" } }, el("p", { class: "hint" }, "loading the gallery..."));
  const count = el("output", { dataset: { testid: "train-count" } });
  const epochs = el("input", { type: "number", name: "epochs", min: 1, max: 250, value: "100", dataset: { testid: "train-epochs" } });
  const rate = el("input", { type: "number", name: "learningRate", min: 0, step: "any", value: "0.0001", dataset: { testid: "train-lr" } });
  const start = el("button", { type: "submit", class: "primary", dataset: { testid: "train-start" } }, "Train");
  const form = el("form", { class: "block train", dataset: { testid: "train-form" } },
    el("h4", {}, "Train a LoRA"),
    el("p", { class: "hint" }, `A LoRA trains on ${MIN_PICTURES} pictures at least, anchors included: `
      + `${character.name} has ${anchors}; pick the rest from the gallery.`),
    picks, count, el("div", { class: "row wrap" }, field("Epochs", epochs), field("Learning rate", rate), start));
  const counted = () => {
    const picked = picks.querySelectorAll("input:checked").length;
    count.textContent = `${anchors} anchor${anchors === 1 ? "" : "s"} + ${picked} picked = ${anchors + picked} of ${MIN_PICTURES} needed`;
  };
  picks.addEventListener("change", counted);
  galleryPicks(picks).then(counted);
  counted();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(start, async () => {
      const images = [...picks.querySelectorAll("input:checked")].map((box) => ({ id: box.value, type: "GENERATED" }));
      const body = { images, epochs: Number(epochs.value), learningRate: Number(rate.value) };
      const answer = await request("POST", `/refgen/characters/${encodeURIComponent(character.slug || character.name)}/train`, body);
      clearMessage();
      showInfo(`training element ${answer.sdTrainingJob.userLoraId} of ${character.name}`);
      done((await request("GET", `/refgen/characters/${encodeURIComponent(character.name)}`)).character);
    }, "train a LoRA");
  });
  return form;
}

/** The newest gallery images as checkboxes (value = the generated image id). */
async function galleryPicks(grid) {
  try {
    const user = await me();
    const answer = await request("GET", `/generations/user/${user}?offset=0&limit=${GALLERY_PICKS}`);
    const images = answer.generations.flatMap((g) => g.generated_images || []).slice(0, GALLERY_PICKS);
    fill(grid, images.length ? images.map(pickBox) : el("p", { class: "hint" }, "No generated images yet: generate some first."));
  } catch (error) {
    fill(grid, el("p", { class: "hint" }, `The gallery could not be listed: ${error.readable || error.message}`));
  }
}

function pickBox(image, index) {
  const box = el("input", { type: "checkbox", value: image.id, dataset: { testid: "train-pick", imageId: image.id } });
  return el("label", { class: "pick" }, box, el("img", { src: image.url, alt: `gallery image ${index + 1}`, loading: "lazy" }));
}
