// The audit browser: follows the audit while it runs, then shows its rows (sortable, filterable, each image
// with its map), its confusion matrix and histograms; choosing a row explains its image and opens the viewer.
"use strict";

(function () {
  const $ = function (id) { return document.getElementById(id); };
  const jobId = document.body.dataset.job;
  const auditUrl = "/v1/audits/" + encodeURIComponent(jobId);
  const viridis = window.ClassLens.colours.viridis;
  const THUMBNAIL = 56; // CSS pixels a side
  const LOADING = 4; // images fetched at once for the thumbnails
  const FIXED_RANGE = { identifiability: "identifiability 1 − rank/C", probability: "probability" };
  const state = { key: null, descending: false, text: "", correctness: "all", predicted: "" };
  let job = null;
  let entries = []; // {row, index, tr}, in the order shown
  let opening = false;

  // The one place this script calls the API: through api.js, which adds the key when the service wants one.
  function api(url, options) {
    return window.ClassLens.api(url, options);
  }

  async function json(url) {
    const response = await api(url);
    if (!response.ok) throw new Error(await window.ClassLens.jobs.problemText(response));
    return response.json();
  }

  function say(text, isError) {
    $("status").textContent = text;
    $("status").classList.toggle("error", Boolean(isError));
  }

  function fixed(value, digits) { return value === null || value === undefined ? "" : value.toFixed(digits); }

  // -- following the audit -----------------------------------------------------------------------------

  function showProgress(current) {
    const progress = current.progress || { done: 0, total: 0 };
    const bar = $("progress");
    bar.hidden = false;
    bar.max = Math.max(1, progress.total);
    bar.value = progress.done;
    say(current.status === "queued"
      ? "Queued: waiting for a worker…"
      : "Running: " + progress.done + " of " + progress.total + " images explained…");
  }

  async function follow() {
    let current = await json(auditUrl);
    while (current.status === "queued" || current.status === "running") {
      showProgress(current);
      current = await json(auditUrl + "?wait=5");
    }
    $("progress").hidden = true;
    if (current.status !== "succeeded") {
      throw new Error("the audit " + current.status + (current.error ? ": " + current.error.title + ": " + current.error.detail : ""));
    }
    return current;
  }

  // -- the table ---------------------------------------------------------------------------------------

  // A row's confidence: its own field where the result has one, else the top-1 probability (the same number).
  function confidence(row) { return typeof row.confidence === "number" ? row.confidence : row.probability; }

  function columns(rows) {
    const list = [
      { key: "image", title: "Image" },
      { key: "file", title: "File", value: function (r) { return r.file; } },
      { key: "true", title: "True label", value: function (r) { return r.true_label; } },
      { key: "predicted", title: "Prediction", value: function (r) { return r.predicted_label; } },
      {
        key: "correct", title: "Correct",
        value: function (r) { return r.correct === null ? null : Number(r.correct); },
        text: function (r) { return r.correct === null ? "unlabelled" : (r.correct ? "yes" : "no"); },
      },
      { key: "confidence", title: "Confidence", value: confidence, text: function (r) { return fixed(confidence(r), 3); } },
    ];
    if (rows.some(function (r) { return typeof r.margin === "number"; })) {
      list.push({
        key: "margin", title: "Margin",
        value: function (r) { return typeof r.margin === "number" ? r.margin : null; },
        text: function (r) { return typeof r.margin === "number" ? r.margin.toFixed(3) : ""; },
      });
    }
    list.push({
      key: "emergence", title: "Emergence layer",
      // Never (null) sorts after every layer: the class did not settle at all.
      value: function (r) { return r.predicted_emergence_layer === null ? Infinity : r.predicted_emergence_layer; },
      text: function (r) { return r.predicted_emergence_layer === null ? "never" : String(r.predicted_emergence_layer); },
    });
    return list;
  }

  function compare(a, b) {
    if (a === b) return 0;
    if (a === null || a === undefined) return 1; // empty cells last, whichever the direction
    if (b === null || b === undefined) return -1;
    if (typeof a === "string") return a.localeCompare(b);
    return a < b ? -1 : 1;
  }

  function buildTable(rows) {
    const shown = columns(rows);
    const head = $("rows-head");
    for (const column of shown) {
      const th = document.createElement("th");
      th.scope = "col";
      th.dataset.key = column.key;
      if (column.value) {
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = column.title;
        button.addEventListener("click", function () { sortBy(column); });
        th.appendChild(button);
        th.setAttribute("aria-sort", "none");
      } else {
        th.textContent = column.title;
      }
      head.appendChild(th);
    }
    const body = $("rows").tBodies[0];
    entries = rows.map(function (row, index) {
      const tr = document.createElement("tr");
      tr.tabIndex = 0;
      tr.dataset.index = String(index);
      tr.setAttribute("aria-label", row.file + ": open in the viewer");
      for (const column of shown) {
        const td = document.createElement("td");
        td.dataset.key = column.key;
        if (column.key === "image") {
          const canvas = document.createElement("canvas");
          canvas.width = THUMBNAIL;
          canvas.height = THUMBNAIL;
          canvas.setAttribute("role", "img");
          canvas.setAttribute("aria-label", row.file + " with the map of " + row.explained_label);
          td.appendChild(canvas);
        } else {
          const value = column.value(row);
          td.textContent = column.text ? column.text(row) : (value === null ? "" : String(value));
          if (column.key === "correct" && row.correct === false) tr.classList.add("wrong");
        }
        tr.appendChild(td);
      }
      tr.addEventListener("click", function () { openRow(index); });
      tr.addEventListener("keydown", function (event) {
        if (event.key === "Enter") {
          event.preventDefault();
          openRow(index);
        }
      });
      body.appendChild(tr);
      return { row: row, index: index, tr: tr, columns: shown };
    });
  }

  function sortBy(column) {
    state.descending = state.key === column.key ? !state.descending : false;
    state.key = column.key;
    for (const th of $("rows-head").children) {
      if (!th.hasAttribute("aria-sort")) continue;
      th.setAttribute("aria-sort", th.dataset.key !== state.key ? "none" : (state.descending ? "descending" : "ascending"));
    }
    const sign = state.descending ? -1 : 1;
    entries.sort(function (a, b) {
      const x = column.value(a.row);
      const y = column.value(b.row);
      const empty = x === null || y === null;
      return (empty ? compare(x, y) : sign * compare(x, y)) || a.index - b.index;
    });
    const body = $("rows").tBodies[0];
    for (const entry of entries) body.appendChild(entry.tr);
  }

  function matches(row) {
    if (state.correctness === "correct" && row.correct !== true) return false;
    if (state.correctness === "misclassified" && row.correct !== false) return false;
    if (state.predicted !== "" && String(row.predicted_index) !== state.predicted) return false;
    if (!state.text) return true;
    return [row.file, row.true_label || "", row.predicted_label].some(function (text) {
      return text.toLowerCase().includes(state.text);
    });
  }

  function filter() {
    let count = 0;
    for (const entry of entries) {
      entry.tr.hidden = !matches(entry.row);
      if (!entry.tr.hidden) count++;
    }
    $("shown").textContent = "Showing " + count + " of " + entries.length + " images.";
  }

  function wireFilters(rows) {
    const select = $("filter-class");
    const classes = new Map();
    for (const row of rows) classes.set(row.predicted_index, row.predicted_label);
    for (const [index, label] of [...classes.entries()].sort(function (a, b) { return a[0] - b[0]; })) {
      const option = document.createElement("option");
      option.value = String(index);
      option.textContent = label;
      select.appendChild(option);
    }
    select.addEventListener("change", function () { state.predicted = select.value; filter(); });
    $("filter-text").addEventListener("input", function () {
      state.text = $("filter-text").value.trim().toLowerCase();
      filter();
    });
    for (const radio of document.querySelectorAll("input[name=correctness]")) {
      radio.addEventListener("change", function () { state.correctness = radio.value; filter(); });
    }
  }

  // -- thumbnails --------------------------------------------------------------------------------------

  function mapKind(row) { return row.map_kind || job.result.map_kind; }

  function mapRange(row) {
    if (mapKind(row) in FIXED_RANGE) return [0, 1];
    const values = row.map.flat();
    const low = Math.min(...values);
    const high = Math.max(...values);
    return high > low ? [low, high] : [low - 1, low + 1];
  }

  function drawThumbnail(entry, picture) {
    const canvas = entry.tr.querySelector("canvas");
    const context = canvas.getContext("2d");
    const map = entry.row.map;
    const h = map.length;
    const w = map[0].length;
    context.imageSmoothingEnabled = false;
    if (picture) context.drawImage(picture, 0, 0, THUMBNAIL, THUMBNAIL);
    const [low, high] = mapRange(entry.row);
    context.globalAlpha = picture ? 0.5 : 1;
    map.forEach(function (cells, r) {
      cells.forEach(function (value, c) {
        context.fillStyle = "rgb(" + viridis((value - low) / (high - low)).join(",") + ")";
        const x0 = Math.round((c * THUMBNAIL) / w);
        const y0 = Math.round((r * THUMBNAIL) / h);
        context.fillRect(x0, y0, Math.round(((c + 1) * THUMBNAIL) / w) - x0, Math.round(((r + 1) * THUMBNAIL) / h) - y0);
      });
    });
    context.globalAlpha = 1;
    canvas.dataset.drawn = picture ? "image and map" : "map only";
  }

  function imageUrl(index) { return auditUrl + "/images/" + index; }

  async function imageOf(index) {
    const response = await api(imageUrl(index));
    if (!response.ok) throw new Error(await window.ClassLens.jobs.problemText(response));
    return response.blob();
  }

  async function loadThumbnails() {
    const queue = entries.slice();
    async function next() {
      for (let entry = queue.shift(); entry; entry = queue.shift()) {
        let picture = null;
        try {
          picture = await createImageBitmap(await imageOf(entry.index));
        } catch (error) {
          entry.tr.querySelector("canvas").title = "the image cannot be shown here: " + error.message;
        }
        drawThumbnail(entry, picture);
      }
    }
    const loaders = [];
    for (let k = 0; k < LOADING; k++) loaders.push(next());
    await Promise.all(loaders);
  }

  function drawColourBar(rows) {
    const bar = $("colourbar").getContext("2d");
    for (let x = 0; x < 256; x++) {
      bar.fillStyle = "rgb(" + viridis(x / 255).join(",") + ")";
      bar.fillRect(x, 0, 1, 12);
    }
    const kind = rows.length ? mapKind(rows[0]) : job.result.map_kind;
    const layer = job.result.relevance_layer;
    if (kind in FIXED_RANGE) {
      $("bar-low").textContent = "0";
      $("bar-high").textContent = "1";
      $("bar-units").textContent = "maps: " + FIXED_RANGE[kind] + " of the explained class, layer " + layer;
    } else {
      $("bar-low").textContent = "low";
      $("bar-high").textContent = "high";
      $("bar-units").textContent = "maps: " + kind + " of the explained class, layer " + layer + ", over each image's own range";
    }
  }

  // -- summaries ---------------------------------------------------------------------------------------

  function drawConfusion(cells) {
    const table = $("confusion");
    if (!cells.length) {
      table.textContent = "";
      const caption = table.createCaption();
      caption.textContent = "No image has a true label: there is no confusion matrix.";
      return;
    }
    const labels = new Map();
    for (const cell of cells) {
      labels.set(cell.true_index, cell.true_label);
      labels.set(cell.predicted_index, cell.predicted_label);
    }
    const classes = [...labels.keys()].sort(function (a, b) { return a - b; });
    const counts = new Map(cells.map(function (cell) { return [cell.true_index + "," + cell.predicted_index, cell.count]; }));
    const most = Math.max(...cells.map(function (cell) { return cell.count; }));
    const head = table.createTHead().insertRow();
    const corner = document.createElement("td");
    corner.textContent = "true \\ predicted";
    head.appendChild(corner);
    for (const index of classes) {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = labels.get(index);
      head.appendChild(th);
    }
    const body = table.createTBody();
    for (const truth of classes) {
      const tr = body.insertRow();
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = labels.get(truth);
      tr.appendChild(th);
      for (const predicted of classes) {
        const count = counts.get(truth + "," + predicted) || 0;
        const td = tr.insertCell();
        td.textContent = String(count);
        td.dataset.true = String(truth);
        td.dataset.predicted = String(predicted);
        td.dataset.count = String(count);
        // One hue, darker with the count: read by lightness alone, whatever the colour vision.
        const share = count / most;
        td.style.backgroundColor = "rgba(0, 114, 178, " + (0.08 + 0.92 * share).toFixed(3) + ")";
        if (share > 0.5) td.classList.add("dark");
        if (truth === predicted) td.classList.add("diagonal");
      }
    }
  }

  function histogram(list, bins) {
    const most = Math.max(1, ...bins.map(function (bin) { return bin.count; }));
    for (const bin of bins) {
      const item = document.createElement("li");
      item.dataset.bin = bin.name || bin.label;
      item.dataset.count = String(bin.count);
      item.title = (bin.name || bin.label) + ": " + bin.count + (bin.count === 1 ? " image" : " images");
      const count = document.createElement("span");
      count.className = "count";
      count.textContent = String(bin.count);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.height = Math.round((bin.count / most) * 100) + "px";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = bin.label;
      item.append(count, bar, label);
      list.appendChild(item);
    }
  }

  function drawHistograms(result) {
    const layers = Object.keys(result.aggregates.emergence_histogram)
      .sort(function (a, b) { return (a === "never" ? Infinity : Number(a)) - (b === "never" ? Infinity : Number(b)); });
    histogram($("emergence-histogram"), layers.map(function (layer) {
      return { label: layer, count: result.aggregates.emergence_histogram[layer] };
    }));
    const bins = [];
    for (let k = 0; k < 10; k++) {
      bins.push({ label: (k / 10).toFixed(1), name: (k / 10).toFixed(1) + "–" + ((k + 1) / 10).toFixed(1), count: 0 });
    }
    for (const row of result.rows) bins[Math.min(9, Math.floor(confidence(row) * 10))].count++;
    histogram($("confidence-histogram"), bins);
  }

  function summarise(result) {
    const a = result.aggregates;
    const accuracy = a.accuracy === null
      ? "no true labels"
      : "accuracy " + a.accuracy.toFixed(3) + " (" + a.correct + " of " + a.labelled + " labelled)";
    $("summary").textContent = job.model + ": " + a.images + " images, " + accuracy + "; mean confidence " +
      a.mean_top1_probability.toFixed(3) + "; " + result.layers + " blocks, a " + result.grid[0] + " × " +
      result.grid[1] + " grid of patches.";
  }

  // -- opening a row -------------------------------------------------------------------------------------

  // The viewer's jobs (as /ui submits them): every layer, the top 3, per-token classes on the main one.
  function fields(mapKind) {
    const main = mapKind === "identifiability";
    const values = { model: job.model, layers: "all", top_k: "3", map_kind: mapKind, sublayers: main ? "true" : "false" };
    if (main) values.token_classes = "5";
    return values;
  }

  async function openRow(index) {
    if (opening) return;
    opening = true;
    const file = entries.find(function (entry) { return entry.index === index; }).row.file;
    try {
      say("Explaining " + file + "…");
      const address = await window.ClassLens.jobs.viewer(await imageOf(index), fields, function (now) {
        say("Explaining " + file + ": job " + now.id + " " + now.status + "…");
      });
      say("Done: opening the viewer.");
      window.location.assign(address);
    } catch (error) {
      say(file + ": " + error.message, true);
      opening = false;
    }
  }

  // A download link that works with authentication on too: a plain link cannot send the key, so a
  // click fetches the file through api() and hands the browser a blob: address of it.
  function offerDownload(link, url, name) {
    link.href = url;
    link.addEventListener("click", async function (event) {
      event.preventDefault();
      try {
        const response = await api(url);
        if (!response.ok) throw new Error("the download failed (" + response.status + ")");
        const address = URL.createObjectURL(await response.blob());
        const save = document.createElement("a");
        save.href = address;
        save.download = name;
        document.body.appendChild(save);
        save.click();
        save.remove();
        setTimeout(function () { URL.revokeObjectURL(address); }, 1000);
      } catch (error) {
        say(error.message, true);
      }
    });
  }

  follow().then(function (finished) {
    job = finished;
    const result = job.result;
    summarise(result);
    offerDownload($("download-csv"), job.links.rows_csv, "audit-" + job.id + "-rows.csv");
    offerDownload($("download-json"), job.links.report, "audit-" + job.id + "-report.json");
    drawColourBar(result.rows);
    buildTable(result.rows);
    wireFilters(result.rows);
    filter();
    drawConfusion(result.aggregates.confusion);
    drawHistograms(result);
    $("audit").hidden = false;
    say("Ready: " + result.rows.length + " images.");
    document.body.dataset.ready = "true";
    return loadThumbnails().then(function () { document.body.dataset.thumbnails = "true"; });
  }).catch(function (error) {
    $("progress").hidden = true;
    say(error.message, true);
    if (!document.body.dataset.ready) document.body.dataset.ready = "failed";
  });
})();
