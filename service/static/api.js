// ClassLens.api: the pages' one way to call the API. With authentication on, every API route
// wants "Authorization: Bearer <key>"; the pages hold no key of their own, so the user types one
// into a field this script shows when a call answers 401, and it is kept in this tab's
// sessionStorage (gone when the tab closes; never sent anywhere but this service).
//
//   ClassLens.api(url, options)        -> Promise<Response>  fetch(url, options) with the key's header.
//                                         On 401 it shows the key field with why, waits for a key and
//                                         sends the request again; any other answer is returned as is.
//   ClassLens.json(url, options)       -> Promise<object>    api(), then the JSON body; an answer that is
//                                         not 2xx throws an Error saying "title: detail" of its problem.
//   ClassLens.imageUrl(url)            -> Promise<string>    api(), then a blob: URL of the image, for an
//                                         <img> or a canvas (an <img src> cannot send the header).
//   ClassLens.finished(url, job, says) -> Promise<object>    polls url?wait=5 until the job has succeeded
//                                         (returns it) or failed (throws); says(job) after each poll.
//
// Load it before the page's own script: <script src=".../api.js" defer></script>.
"use strict";

window.ClassLens = (function () {
  const STORAGE = "classlens.apiKey";
  let waiting = null; // the promise of the next key typed, while the field is shown

  function storedKey() {
    try {
      return window.sessionStorage.getItem(STORAGE);
    } catch (error) {
      return null;
    }
  }

  let memory = storedKey(); // the key sent, read once: another tab's key is its own

  function keep(key) {
    try {
      window.sessionStorage.setItem(STORAGE, key);
    } catch (error) {
      // Storage refused (a private mode): the key still serves this page until it is left.
    }
    memory = key;
  }

  function field() {
    let form = document.getElementById("api-key-form");
    if (form) return form;
    form = document.createElement("form");
    form.id = "api-key-form";
    form.className = "api-key";
    form.hidden = true;
    const message = document.createElement("p");
    message.id = "api-key-message";
    message.setAttribute("role", "alert");
    const label = document.createElement("label");
    label.htmlFor = "api-key";
    label.textContent = "API key";
    const input = document.createElement("input");
    input.id = "api-key";
    input.type = "password";
    input.autocomplete = "off";
    input.spellcheck = false;
    input.required = true;
    const button = document.createElement("button");
    button.type = "submit";
    button.textContent = "Use this key";
    form.append(message, label, input, button);
    const main = document.querySelector("main") || document.body;
    main.insertBefore(form, main.firstChild);
    return form;
  }

  // Show the field saying why, and resolve with the key once one is typed (one wait for all callers).
  function askForKey(refused) {
    const form = field();
    form.querySelector("#api-key-message").textContent = refused
      ? "This API key was refused: the service does not know it. Check it and type it again."
      : "This service asks for an API key. Type yours (an operator creates keys with classlens keys create); " +
        "it is kept in this browser tab only, until you close it.";
    if (!waiting) {
      waiting = new Promise(function (resolve) {
        form.addEventListener("submit", function typed(event) {
          event.preventDefault();
          const key = form.querySelector("#api-key").value.trim();
          if (!key) return;
          form.removeEventListener("submit", typed);
          keep(key);
          form.hidden = true;
          waiting = null;
          resolve(key);
        });
      });
    }
    form.hidden = false;
    const input = form.querySelector("#api-key");
    if (refused) input.value = ""; // a password field: what was typed cannot be seen to be mended
    input.focus();
    return waiting;
  }

  async function api(url, options) {
    for (;;) {
      const sent = memory;
      const headers = new Headers((options && options.headers) || {});
      if (sent) headers.set("Authorization", "Bearer " + sent);
      const response = await fetch(url, Object.assign({}, options, { headers: headers }));
      if (response.status !== 401) return response;
      // Another call may have got a key while this one was under way: try that one first.
      if (memory && memory !== sent) continue;
      await askForKey(Boolean(sent));
    }
  }

  async function problemText(response) {
    try {
      const body = await response.json();
      return (body.title || response.status) + ": " + (body.detail || "");
    } catch (error) {
      return "the service answered " + response.status;
    }
  }

  async function json(url, options) {
    const response = await api(url, options);
    if (!response.ok) throw new Error(await problemText(response));
    return response.json();
  }

  async function imageUrl(url) {
    const response = await api(url);
    if (!response.ok) throw new Error(await problemText(response));
    return URL.createObjectURL(await response.blob());
  }

  async function finished(url, job, says) {
    while (job.status !== "succeeded" && job.status !== "failed") {
      job = await json(url + "?wait=5");
      if (says) says(job);
    }
    if (job.status === "failed") throw new Error(job.error ? job.error.title + ": " + job.error.detail : "the job failed");
    return job;
  }

  return { api: api, json: json, imageUrl: imageUrl, finished: finished };
})();
