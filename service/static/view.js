// The explanation viewer: reads the job JSON (and its logit and probability siblings) and draws
// every map client-side on a canvas, so moving a control never fetches anything (docs/viewer.md).
// Only a class asked for by name fetches: its explanations, merged in as one more target.
// Every call goes through ClassLens.api (api.js), which adds the API key when the service asks for one.
"use strict";

(function () {
  // viridis for the maps, Okabe and Ito's palette for the targets' lines (colours.js).
  const viridis = window.ClassLens.colours.viridis;
  const LINE_COLOURS = window.ClassLens.colours.LINE_COLOURS;
  // A dash pattern per target, so that the lines are told apart without colour too (named in the legend).
  const LINE_DASHES = [
    ["", "solid"], ["8 4", "dashed"], ["2 3", "dotted"], ["10 3 2 3", "dash-dot"],
    ["4 2", "short dashes"], ["1 6", "sparse dots"], ["14 4", "long dashes"], ["6 2 2 2 2 2", "dash-dot-dot"],
  ];
  const UNITS = {
    identifiability: "identifiability 1 − rank/C",
    logit: "logit of the target",
    probability: "probability of the target",
    topk: "place among the token's top classes (1 = top-1, 0 = not listed)",
    gradient: "gradient relevance (a.u.)",
    chefer: "Chefer et al. relevance (a.u.)",
    rollout: "attention rollout (a.u.)",
    gradcam: "Grad-CAM (a.u.)",
  };
  const KIND_NAMES = {
    identifiability: "identifiability", logit: "logit", probability: "probability",
    topk: "top classes of each token", gradient: "gradient map", chefer: "Chefer et al.",
    rollout: "attention rollout", gradcam: "Grad-CAM",
  };

  const $ = function (id) { return document.getElementById(id); };
  const jobId = document.body.dataset.job;
  const canvas = $("map");
  const context = canvas.getContext("2d");
  const state = { layer: 0, stream: "residual", kind: "identifiability", target: 0, patch: null, base: "colour" };
  let data = null; // {job, result, byKind: {kind: result}, jobs: {kind: job}, model, labels, picture, input}

  function say(text, isError) {
    $("status").textContent = text;
    $("status").classList.toggle("error", Boolean(isError));
  }

  const json = ClassLens.json;

  function jobUrl(id) { return "/v1/explanations/" + encodeURIComponent(id); }

  // The picture the network saw, read with the API key and shown through a blob: URL.
  async function picture(url) {
    const address = await ClassLens.imageUrl(url);
    return new Promise(function (resolve, reject) {
      const image = new Image();
      image.onload = function () { URL.revokeObjectURL(address); resolve(image); };
      image.onerror = function () { URL.revokeObjectURL(address); reject(new Error("the input picture cannot be loaded")); };
      image.src = address;
    });
  }

  async function load() {
    const job = await json(jobUrl(jobId));
    if (job.status !== "succeeded") {
      throw new Error("job " + job.id + " is " + job.status + (job.error ? ": " + job.error.detail : ""));
    }
    const result = job.result;
    const byKind = {};
    const jobs = {};
    byKind[result.map_kind] = result;
    jobs[result.map_kind] = job;
    const query = new URLSearchParams(window.location.search);
    for (const kind of ["logit", "probability"]) {
      const sibling = query.get(kind);
      if (!sibling || byKind[kind]) continue;
      const other = await json(jobUrl(sibling));
      if (other.status === "succeeded" && other.result.map_kind === kind && other.model === job.model) {
        byKind[kind] = other.result;
        jobs[kind] = other;
      }
    }
    const model = await json("/v1/models/" + encodeURIComponent(job.model));
    const image = await picture(jobUrl(jobId) + "/input.png");
    return { job: job, result: result, byKind: byKind, jobs: jobs, model: model, labels: model.labels, picture: image };
  }

  // -- what is shown ----------------------------------------------------------------------------------

  function target() { return data.result.targets[state.target]; }

  function layerRange() {
    return state.stream === "residual" ? [0, data.result.layers] : [1, data.result.layers];
  }

  function kindsFor(stream) {
    const kinds = [];
    const first = data.result.targets[0];
    if (stream === "residual") {
      for (const kind of ["identifiability", "logit", "probability"]) if (data.byKind[kind]) kinds.push(kind);
    }
    if (data.result.token_classes && data.result.token_classes[stream]) kinds.push("topk");
    if (stream === "residual") {
      if (first.gradient_map) kinds.push("gradient");
      for (const name of Object.keys(first.baseline_maps || {})) kinds.push(name);
    }
    return kinds;
  }

  function layerless(kind) { return kind === "gradient" || Boolean(kind && kind in (target().baseline_maps || {})); }

  function tokenClasses(layer) {
    const streams = data.result.token_classes;
    if (!streams || !streams[state.stream]) return null;
    return streams[state.stream][state.stream === "residual" ? layer : layer - 1] || null;
  }

  // The values of the shown map, row by row (h * w numbers), or null when the result lacks it.
  function mapValues(kind, layer) {
    const chosen = target();
    if (!kind) return null;
    if (kind === "gradient") return chosen.gradient_map.flat();
    if (chosen.baseline_maps && kind in chosen.baseline_maps) return chosen.baseline_maps[kind].flat();
    if (kind === "topk") {
      const classes = tokenClasses(layer);
      if (!classes) return null;
      return classes.map(function (listed) {
        const place = listed.indexOf(chosen.index);
        return place < 0 ? 0 : (listed.length - place) / listed.length;
      });
    }
    const result = data.byKind[kind];
    const same = result && result.targets.find(function (t) { return t.index === chosen.index; });
    const grid = same && same.projection_maps[String(layer)];
    return grid ? grid.flat() : null;
  }

  // Fixed ranges where the quantity has them, so that layers compare; otherwise the target's own range.
  function valueRange(kind, values) {
    if (kind === "identifiability" || kind === "probability" || kind === "topk") return [0, 1];
    let all = values;
    if (kind === "logit") {
      const same = data.byKind.logit.targets.find(function (t) { return t.index === target().index; });
      all = Object.values(same.projection_maps).flat(2);
    }
    let low = Infinity;
    let high = -Infinity;
    for (const value of all) {
      low = Math.min(low, value);
      high = Math.max(high, value);
    }
    return high > low ? [low, high] : [low - 1, low + 1];
  }

  function fmt(value) {
    return Number.isInteger(value) || Math.abs(value) >= 100 ? value.toFixed(0) : value.toPrecision(3);
  }

  // -- drawing ----------------------------------------------------------------------------------------

  function drawMap() {
    const [h, w] = data.result.grid;
    const cell = Math.floor(448 / Math.max(h, w));
    canvas.width = w * cell;
    canvas.height = h * cell;
    context.imageSmoothingEnabled = false;
    context.globalAlpha = 1;
    context.filter = state.base === "grey" ? "grayscale(1)" : "none";
    context.drawImage(data.picture, 0, 0, canvas.width, canvas.height);
    context.filter = "none";
    const values = mapValues(state.kind, state.layer);
    canvas.dataset.layer = String(state.layer);
    canvas.dataset.stream = state.stream;
    canvas.dataset.kind = state.kind;
    canvas.dataset.target = String(target().index);
    if (!values) {
      canvas.dataset.drawn = "none";
      $("bar-low").textContent = "";
      $("bar-high").textContent = "";
      $("bar-units").textContent = state.kind
        ? "no " + KIND_NAMES[state.kind] + " map at this layer"
        : "no map of this stream: submit the job with token_classes";
      return;
    }
    const [low, high] = valueRange(state.kind, values);
    context.globalAlpha = Number($("opacity").value) / 100;
    values.forEach(function (value, token) {
      const rgb = viridis((value - low) / (high - low));
      context.fillStyle = "rgb(" + rgb.join(",") + ")";
      context.fillRect((token % w) * cell, Math.floor(token / w) * cell, cell, cell);
    });
    context.globalAlpha = 1;
    if (state.patch !== null) {
      // White inside black: seen over any colour of the map, with any colour vision.
      const left = (state.patch % w) * cell;
      const top = Math.floor(state.patch / w) * cell;
      context.lineWidth = 2;
      context.strokeStyle = "#000000";
      context.strokeRect(left + 1, top + 1, cell - 2, cell - 2);
      context.strokeStyle = "#ffffff";
      context.strokeRect(left + 3, top + 3, cell - 6, cell - 6);
    }
    canvas.dataset.drawn = values.map(function (v) { return v.toFixed(4); }).join(",");
    $("bar-low").textContent = fmt(low);
    $("bar-high").textContent = fmt(high);
    $("bar-units").textContent = UNITS[state.kind];
  }

  function drawColourBar() {
    const bar = $("colourbar").getContext("2d");
    for (let x = 0; x < 256; x++) {
      bar.fillStyle = "rgb(" + viridis(x / 255).join(",") + ")";
      bar.fillRect(x, 0, 1, 12);
    }
  }

  function showPatch() {
    const list = $("patch-classes");
    list.textContent = "";
    if (state.patch === null) return;
    const w = data.result.grid[1];
    $("patch-name").textContent = "row " + Math.floor(state.patch / w) + ", column " + (state.patch % w) +
      " (" + state.stream + ", layer " + state.layer + ")";
    canvas.dataset.patch = String(state.patch);
    const classes = tokenClasses(state.layer);
    if (!classes) {
      const item = document.createElement("li");
      item.textContent = "not listed: submit the job with token_classes";
      list.appendChild(item);
    } else {
      for (const index of classes[state.patch].slice(0, 5)) {
        const item = document.createElement("li");
        item.dataset.index = String(index);
        item.textContent = data.labels[index] + " (" + index + ")" + (index === target().index ? " ← target" : "");
        list.appendChild(item);
      }
    }
    $("patch-ranks").textContent = patchRanks();
  }

  // The target's rank at the patch per layer, recovered from the identifiability maps: 1 - rank/C.
  function patchRanks() {
    const result = data.byKind.identifiability;
    if (!result) return "needs the identifiability maps";
    const same = result.targets.find(function (t) { return t.index === target().index; });
    const classes = data.labels.length;
    return Object.entries(same.projection_maps).map(function ([layer, grid]) {
      return layer + ": " + Math.round((1 - grid.flat()[state.patch]) * classes);
    }).join(" · ");
  }

  function svgElement(name, attributes, parent) {
    const element = document.createElementNS("http://www.w3.org/2000/svg", name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
    if (parent) parent.appendChild(element);
    return element;
  }

  function lineStyle(k) {
    const [dashes, name] = LINE_DASHES[k % LINE_DASHES.length];
    return { colour: LINE_COLOURS[k % LINE_COLOURS.length], dashes: dashes, name: name };
  }

  // One line per target over the layers, in its colour and dash pattern (lineStyle); its emergence
  // layer a thin vertical line in its colour with a dot where the target's line crosses it; the
  // current layer a grey bar.
  function lineChart(svg, series, first, yMax, yLabel) {
    const width = 320;
    const height = 160;
    const left = 40;
    const bottom = 28;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.textContent = "";
    const count = series[0].values.length;
    const x = function (i) { return left + (i / Math.max(1, count - 1)) * (width - left - 10); };
    const y = function (v) { return 10 + (1 - v / yMax) * (height - bottom - 10); };
    svgElement("line", { x1: left, y1: y(0), x2: width - 10, y2: y(0), stroke: "#555" }, svg);
    svgElement("line", { x1: left, y1: y(0), x2: left, y2: y(yMax), stroke: "#555" }, svg);
    const current = state.layer - first;
    if (current >= 0 && current < count) {
      svgElement("line", { x1: x(current), y1: y(0), x2: x(current), y2: y(yMax), stroke: "#bbb", "stroke-width": 4 }, svg);
    }
    for (let i = 0; i < count; i++) {
      const tick = svgElement("text", { x: x(i), y: height - 12, "font-size": 10, "text-anchor": "middle" }, svg);
      tick.textContent = String(i + first);
    }
    const label = svgElement("text", { x: width / 2, y: height - 1, "font-size": 10, "text-anchor": "middle" }, svg);
    label.textContent = "layer";
    for (const [value, text] of [[0, "0"], [yMax, fmt(yMax)]]) {
      const tick = svgElement("text", { x: left - 4, y: y(value) + 4, "font-size": 10, "text-anchor": "end" }, svg);
      tick.textContent = text;
    }
    const unit = svgElement("text", { x: left + 4, y: 9, "font-size": 10 }, svg);
    unit.textContent = yLabel;
    series.forEach(function (line, k) {
      const style = lineStyle(k);
      const points = line.values.map(function (v, i) { return x(i) + "," + y(v); }).join(" ");
      const drawn = svgElement("polyline", {
        points: points, fill: "none", stroke: style.colour, "stroke-width": k === state.target ? 3 : 1.5,
        "data-index": line.index,
      }, svg);
      if (style.dashes) drawn.setAttribute("stroke-dasharray", style.dashes);
      const i = line.emergence === null ? -1 : line.emergence - first;
      if (i >= 0 && i < count) {
        const at = x(i);
        svgElement("line", {
          x1: at, y1: y(0), x2: at, y2: y(yMax), stroke: style.colour, "stroke-width": 1, "stroke-opacity": 0.7,
          "data-emergence": line.emergence,
        }, svg);
        svgElement("circle", {
          cx: at, cy: y(line.values[i]), r: 3.5, fill: style.colour, stroke: "#ffffff", "stroke-width": 1,
        }, svg);
      }
    });
    svg.dataset.stream = state.stream;
  }

  function drawCharts() {
    const targets = data.result.targets;
    const emergence = function (t) { return t.emergence_layer; };
    const rankMax = Math.max(1, ...targets.flatMap(function (t) { return t.pooled_ranks; }));
    lineChart($("chart-rank"), targets.map(function (t) {
      return { index: t.index, values: t.pooled_ranks, emergence: emergence(t) };
    }), 0, rankMax, "rank");
    const stream = function (t) { return t[state.stream] || t.residual; };
    const first = state.stream === "residual" || !targets[0][state.stream] ? 0 : 1;
    lineChart($("chart-identifiability"), targets.map(function (t) {
      return { index: t.index, values: stream(t).image_identifiability, emergence: emergence(t) };
    }), first, 1, "identifiability");
    lineChart($("chart-top1"), targets.map(function (t) {
      return { index: t.index, values: stream(t).image_top1_share, emergence: emergence(t) };
    }), first, 1, "top-1 share");
    drawLegend(targets);
  }

  // The legend of the three charts, as text: each target's name, its line's colour and dash
  // pattern (drawn beside it), and its emergence layer.
  function drawLegend(targets) {
    const legend = $("legend");
    legend.textContent = "";
    targets.forEach(function (t, k) {
      const style = lineStyle(k);
      const item = document.createElement("li");
      item.dataset.index = String(t.index);
      const swatch = svgElement("svg", { width: 44, height: 12, viewBox: "0 0 44 12", "aria-hidden": "true" }, item);
      const line = svgElement("line", { x1: 2, y1: 6, x2: 42, y2: 6, stroke: style.colour, "stroke-width": 2.5 }, swatch);
      if (style.dashes) line.setAttribute("stroke-dasharray", style.dashes);
      svgElement("circle", { cx: 22, cy: 6, r: 3.5, fill: style.colour, stroke: "#ffffff", "stroke-width": 1 }, swatch);
      const name = document.createElement("strong");
      name.textContent = t.label + " (class " + t.index + ")";
      item.appendChild(name);
      const emerges = t.emergence_layer === null ? "does not emerge" : "emerges at layer " + t.emergence_layer + " (the dot)";
      item.appendChild(document.createTextNode(": " + style.name + " line, " + emerges +
        (k === state.target ? "; the target shown (thicker line)" : "")));
      legend.appendChild(item);
    });
  }

  function redraw() {
    $("layer-value").textContent = String(state.layer) + (layerless(state.kind) ? " (this map has no layer)" : "");
    $("opacity-value").textContent = $("opacity").value + " %";
    drawMap();
    showPatch();
    drawCharts();
  }

  // -- controls ---------------------------------------------------------------------------------------

  function fillKinds() {
    const select = $("kind");
    const kinds = kindsFor(state.stream);
    select.textContent = "";
    for (const kind of kinds) {
      const option = document.createElement("option");
      option.value = kind;
      option.textContent = KIND_NAMES[kind];
      select.appendChild(option);
    }
    if (!kinds.includes(state.kind)) state.kind = kinds.length ? kinds[0] : null;
    select.disabled = !kinds.length;
    if (state.kind) select.value = state.kind;
  }

  function fillLayers() {
    const [low, high] = layerRange();
    const slider = $("layer");
    slider.min = String(low);
    slider.max = String(high);
    state.layer = Math.min(high, Math.max(low, state.layer));
    slider.value = String(state.layer);
  }

  function pointAt(event) {
    const [h, w] = data.result.grid;
    const box = canvas.getBoundingClientRect();
    const column = Math.min(w - 1, Math.floor(((event.clientX - box.left) / box.width) * w));
    const row = Math.min(h - 1, Math.floor(((event.clientY - box.top) / box.height) * h));
    if (row < 0 || column < 0) return;
    state.patch = row * w + column;
    drawMap();
    showPatch();
  }

  function step(event) {
    const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
    const move = moves[event.key];
    if (!move) return;
    event.preventDefault();
    const [h, w] = data.result.grid;
    const current = state.patch === null ? 0 : state.patch;
    const row = Math.min(h - 1, Math.max(0, Math.floor(current / w) + move[0]));
    const column = Math.min(w - 1, Math.max(0, (current % w) + move[1]));
    state.patch = state.patch === null ? 0 : row * w + column;
    drawMap();
    showPatch();
  }

  function addTargetOption(t, k) {
    const option = document.createElement("option");
    option.value = String(k);
    option.textContent = t.label + " (class " + t.index + ", p = " + t.probability.toFixed(3) + ")";
    $("target").appendChild(option);
  }

  // -- any class by name --------------------------------------------------------------------------------

  function classStatus(text, isError) {
    $("class-status").textContent = text;
    $("class-status").classList.toggle("error", Boolean(isError));
  }

  // The class a typed name means: a label (any case), or a class index.
  function classIndex(text) {
    const wanted = text.trim().toLowerCase();
    const found = data.labels.findIndex(function (label) { return label.toLowerCase() === wanted; });
    if (found >= 0) return found;
    return /^[0-9]+$/.test(wanted) && Number(wanted) < data.labels.length ? Number(wanted) : -1;
  }

  // Whether the picture the network saw, sent again, is the same input: true when the model's
  // preprocessing leaves a picture of its input size as it is (no trim, a resize to that very size,
  // no other crop). Otherwise the second resize and crop would explain another picture.
  function inputIsReusable() {
    const steps = data.model.preprocessing;
    const size = [data.model.input.height, data.model.input.width];
    const same = function (pair) { return Boolean(pair) && pair[0] === size[0] && pair[1] === size[1]; };
    const resizeKeeps = same(steps.resize) && (steps.resize_mode !== "shorter" || size[0] === size[1]);
    return !steps.trim_border && resizeKeeps && (!steps.crop || same(steps.crop));
  }

  // The form fields of a job's canonical parameters, asking for other targets.
  function formFields(parameters, targets) {
    const fields = {};
    for (const [name, value] of Object.entries(parameters)) {
      if (value === null || value === undefined || (Array.isArray(value) && !value.length)) continue;
      fields[name] = Array.isArray(value) ? value.join(",") : String(value);
    }
    fields.targets = targets.join(",");
    return fields;
  }

  // Explain the same picture for one more class, with each loaded job's own parameters (so every
  // map kind has it), then merge that target into each result: the selector, maps and charts gain it.
  async function explainClass(index) {
    if (!inputIsReusable()) {
      throw new Error(data.job.model + " resizes or crops its input, so the picture it saw cannot be sent " +
        "again as it is: submit the original image with this class as a target (the targets field of the API)");
    }
    const response = await ClassLens.api(jobUrl(jobId) + "/input.png");
    if (!response.ok) throw new Error("the input picture cannot be read again (" + response.status + ")");
    const picture = await response.blob();
    const queued = [];
    for (const [kind, job] of Object.entries(data.jobs)) {
      const form = new FormData();
      form.append("image", picture, "input.png");
      form.append("model", job.model);
      for (const [name, value] of Object.entries(formFields(job.parameters, [index]))) form.append(name, value);
      queued.push([kind, await json("/v1/explanations", { method: "POST", body: form })]);
    }
    const added = [];
    for (const [kind, job] of queued) {
      const done = await ClassLens.finished(jobUrl(job.id), job, function (polled) {
        classStatus("Explaining " + data.labels[index] + ": job " + polled.id + " is " + polled.status + "…");
      });
      const found = done.result.targets.find(function (t) { return t.index === index; });
      if (!found) throw new Error("job " + done.id + " did not explain class " + index);
      added.push([kind, found]);
    }
    // All or nothing: a map kind without the new target would show nothing for it.
    for (const [kind, found] of added) data.byKind[kind].targets.push(found);
  }

  async function showClass(event) {
    event.preventDefault();
    const text = $("class-name").value;
    const index = classIndex(text);
    if (index < 0) {
      classStatus("No class of " + data.job.model + " is named " + JSON.stringify(text.trim()) + ".", true);
      return;
    }
    let k = data.result.targets.findIndex(function (t) { return t.index === index; });
    if (k < 0) {
      $("class-show").disabled = true;
      classStatus("Explaining " + data.labels[index] + "…");
      try {
        await explainClass(index);
      } catch (error) {
        classStatus(error.message, true);
        return;
      } finally {
        $("class-show").disabled = false;
      }
      k = data.result.targets.length - 1;
      addTargetOption(data.result.targets[k], k);
    }
    state.target = k;
    $("target").value = String(k);
    classStatus("Showing " + data.labels[index] + " (class " + index + ").");
    redraw();
  }

  function fillClassNames() {
    const list = $("class-names");
    for (const label of data.labels) {
      const option = document.createElement("option");
      option.value = label;
      list.appendChild(option);
    }
  }

  function wire() {
    const targetSelect = $("target");
    data.result.targets.forEach(addTargetOption);
    targetSelect.addEventListener("change", function () { state.target = Number(targetSelect.value); redraw(); });
    fillClassNames();
    $("class-form").addEventListener("submit", showClass);
    $("stream").addEventListener("change", function () {
      state.stream = $("stream").value;
      fillKinds();
      fillLayers();
      redraw();
    });
    $("kind").addEventListener("change", function () { state.kind = $("kind").value; redraw(); });
    $("layer").addEventListener("input", function () { state.layer = Number($("layer").value); redraw(); });
    $("opacity").addEventListener("input", redraw);
    for (const radio of document.querySelectorAll("input[name=base]")) {
      radio.addEventListener("change", function () { state.base = radio.value; redraw(); });
    }
    canvas.addEventListener("mousemove", pointAt);
    canvas.addEventListener("keydown", step);
    canvas.addEventListener("focus", function () {
      if (state.patch === null) { state.patch = 0; drawMap(); showPatch(); }
    });
  }

  load().then(function (loaded) {
    data = loaded;
    const result = data.result;
    if (!result.targets.length) throw new Error("the explanation has no targets");
    for (const stream of ["attention", "mlp"]) {
      if (!result.targets[0][stream]) $("stream").querySelector("option[value=" + stream + "]").disabled = true;
    }
    const top = result.prediction[0];
    $("summary").textContent = data.job.model + " predicts " + top.label + " (p = " + top.probability.toFixed(3) +
      "); " + result.layers + " blocks, a " + result.grid[0] + " × " + result.grid[1] + " grid of patches.";
    state.layer = result.layers;
    state.kind = result.map_kind;
    drawColourBar();
    wire();
    fillKinds();
    fillLayers();
    redraw();
    $("viewer").hidden = false;
    say("Ready.");
    document.body.dataset.ready = "true";
  }).catch(function (error) {
    say(error.message, true);
    document.body.dataset.ready = "failed";
  });
})();
