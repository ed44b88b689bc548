// GET /refgen/catalog once per page: what the generate form offers (aspect ratios with their resolved
// sizes, modes, presets, schedulers, control types, strengths). When it fails the form still works with
// Leonardo's fixed vocabulary, and the user is told why the lists are short.

import { request } from "./api.js";
import { showError } from "./ui.js";

const FALLBACK = {
  model: "?",
  nativeSize: null,
  aspectRatios: [],
  modes: ["fast", "quality", "ultra"],
  presets: [],
  schedulers: [],
  controls: [
    { preprocessorId: 19, name: "Edge" },
    { preprocessorId: 20, name: "Depth" },
    { preprocessorId: 21, name: "Pose" },
  ],
  referenceStrengths: ["Low", "Mid", "High", "Ultra", "Max"],
  characterStrengths: ["Low", "Mid", "High"],
  characterParts: ["face", "face+hair", "face+hair+outfit", "all"],
};

let loading = null;

export function catalog() {
  if (!loading) {
    loading = request("GET", "/refgen/catalog")
      .then((answer) => ({ ...FALLBACK, ...answer }))
      .catch((error) => {
        loading = null; // try again next time
        showError(error, "could not load the catalog (aspect ratios, presets); using defaults");
        return { ...FALLBACK, failed: true };
      });
  }
  return loading;
}

export function reloadCatalog() {
  loading = null;
  return catalog();
}
