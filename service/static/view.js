// The explanation viewer: reads the job JSON (and its logit and probability siblings) and draws
// every map client-side on a canvas, so moving a control never fetches anything (docs/viewer.md).
"use strict";

(function () {
  // viridis for the maps, Okabe and Ito's palette for the targets' lines (colours.js).
  const viridis = window.ClassLens.colours.viridis;
  const LINE_COLOURS = window.ClassLens.colours.LINE_COLOURS;
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
  let data = null; // {result, byKind: {kind: result}, labels, picture}

  function say(text, isError) {
    $("status").textContent = text;
    $("status").classList.toggle("error", Boolean(isError));
  }

  async function json(url) {
    const response = await fetch(url);
    const body = await response.json();
    if (!response.ok) throw new Error((body.title || response.status) + ": " + (body.detail || url));
    return body;
  }

  function picture(url) {
    return new Promise(function (resolve, reject) {
      const image = new Image();
      image.onload = function () { resolve(image); };
      image.onerror = function () { reject(new Error("the input picture cannot be loaded")); };
      image.src = url;
    });
  }

  async function load() {
    const job = await json("/v1/explanations/" + encodeURIComponent(jobId));
    if (job.status !== "succeeded") {
      throw new Error("job " + job.id + " is " + job.status + (job.error ? ": " + job.error.detail : ""));
    }
    const result = job.result;
    const byKind = {};
    byKind[result.map_kind] = result;
    const query = new URLSearchParams(window.location.search);
    for (const kind of ["logit", "probability"]) {
      const sibling = query.get(kind);
      if (!sibling || byKind[kind]) continue;
      const other = await json("/v1/explanations/" + encodeURIComponent(sibling));
      if (other.status === "succeeded" && other.result.map_kind === kind && other.model === job.model) {
        byKind[kind] = other.result;
      }
    }
    const model = await json("/v1/models/" + encodeURIComponent(job.model));
    const image = await picture("/v1/explanations/" + encodeURIComponent(jobId) + "/input.png");
    return { job: job, result: result, byKind: byKind, labels: model.labels, picture: image };
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
      context.strokeStyle = "#ff2d2d";
      context.lineWidth = 3;
      context.strokeRect((state.patch % w) * cell + 1.5, Math.floor(state.patch / w) * cell + 1.5, cell - 3, cell - 3);
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

  // One line per target over the layers; the emergence layers dashed, the current layer in grey.
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
      const colour = LINE_COLOURS[k % LINE_COLOURS.length];
      const points = line.values.map(function (v, i) { return x(i) + "," + y(v); }).join(" ");
      svgElement("polyline", {
        points: points, fill: "none", stroke: colour, "stroke-width": k === state.target ? 3 : 1.5,
      }, svg);
      if (line.emergence !== null && line.emergence - first >= 0) {
        const at = x(line.emergence - first);
        svgElement("line", {
          x1: at, y1: y(0), x2: at, y2: y(yMax), stroke: colour, "stroke-dasharray": "4 3", "stroke-width": 1.5,
          "data-emergence": line.emergence,
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
      return { values: t.pooled_ranks, emergence: emergence(t) };
    }), 0, rankMax, "rank");
    const stream = function (t) { return t[state.stream] || t.residual; };
    const first = state.stream === "residual" || !targets[0][state.stream] ? 0 : 1;
    lineChart($("chart-identifiability"), targets.map(function (t) {
      return { values: stream(t).image_identifiability, emergence: emergence(t) };
    }), first, 1, "identifiability");
    lineChart($("chart-top1"), targets.map(function (t) {
      return { values: stream(t).image_top1_share, emergence: emergence(t) };
    }), first, 1, "top-1 share");
    const legend = $("legend");
    legend.textContent = "";
    targets.forEach(function (t, k) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = LINE_COLOURS[k % LINE_COLOURS.length];
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(t.label + " (emerges at " +
        (t.emergence_layer === null ? "no layer" : "layer " + t.emergence_layer) + ")"));
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

  function wire() {
    const targetSelect = $("target");
    data.result.targets.forEach(function (t, k) {
      const option = document.createElement("option");
      option.value = String(k);
      option.textContent = t.label + " (class " + t.index + ", p = " + t.probability.toFixed(3) + ")";
      targetSelect.appendChild(option);
    });
    targetSelect.addEventListener("change", function () { state.target = Number(targetSelect.value); redraw(); });
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
