// /ui: choose a model and an image, submit the explanations the viewer needs, poll them, open the viewer.
// Every call goes through ClassLens.api (api.js), which adds the API key when the service asks for one.
"use strict";

(function () {
  const form = document.getElementById("explain-form");
  const modelSelect = document.getElementById("model");
  const sampleSelect = document.getElementById("sample");
  const upload = document.getElementById("upload");
  const preview = document.getElementById("preview");
  const status = document.getElementById("status");
  const button = document.getElementById("submit");
  let previewUrl = null;

  function say(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function source() {
    return form.querySelector("input[name=source]:checked").value;
  }

  function showPreview() {
    if (previewUrl) {
      URL.revokeObjectURL(previewUrl);
      previewUrl = null;
    }
    if (source() === "upload" && upload.files.length) {
      previewUrl = URL.createObjectURL(upload.files[0]);
      preview.src = previewUrl;
    } else {
      preview.src = "/ui/samples/" + encodeURIComponent(sampleSelect.value);
    }
  }

  async function loadModels() {
    const body = await ClassLens.json("/v1/models");
    modelSelect.textContent = "";
    for (const model of body.models) {
      // Every enabled version, the newest (the one listed) first.
      const versions = (model.versions || [model.version]).slice().reverse();
      for (const version of versions) {
        const option = document.createElement("option");
        option.value = model.name + "@" + version;
        option.textContent = model.name + "@" + version + (version === model.version ? " (newest)" : "");
        modelSelect.appendChild(option);
      }
    }
  }

  async function image() {
    if (source() === "upload") {
      if (!upload.files.length) throw new Error("choose an image file first");
      return upload.files[0];
    }
    const response = await ClassLens.api("/ui/samples/" + encodeURIComponent(sampleSelect.value));
    if (!response.ok) throw new Error("the sample cannot be read (" + response.status + ")");
    return response.blob();
  }

  // The fields of the job of each map kind (jobs.js submits one per kind).
  function fields(mapKind) {
    const main = mapKind === "identifiability";
    const values = { model: modelSelect.value, layers: "all", top_k: "3", map_kind: mapKind, sublayers: main ? "true" : "false" };
    if (main) {
      values.token_classes = "5";
      values.gradient_map = document.getElementById("gradient").checked ? "true" : "false";
      if (document.getElementById("rollout").checked) values.baseline_maps = "rollout";
    }
    return values;
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    button.disabled = true;
    try {
      const picture = await image();
      say("Submitting…");
      // Submitting and waiting: jobs.js, shared with the audit browser.
      const address = await window.ClassLens.jobs.viewer(picture, fields, function (job) {
        say("Job " + job.id + ": " + job.status + "…");
      });
      say("Done: opening the viewer.");
      window.location.assign(address);
    } catch (error) {
      say(error.message, true);
      button.disabled = false;
    }
  });

  for (const element of form.querySelectorAll("input[name=source]")) element.addEventListener("change", showPreview);
  sampleSelect.addEventListener("change", function () {
    form.querySelector("input[value=sample]").checked = true;
    showPreview();
  });
  upload.addEventListener("change", function () {
    form.querySelector("input[value=upload]").checked = true;
    showPreview();
  });
  showPreview();
  loadModels().catch(function (error) { say("The models cannot be listed: " + error.message, true); });
})();
