// vsink viewer: reads the JSON payload in #vsink-data (see vsink/export/viewer.py), draws maps on a canvas.
// No network, no library. window.vsinkViewer exposes the state and the values drawn (for tests).
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("vsink-data").textContent);
  const app = document.getElementById("app");
  const DISPLAY = 448;
  const cache = new Map();

  function half(h) {
    const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * Math.pow(2, e - 15) * (1 + f / 1024);
  }

  function decode(enc) {
    if (cache.has(enc)) return cache.get(enc);
    const bin = atob(enc.data), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    let values;
    if (enc.dtype === "f32") values = new Float32Array(bytes.buffer);
    else {
      const h = new Uint16Array(bytes.buffer);
      values = new Float32Array(h.length);
      for (let i = 0; i < h.length; i++) values[i] = half(h[i]);
    }
    const out = { shape: enc.shape, data: values };
    cache.set(enc, out);
    return out;
  }

  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "—";
    if (v === 0) return "0";
    const a = Math.abs(v);
    return a >= 1e-4 && a < 1e6 ? String(Number(v.toPrecision(4))) : v.toExponential(3);
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function select(id, label, options) {
    const wrap = el("label", {}, label + " ");
    const s = el("select", { id: id });
    for (const [value, text] of options) s.appendChild(el("option", { value: String(value) }, text));
    wrap.appendChild(s);
    return [wrap, s];
  }

  function colour(lut, t) {
    const i = Math.max(0, Math.min(255, Math.round(t * 255)));
    return "#" + lut[i];
  }

  // the canvas at the picture's own aspect (the region the model saw), longer side DISPLAY
  function fitCanvas(canvas, picture) {
    const w = picture.naturalWidth || 1, h = picture.naturalHeight || 1, scale = DISPLAY / Math.max(w, h);
    canvas.width = Math.round(w * scale);
    canvas.height = Math.round(h * scale);
  }

  // one heat grid [h*w] over the image, with the cell of `mark` outlined, coloured on `scale`:
  // the quantity's one scale over all blocks, heads and images (DATA.scales; attention from 0),
  // so a flat map looks flat and maps of one quantity compare
  function drawGrid(ctx, picture, grid, values, lut, mark, alpha, scale) {
    const [h, w] = grid, W = ctx.canvas.width, H = ctx.canvas.height;
    ctx.clearRect(0, 0, W, H);
    ctx.drawImage(picture, 0, 0, W, H);
    const lo = scale.vmin, hi = scale.vmax;
    const span = hi > lo ? hi - lo : 1;
    ctx.globalAlpha = alpha;
    for (let r = 0; r < h; r++) for (let c = 0; c < w; c++) {
      const v = values[r * w + c];
      if (Number.isNaN(v)) continue;
      ctx.fillStyle = colour(lut, (v - lo) / span);
      ctx.fillRect(Math.floor(c * W / w), Math.floor(r * H / h), Math.ceil(W / w), Math.ceil(H / h));
    }
    ctx.globalAlpha = 1;
    if (mark !== null && mark !== undefined) {
      const r = Math.floor(mark / w), c = mark % w;
      ctx.strokeStyle = "#00e5ff";
      ctx.lineWidth = 2;
      ctx.strokeRect(c * W / w + 1, r * H / h + 1, W / w - 2, H / h - 2);
    }
    return [lo, hi];
  }

  function legend(lut, [lo, hi], scale) {
    const label = scale.label + " (one scale for every block, head and image)";
    const box = document.getElementById("legend");
    box.textContent = "";
    const bar = el("canvas", { width: "160", height: "12" });
    const ctx = bar.getContext("2d");
    for (let x = 0; x < 160; x++) { ctx.fillStyle = colour(lut, x / 159); ctx.fillRect(x, 0, 1, 12); }
    box.append(el("span", { id: "legend-min" }, fmt(lo)), bar, el("span", { id: "legend-max" }, fmt(hi)),
               el("span", { class: "note" }, label));
  }

  function cellAt(canvas, grid, event) {
    const rect = canvas.getBoundingClientRect();
    const x = (event.clientX - rect.left) / rect.width, y = (event.clientY - rect.top) / rect.height;
    const r = Math.min(grid[0] - 1, Math.max(0, Math.floor(y * grid[0])));
    const c = Math.min(grid[1] - 1, Math.max(0, Math.floor(x * grid[1])));
    return r * grid[1] + c;
  }

  function header() {
    const title = el("h2", {}, "vsink view" + (DATA.model ? " — " + DATA.model : "") + " (" + DATA.source + ")");
    app.appendChild(title);
    if (DATA.synthetic) {
      app.appendChild(el("div", { class: "banner" },
        "Synthetic demo model: its high-norm tokens are planted by construction; the maps say nothing about any real model."));
    }
  }

  // ---------------------------------------------------------------- vision: maps and scans
  function vision() {
    const state = { image: 0, layer: null, head: "mean", map: null, norm: false, query: null, hover: null };
    const api = { state: state, shown: null, grid: null, tokens: 0 };
    window.vsinkViewer = api;
    const controls = el("div", { id: "controls" });
    const [imgWrap, imgSel] = select("image-select", "image", DATA.images.map((im, i) => [i, im.name]));
    const [layerWrap, layerSel] = select("layer-select", "block", []);
    const [headWrap, headSel] = select("head-select", "head", []);
    const [mapWrap, mapSel] = select("map-select", "map", []);
    const normWrap = el("label", {}, " norm overlay");
    const normBox = el("input", { type: "checkbox", id: "norm-toggle" });
    normWrap.prepend(normBox);
    controls.append(imgWrap, layerWrap, headWrap, mapWrap, normWrap);
    app.appendChild(controls);
    const main = el("div", { id: "main" });
    const left = el("div");
    const canvas = el("canvas", { id: "canvas" });
    left.append(canvas, el("div", { id: "legend" }), el("div", { id: "hover", class: "note" }, " "));
    const side = el("div", { id: "side" });
    side.append(el("h3", {}, "Class tokens and registers (not on the grid)"), el("div", { id: "prefix" }),
                el("div", { id: "readout" }), el("h3", {}, "Largest values"), el("table", { id: "top" }),
                el("p", { id: "message", class: "note" }));
    main.append(left, side);
    app.appendChild(main);
    const picture = new Image();

    function image() { return DATA.images[state.image]; }
    function entry() { return image().layers[state.layer]; }
    // the values of a map kind: per block, or the image's rollout and pooling maps (of no block)
    function block(kind) { return kind === "pool" || kind === "rollout" ? image()[kind] : entry()[kind]; }
    function mapOptions() {
      const e = entry(), out = [];
      if (e.rows) out.push(["rows", "attention row of the selected token"]);
      if (e.cls) out.push(["cls", "class-token attention"]);
      if (e.received) out.push(["received", "attention received"]);
      if (image().rollout) out.push(["rollout", "attention rollout (all blocks)"]);
      if (image().pool) out.push(["pool", "attention-pooling head's probe (after the last block)"]);
      return out;
    }
    function headIds(kind) {
      const b = block(kind);
      return b ? b.heads : [];
    }
    function fill(sel, options, keep) {
      sel.textContent = "";
      for (const [v, t] of options) sel.appendChild(el("option", { value: String(v) }, t));
      if (options.some(([v]) => String(v) === String(keep))) sel.value = String(keep);
      return sel.value;
    }
    function refreshImage() {
      const im = image();
      const layers = Object.keys(im.layers).map(Number).sort((a, b) => a - b);
      state.layer = fill(layerSel, layers.map((l) => [l, "block " + l]), state.layer ?? layers[layers.length - 1]);
      api.grid = im.grid;
      api.tokens = im.tokens;
      if (state.query === null || state.query >= im.tokens) state.query = im.prefix.length ? im.prefix[0].token : im.patch_start;
      picture.onload = () => { fitCanvas(canvas, picture); refreshLayer(); };
      picture.src = im.image;
    }
    function refreshLayer() {
      const opts = mapOptions();
      state.map = opts.length ? fill(mapSel, opts, state.map ?? opts[0][0]) : null;
      if (!opts.length && entry().norm && !state.norm) { state.norm = true; normBox.checked = true; }
      const heads = state.map ? headIds(state.map) : [];
      const options = heads.length === 1 && heads[0] === "mean" ? [["mean", "mean"]]
        : [["mean", "mean"]].concat(heads.map((h) => [h, "head " + h]));
      state.head = fill(headSel, options, state.head);
      draw();
    }
    // values over all tokens [N] of the selected map, head and (for rows) query
    function values() {
      const im = image(), e = entry(), n = im.tokens;
      if (state.norm) return e.norm ? decode(e.norm).data : null;
      if (!state.map) return null;
      const chosen = block(state.map), arr = decode(chosen.values), heads = chosen.heads;
      const stride = state.map === "rows" ? n * n : n, offset = state.map === "rows" ? state.query * n : 0;
      const out = new Float32Array(n);
      if (state.head === "mean") {
        for (let k = 0; k < heads.length; k++) for (let j = 0; j < n; j++) out[j] += arr.data[k * stride + offset + j] / heads.length;
      } else {
        const k = heads.map(String).indexOf(String(state.head));
        for (let j = 0; j < n; j++) out[j] = arr.data[k * stride + offset + j];
      }
      return out;
    }
    function draw() {
      const im = image(), ctx = canvas.getContext("2d");
      const all = values();
      const msg = document.getElementById("message");
      msg.textContent = entry().rows ? "Click a patch (or a class token / register) to see the attention row of that query."
        : "Attention rows need full attention: vsink maps --kind full (this " + DATA.source + " export has none).";
      if (!all) { ctx.drawImage(picture, 0, 0, canvas.width, canvas.height); api.shown = null; return; }
      api.shown = all;
      const patches = all.slice(im.patch_start, im.patch_start + im.grid[0] * im.grid[1]);
      const lut = DATA.colormaps[state.norm ? "norm" : "attention"];
      const isPatchQuery = state.map === "rows" && !state.norm && state.query >= im.patch_start
        && state.query < im.patch_start + patches.length;
      const scale = DATA.scales[state.norm ? "norm" : state.map];
      api.scale = scale;
      api.drawn = drawGrid(ctx, picture, im.grid, patches, lut, isPatchQuery ? state.query - im.patch_start : null, 0.6,
                           scale);
      legend(lut, api.drawn, scale);
      const prefix = document.getElementById("prefix");
      prefix.textContent = "";
      for (const p of im.prefix) {
        const b = el("button", { "data-token": String(p.token), class: p.token === state.query && state.map === "rows" ? "query" : "" },
                     p.label + ": " + fmt(all[p.token]));
        b.addEventListener("click", () => { state.query = p.token; draw(); });
        prefix.appendChild(b);
      }
      if (!im.prefix.length) prefix.appendChild(el("span", { class: "note" }, "none in this model"));
      const q = state.query, grid = im.grid;
      const where = q >= im.patch_start && q < im.patch_start + patches.length
        ? "patch row " + Math.floor((q - im.patch_start) / grid[1]) + ", col " + ((q - im.patch_start) % grid[1])
        : (im.prefix.find((p) => p.token === q) || { label: "token" }).label;
      let prefixSum = 0;
      for (const p of im.prefix) if (!Number.isNaN(all[p.token])) prefixSum += all[p.token];
      const what = state.norm ? "norms, block " + state.layer
        : state.map === "pool" ? "pool (the pooling head, after the last block), head " + state.head
        : state.map === "rollout" ? "rollout (all blocks)"
        : (state.map === "rows" ? "row of token " + q + " (" + where + ")" : state.map) + ", block " + state.layer + ", head " + state.head;
      const readout = document.getElementById("readout");
      readout.textContent = "";
      readout.append(el("p", { id: "what" }, what),
                     el("p", { id: "sums" }, state.norm ? "" : "on class tokens + registers " + fmt(prefixSum)));
      const order = Array.from(all.keys()).filter((t) => !Number.isNaN(all[t])).sort((a, b) => all[b] - all[a]).slice(0, 5);
      const top = document.getElementById("top");
      top.textContent = "";
      top.appendChild(el("tr")).append(el("th", {}, "token"), el("th", {}, "kind / position"), el("th", {}, "value"));
      for (const t of order) {
        const tr = top.appendChild(el("tr", { "data-token": String(t) }));
        const pos = t >= im.patch_start && t < im.patch_start + patches.length
          ? "patch " + Math.floor((t - im.patch_start) / grid[1]) + "," + ((t - im.patch_start) % grid[1])
          : (im.prefix.find((p) => p.token === t) || { label: "" }).label;
        tr.append(el("td", {}, String(t)), el("td", {}, pos), el("td", { class: "value" }, fmt(all[t])));
      }
    }
    canvas.addEventListener("click", (ev) => {
      const im = image();
      state.query = im.patch_start + cellAt(canvas, im.grid, ev);
      if (entry().rows && !state.norm) { state.map = "rows"; mapSel.value = "rows"; refreshLayer(); } else draw();
    });
    canvas.addEventListener("mousemove", (ev) => {
      const im = image(), cell = cellAt(canvas, im.grid, ev);
      const v = api.shown ? api.shown[im.patch_start + cell] : null;
      document.getElementById("hover").textContent = "patch row " + Math.floor(cell / im.grid[1]) + ", col "
        + (cell % im.grid[1]) + " (token " + (im.patch_start + cell) + "): " + fmt(v);
    });
    imgSel.addEventListener("change", () => { state.image = Number(imgSel.value); state.query = null; refreshImage(); });
    layerSel.addEventListener("change", () => { state.layer = layerSel.value; refreshLayer(); });
    headSel.addEventListener("change", () => { state.head = headSel.value; draw(); });
    mapSel.addEventListener("change", () => { state.map = mapSel.value; refreshLayer(); });
    normBox.addEventListener("change", () => { state.norm = normBox.checked; draw(); });
    refreshImage();
  }

  // ---------------------------------------------------------------- LVLM: generated words
  function lvlm() {
    const state = { row: 0, step: 0, layer: "mean" };
    const api = { state: state, shown: null };
    window.vsinkViewer = api;
    const controls = el("div", { id: "controls" });
    const [rowWrap, rowSel] = select("image-select", "image", DATA.rows.map((r, i) => [i, r.name]));
    const [layerWrap, layerSel] = select("layer-select", "layer", []);
    controls.append(rowWrap, layerWrap);
    app.appendChild(controls);
    app.appendChild(el("p", { class: "note" }, "Pick a generated word: its attention on the image tokens, per decoder layer (grey: pruned)."));
    const words = el("div", { id: "words" });
    app.appendChild(words);
    const canvas = el("canvas", { id: "canvas" });
    const left = el("div");
    left.append(canvas, el("div", { id: "legend" }), el("div", { id: "readout" }));
    app.appendChild(left);
    const picture = new Image();
    function row() { return DATA.rows[state.row]; }
    function refreshRow() {
      const r = row();
      layerSel.textContent = "";
      layerSel.appendChild(el("option", { value: "mean" }, "mean over layers"));
      for (const l of r.layers) layerSel.appendChild(el("option", { value: String(l) }, "layer " + l));
      layerSel.value = state.layer;
      if (layerSel.value !== state.layer) { state.layer = "mean"; layerSel.value = "mean"; }
      words.textContent = "";
      r.words.forEach((w, t) => {
        const isImage = w === r.image_token;
        const cls = (t === state.step ? "sel" : "") + (isImage ? " image-span" : "");
        const s = el("span", { "data-step": String(t), class: cls.trim(), title: isImage ? "the image placeholder token" : "" },
                     isImage ? "[image]" : (w.trim() || JSON.stringify(w)));
        s.addEventListener("click", () => { state.step = t; refreshRow(); });
        words.appendChild(s);
      });
      picture.onload = () => { fitCanvas(canvas, picture); draw(); };
      picture.src = r.image;
    }
    function draw() {
      const r = row(), arr = decode(r.attention), [steps, L, P] = arr.shape;
      const out = new Float32Array(P);
      const base = state.step * L * P;
      if (state.layer === "mean") {
        const count = new Float32Array(P);
        for (let l = 0; l < L; l++) for (let p = 0; p < P; p++) {
          const v = arr.data[base + l * P + p];
          if (!Number.isNaN(v)) { out[p] += v; count[p] += 1; }
        }
        for (let p = 0; p < P; p++) out[p] = count[p] ? out[p] / count[p] : NaN;
      } else {
        const l = r.layers.indexOf(Number(state.layer));
        for (let p = 0; p < P; p++) out[p] = arr.data[base + l * P + p];
      }
      api.shown = out;
      api.scale = DATA.scales.attention;
      api.drawn = drawGrid(canvas.getContext("2d"), picture, r.grid, out, DATA.colormaps.attention, null, 0.6, api.scale);
      legend(DATA.colormaps.attention, api.drawn, api.scale);
      let sum = 0;
      for (const v of out) if (!Number.isNaN(v)) sum += v;
      document.getElementById("readout").textContent = "word " + state.step + " " + JSON.stringify(r.words[state.step])
        + ", " + (state.layer === "mean" ? "mean over layers" : "layer " + state.layer) + ": attention on the image "
        + fmt(sum) + " (" + r.mitigation + ", " + r.protocol + ")";
    }
    rowSel.addEventListener("change", () => { state.row = Number(rowSel.value); state.step = 0; refreshRow(); });
    layerSel.addEventListener("change", () => { state.layer = layerSel.value; draw(); });
    refreshRow();
  }

  header();
  if (DATA.kind === "lvlm") lvlm(); else vision();
})();
