// Submitting explanation jobs and waiting for them, shared by /ui and the audit browser (ClassLens.jobs).
//
//   ClassLens.jobs.explain(picture, fields)  -> the job as first answered (POST /v1/explanations)
//   ClassLens.jobs.finished(job, onStatus)   -> the job once it has succeeded (long-polls ?wait=5); throws if it failed
//   ClassLens.jobs.viewer(picture, fieldsOf, onStatus) -> the viewer's address, once the three jobs it reads
//                                            (map kinds identifiability, logit, probability) have succeeded
//   ClassLens.jobs.problemText(response)     -> "title: detail" of a problem+json answer
"use strict";

(function () {
  // The one place this script calls the API: through api.js, which adds the key when the service wants one.
  function api(url, options) {
    return window.ClassLens.api(url, options);
  }

  async function problemText(response) {
    try {
      const body = await response.json();
      return (body.title || response.status) + ": " + (body.detail || "");
    } catch (error) {
      return String(response.status);
    }
  }

  // picture: a Blob; fields: the form fields of the request (strings).
  async function explain(picture, fields) {
    const data = new FormData();
    data.append("image", picture, "image.png");
    for (const [name, value] of Object.entries(fields)) data.append(name, value);
    const response = await api("/v1/explanations", { method: "POST", body: data });
    if (!response.ok) throw new Error(await problemText(response));
    return response.json();
  }

  function finished(job, onStatus) {
    return window.ClassLens.finished("/v1/explanations/" + encodeURIComponent(job.id), job, onStatus || function () {});
  }

  // One job per map kind: the identifiability job carries everything else the viewer shows.
  // fieldsOf(kind) gives each job's fields.
  async function viewer(picture, fieldsOf, onStatus) {
    const jobs = [];
    for (const kind of ["identifiability", "logit", "probability"]) jobs.push(await explain(picture, fieldsOf(kind)));
    const done = [];
    for (const job of jobs) done.push(await finished(job, onStatus));
    const query = "?logit=" + encodeURIComponent(done[1].id) + "&probability=" + encodeURIComponent(done[2].id);
    return "/v1/explanations/" + encodeURIComponent(done[0].id) + "/view" + query;
  }

  window.ClassLens = window.ClassLens || {};
  window.ClassLens.jobs = { explain: explain, finished: finished, viewer: viewer, problemText: problemText };
})();
