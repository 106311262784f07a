// Colours shared by the pages: the map colour scale and the palette for series (ClassLens.colours).
"use strict";

(function () {
  // viridis (matplotlib), 11 evenly spaced stops: readable for colour-blind people and in greyscale.
  const VIRIDIS = [
    [68, 1, 84], [72, 36, 117], [65, 68, 135], [53, 95, 141], [42, 120, 142], [33, 145, 140],
    [34, 168, 132], [68, 191, 112], [122, 209, 81], [189, 223, 38], [253, 231, 37],
  ];
  // Okabe and Ito's palette: told apart with any colour vision.
  const LINE_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#F0E442"];

  // The colour of t in [0, 1] (clamped), as [r, g, b].
  function viridis(t) {
    const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const f = x - i;
    return VIRIDIS[i].map(function (c, j) { return Math.round(c + f * (VIRIDIS[i + 1][j] - c)); });
  }

  window.ClassLens = window.ClassLens || {};
  window.ClassLens.colours = { viridis: viridis, LINE_COLOURS: LINE_COLOURS };
})();
