// /ui's "Audit all samples": every bundled sample, with its true label, as one audit; then the audit browser.
"use strict";

(function () {
  const button = document.getElementById("audit-samples");
  const status = document.getElementById("status");

  // The one place this script calls the API: through api.js, which adds the key when the service wants one.
  function api(url, options) {
    return window.ClassLens.api(url, options);
  }

  function say(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  async function sample(file) {
    const response = await api("/ui/samples/" + encodeURIComponent(file));
    if (!response.ok) throw new Error(file + " cannot be read (" + response.status + ")");
    return response.blob();
  }

  button.addEventListener("click", async function () {
    const model = document.getElementById("model").value;
    if (!model) {
      say("Choose a model first.", true);
      return;
    }
    button.disabled = true;
    try {
      const samples = JSON.parse(button.dataset.samples); // [[file, label], ...]
      say("Reading " + samples.length + " samples…");
      const data = new FormData();
      data.append("model", model);
      for (const [file, label] of samples) {
        data.append("images", await sample(file), file);
        data.append("labels", label);
      }
      say("Submitting the audit…");
      const response = await api("/v1/audits", { method: "POST", body: data });
      if (!response.ok) throw new Error(await window.ClassLens.jobs.problemText(response));
      const job = await response.json();
      window.location.assign("/v1/audits/" + encodeURIComponent(job.id) + "/view");
    } catch (error) {
      say(error.message, true);
      button.disabled = false;
    }
  });
})();
