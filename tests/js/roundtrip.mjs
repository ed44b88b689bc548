// Leonardo's TypeScript SDK against a refgen server (run by tests/test_leonardo_sdk.py). Every answer goes
// through the SDK's own zod schemas, which throw on a value Leonardo's API would not send; what is printed
// (JSON on stdout) comes from the SDK's parsed objects.
//   node roundtrip.mjs KEY create SERVER_URL IMAGE.png  -> upload an init image, create, read it once
//   node roundtrip.mjs KEY poll SERVER_URL GENERATION_ID -> poll to the end, list the user's generations
//   node roundtrip.mjs KEY upscale SERVER_URL GENERATION_ID -> upscale its first image, then read the generation,
//                                                             which lists the upscale under that image
import { readFile } from "node:fs/promises";
import { Leonardo } from "@leonardo-ai/sdk";
import { InitImageType, SdGenerationSchedulers } from "@leonardo-ai/sdk/sdk/models/shared/index.js";

const [bearerAuth, phase, serverURL, arg] = process.argv.slice(2);
const leonardo = new Leonardo({ bearerAuth, serverURL });

async function uploadInitImage(path) {
  const slot = (await leonardo.initImages.uploadInitImage({ extension: "png" })).object.uploadInitImage;
  const before = (await leonardo.initImages.getInitImageById(slot.id)).object.initImagesByPk;
  const form = new FormData();
  for (const [name, value] of Object.entries(JSON.parse(slot.fields))) form.append(name, value);
  form.append("file", new Blob([await readFile(path)], { type: "image/png" }), "init.png");
  const posted = await fetch(slot.url, { method: "POST", body: form });
  if (posted.status !== 204) throw new Error(`upload: ${posted.status} ${await posted.text()}`);
  return { id: slot.id, before: { id: before.id, url: before.url } };
}

async function generation(id) {
  return (await leonardo.image.getGenerationById(id)).object.generationsByPk;
}

async function create(path) {
  const init = await uploadInitImage(path);
  const job = await leonardo.image.createGeneration({
    prompt: "a lighthouse at dusk", width: 64, height: 64, numImages: 1, numInferenceSteps: 2, alchemy: false,
    seed: 21, scheduler: SdGenerationSchedulers.Klms, initImageId: init.id, initStrength: 0.3,
    controlnets: [{ initImageId: init.id, initImageType: InitImageType.Uploaded, preprocessorId: 19, weight: 0.5 }],
  });
  const generationId = job.object.sdGenerationJob.generationId;
  const pending = await generation(generationId);
  return { initImageId: init.id, initImageBeforeUpload: init.before, generationId, pending };
}

async function poll(id) {
  const deadline = Date.now() + 120_000;
  let record = await generation(id);
  while (record.status === "PENDING" && Date.now() < deadline) {
    await new Promise((done) => setTimeout(done, 100));
    record = await generation(id);
  }
  const me = (await leonardo.user.getUserSelf()).object.userDetails[0].user;
  const listed = (await leonardo.image.getGenerationsByUserId(me.id, 50, 0)).object.generations;
  return { record, listed: listed.map((g) => g.id) };
}

async function upscale(id) {
  const image = (await generation(id)).generatedImages[0];
  const job = (await leonardo.variation.createVariationUpscale({ id: image.id })).object.sdUpscaleJob;
  const deadline = Date.now() + 120_000;
  const variation = async () => (await leonardo.variation.getVariationById(job.id)).object.generatedImageVariationGeneric[0];
  let done = await variation();
  while (done.status === "PENDING" && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    done = await variation();
  }
  const listed = (await generation(id)).generatedImages[0].generatedImageVariationGenerics;
  return { variation: { id: done.id, status: done.status, url: done.url }, listed };
}

const phases = { create, poll, upscale };
const result = await phases[phase](arg);
console.log(JSON.stringify(result));
