/* The Head page's token view (CircuitsVis style): hover a token to colour where it attends
   (blue, by weight) and which queries attend to it (orange). The weights travel in the
   container's data-weights attribute: {rows: per query [[key, weight], ...], exact: [start,
   stop) of the query rows with exact weights (other rows hold the keys the kernels found each
   query attends to most, largest first), tokens: the token texts}. */
(function () {
  "use strict";
  function weightsOf(view) {
    if (!view._weights || view._weightsText !== view.dataset.weights) {
      view._weightsText = view.dataset.weights;
      view._weights = JSON.parse(view.dataset.weights || "{\"rows\": []}");
    }
    return view._weights;
  }
  function clear(view) {
    for (const span of view.querySelectorAll(".tok")) {
      span.style.background = "";
      span.style.boxShadow = "";
      span.classList.remove("tok-hovered");
    }
  }
  function name(data, i) {
    return i + ":" + JSON.stringify(data.tokens[i]);
  }
  function show(view, i) {
    const data = weightsOf(view);
    const spans = view.querySelectorAll(".tok");
    clear(view);
    spans[i].classList.add("tok-hovered");
    const exact = i >= data.exact[0] && i < data.exact[1];
    let best = null;
    for (const [k, w] of data.rows[i] || []) {
      spans[k].style.background = "rgba(13, 110, 253, " + Math.min(1, 0.1 + w) + ")";
      if (best === null || w > best[1]) best = [k, w];
    }
    let by = null;
    data.rows.forEach((row, q) => {
      for (const [k, w] of row) {
        if (k === i && q !== i && w >= 0.05) {
          spans[q].style.boxShadow = "inset 0 -4px 0 rgba(230, 126, 34, " + Math.min(1, 0.2 + w) + ")";
          if (by === null || w > by[1]) by = [q, w];
        }
      }
    });
    const info = view.parentElement.querySelector(".token-info");
    if (info) {
      const row = data.rows[i] || [];
      const to = best === null ? "nothing" : exact ?
        name(data, best[0]) + " (" + best[1].toFixed(3) + ")" :
        row.map(([k, w]) => name(data, k) + " (" + w.toFixed(3) + ")").join(", ") +
          " (the kernels' top " + row.length + ")";
      const from = by === null ? "no query above 0.05" :
        name(data, by[0]) + " (" + by[1].toFixed(3) + ")";
      info.textContent = name(data, i) + " attends most to " + to + "; attended most by " + from;
    }
  }
  document.addEventListener("mouseover", function (event) {
    const span = event.target.closest && event.target.closest(".token-view .tok");
    if (!span) return;
    show(span.closest(".token-view"), parseInt(span.dataset.i, 10));
  });
})();
