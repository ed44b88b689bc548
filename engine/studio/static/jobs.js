// Running jobs (generations, upscales) as cards above every view: progress from the API's event
// stream, Cancel (DELETE /generations/{id}), and the images once done. Every view starts jobs here.

import { request, followEvents, waitForVariation } from "./api.js";
import { el, fill } from "./dom.js";
import { emit, showError } from "./ui.js";

function panel() {
  return document.getElementById("jobs");
}

/** POST a generation body and follow it to the end. Resolves to the final generation record
 *  (generations_by_pk) or null when cancelled/failed (the card says why). */
export async function runGeneration(body, title) {
  const answer = await request("POST", "/generations", body); // errors go to the caller (form field names)
  const id = answer.sdGenerationJob.generationId;
  const card = generationCard(id, title, body.refgen && body.refgen.bestOf || body.num_images || 1);
  emit("generations-changed");
  try {
    const final = await followEvents(id, (event) => card.progress(event));
    if (final.deleted) return card.finish("cancelled", null);
    const generation = final.generations_by_pk;
    if (generation.status === "FAILED") {
      const reason = final.error || (generation.refgen && generation.refgen.error) || "no reason given";
      showError(reason, `generation "${(body.prompt || "").slice(0, 40)}" failed`); // e.g. the weights to fetch
      return card.finish(`failed: ${reason}`, null);
    }
    return card.finish("done", generation);
  } catch (error) {
    card.finish(`error: ${error.readable || error.message}`, null);
    showError(error, "generation");
    return null;
  } finally {
    emit("generations-changed");
  }
}

function generationCard(id, title, count) {
  const bar = el("progress", { max: 1, value: 0, dataset: { testid: "job-progress" } });
  const label = el("span", { class: "step", dataset: { testid: "job-step" } }, "queued");
  const log = el("ol", { class: "progress-log", dataset: { testid: "progress-log" }, "aria-label": "progress events" });
  const cancel = el("button", { type: "button", class: "quiet", dataset: { testid: "job-cancel" } }, "Cancel");
  const images = el("div", { class: "job-images", dataset: { testid: "job-images" } });
  const slots = Array.from({ length: count }, (_, i) => el("div", { class: "slot" }, `image ${i + 1} of ${count}`));
  images.append(...slots);
  const status = el("span", { class: "status", dataset: { testid: "job-status" } }, "PENDING");
  const card = el("article", { class: "job", dataset: { testid: "job", id } },
    el("header", {}, el("strong", {}, title || "generation"), status, cancel),
    el("div", { class: "row" }, bar, label), images, el("details", {}, el("summary", {}, "progress log"), log));
  panel().prepend(card);
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await request("DELETE", `/generations/${id}`);
    } catch (error) {
      showError(error, "cancel");
      cancel.disabled = false;
    }
  });
  return {
    progress(event) {
      const p = event && event.progress;
      if (p && p.total) {
        bar.max = p.total;
        bar.value = p.step;
        label.textContent = `step ${p.step}/${p.total}${p.phase ? ` (${p.phase})` : ""} · ${count} image${count > 1 ? "s" : ""}`;
        log.append(el("li", { dataset: { step: p.step, total: p.total } }, `${p.phase || "step"} ${p.step}/${p.total}`));
      }
      if (event && event.status) status.textContent = event.status;
    },
    finish(text, generation) {
      cancel.replaceWith(dismissButton(card));
      status.textContent = text;
      card.dataset.state = generation ? "done" : "stopped";
      if (generation) {
        bar.value = bar.max;
        fill(images, generation.generated_images.map((image) =>
          el("img", { src: image.url, alt: `result of: ${generation.prompt || ""}`, dataset: { testid: "job-image", imageId: image.id } })));
      } else {
        fill(images);
      }
      setTimeout(() => card.remove(), generation ? 120000 : 30000); // the gallery keeps them; the card is news
      return generation;
    },
  };
}

function dismissButton(card) {
  return el("button", { type: "button", class: "quiet", dataset: { testid: "job-dismiss" }, "aria-label": "dismiss this job",
    onclick: () => card.remove() }, "Dismiss");
}

/** POST /variations/upscale and poll it; resolves to the variation (url, refgen.imageId) or null. */
export async function runUpscale(imageId, scale) {
  const answer = await request("POST", "/variations/upscale", { id: imageId, refgen: { scale } });
  const id = answer.sdUpscaleJob.id;
  const status = el("span", { class: "status", dataset: { testid: "job-status" } }, "PENDING");
  const bar = el("progress", { "aria-label": "upscaling" }); // indeterminate: the API reports no steps for it
  const card = el("article", { class: "job", dataset: { testid: "upscale-job", id } },
    el("header", {}, el("strong", {}, `upscale x${scale}`), status), bar);
  panel().prepend(card);
  try {
    const variation = await waitForVariation(id);
    status.textContent = "done";
    bar.max = 1;
    bar.value = 1;
    card.append(el("a", { href: variation.url, download: `refgen-upscale-x${scale}.png` },
      el("img", { src: variation.url, alt: `upscaled x${scale} (download)`, dataset: { testid: "upscale-image" } })));
    card.dataset.state = "done";
    card.querySelector("header").append(dismissButton(card));
    setTimeout(() => card.remove(), 120000);
    return variation;
  } catch (error) {
    status.textContent = `failed: ${error.readable || error.message}`;
    card.dataset.state = "stopped";
    throw error;
  } finally {
    emit("generations-changed");
  }
}
