/* mim latent explorer: one hash-routed page, plain JavaScript, no dependencies.
 *
 *   #/              the latent table (sort, filter, search, pages)
 *   #/latent/<id>   a latent: top images with heat-maps, activation histogram, classes, nearest latents
 *   #/image/<index> an image: patch grid (click a patch: its active latents), the image's top latents
 *
 * Data files are scripts (data/<key>.js) that call MIM.put(key, data): a page opened from file:// may load
 * scripts but not fetch() files. Binary arrays are base64 of little-endian int8/16/32 or float16 (see
 * mim/explore/shards.py). Every view sets #view[data-view][data-state] ("loading", "ready", "error"), the
 * milliseconds it took (data-ms) and the time since the page started loading (data-at), for tests and timings.
 */
"use strict";

const MIM = (() => {
  // ------------------------------------------------------------------------------------------- data loading
  const loaded = {};   // key -> data
  const pending = {};  // key -> {promise, resolve, reject}

  function put(key, data) {
    loaded[key] = data;
    if (pending[key]) { pending[key].resolve(data); delete pending[key]; }
  }

  function load(key) {
    if (key in loaded) return Promise.resolve(loaded[key]);
    if (pending[key]) return pending[key].promise;
    const entry = {};
    entry.promise = new Promise((resolve, reject) => { entry.resolve = resolve; entry.reject = reject; });
    pending[key] = entry;
    const script = document.createElement("script");
    script.src = `data/${key}.js`;
    script.onerror = () => { delete pending[key]; script.remove(); entry.reject(new Error(`cannot load data/${key}.js`)); };
    document.head.appendChild(script);
    return entry.promise;
  }

  function bytes(b64) {
    const text = atob(b64);
    const out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return out;
  }

  function ints(b64, kind) {
    const buffer = bytes(b64).buffer;
    if (kind === "u8") return new Uint8Array(buffer);
    return kind === "i16" ? new Int16Array(buffer) : new Int32Array(buffer);
  }

  function half(h) {
    const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
    if (exponent === 0) return sign * fraction * 2 ** -24;
    if (exponent === 31) return fraction ? NaN : sign * Infinity;
    return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
  }

  function halves(b64) {
    const raw = new Uint16Array(bytes(b64).buffer);
    const out = new Float32Array(raw.length);
    for (let i = 0; i < raw.length; i++) out[i] = half(raw[i]);
    return out;
  }

  // --------------------------------------------------------------------------------------------- helpers
  let meta = null;
  const view = () => document.getElementById("view");

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  function fmt(value, digits = 3) {
    if (!Number.isFinite(value)) return String(value);
    if (value === 0) return "0";
    const a = Math.abs(value);
    return a >= 1e5 || a < 1e-3 ? value.toExponential(digits - 1) : Number(value.toPrecision(digits)).toString();
  }

  const percent = (f) => (f === 0 ? "0 %" : `${fmt(100 * f)} %`);
  const className = (c) => (c >= 0 && c < meta.classes.length ? meta.classes[c] : "-");
  const latentLink = (j) => el("a", {href: `#/latent/${j}`, "data-latent": j, text: `#${j}`});

  function imageRow(index) {  // position of a store image index in meta.indices (ascending), or -1
    const indices = meta.indices;
    let lo = 0, hi = indices.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (indices[mid] === index) return mid;
      if (indices[mid] < index) lo = mid + 1; else hi = mid - 1;
    }
    return -1;
  }

  function thumb(row, px) {  // a div showing image `row` from its sprite sheet at px x px
    const t = meta.thumbs, sheet = Math.floor(row / t.per_sheet), cell = row % t.per_sheet;
    const inSheet = Math.min(t.per_sheet, meta.indices.length - sheet * t.per_sheet);
    const rows = Math.ceil(inSheet / t.columns), col = cell % t.columns, line = Math.floor(cell / t.columns);
    const div = el("div", {class: "thumb", "data-row": row});
    div.style.width = div.style.height = `${px}px`;
    div.style.backgroundImage = `url("thumbs/sheet-${String(sheet).padStart(4, "0")}.${t.ext}")`;
    div.style.backgroundSize = `${t.columns * px}px ${rows * px}px`;
    div.style.backgroundPosition = `-${col * px}px -${line * px}px`;
    if (t.size < px / 2) div.style.imageRendering = "pixelated";
    else div.style.imageRendering = "auto";
    return div;
  }

  function drawHeat(canvas, map, scale) {  // map: Float32Array(h * w) of a_j(t); colour by value / scale
    const [h, w] = meta.grid;
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(w, h);
    for (let t = 0; t < h * w; t++) {
      const r = scale > 0 ? Math.max(0, Math.min(1, map[t] / scale)) : 0;
      image.data[4 * t] = 255;
      image.data[4 * t + 1] = Math.round(220 * r);
      image.data[4 * t + 2] = 0;
      image.data[4 * t + 3] = r > 0 ? Math.round(255 * (0.1 + 0.5 * r)) : 0;
    }
    ctx.putImageData(image, 0, 0);
  }

  function setting(name, value) {  // localStorage, when the browser allows it for this page
    try {
      if (value === undefined) return localStorage.getItem(name);
      localStorage.setItem(name, value);
    } catch (err) { /* storage off (private mode, some file:// settings): nothing is remembered */ }
    return null;
  }

  let rendering = 0;  // a newer navigation makes older renders stop

  async function render(name, build) {
    const token = ++rendering, started = performance.now(), main = view();
    main.dataset.view = name;
    main.dataset.state = "loading";
    try {
      const content = await build(() => token !== rendering);
      if (token !== rendering) return;
      main.replaceChildren(content);
      main.dataset.state = "ready";
    } catch (err) {
      if (token !== rendering) return;
      main.replaceChildren(el("p", {class: "error", text: String(err.message || err)}));
      main.dataset.state = "error";
    }
    main.dataset.ms = (performance.now() - started).toFixed(1);  // this view: data loading and drawing
    main.dataset.at = performance.now().toFixed(1);               // since the page's navigation started
    window.scrollTo(0, 0);
  }

  // ----------------------------------------------------------------------------------------- latent table
  const COLUMNS = [
    {key: "id", label: "latent", text: true},
    {key: "freq", label: "frequency"},
    {key: "mean", label: "mean act."},
    {key: "max", label: "max act."},
    {key: "images", label: "images"},
    {key: "top", label: "top class", text: true},
    {key: "sel", label: "selectivity"},
    {key: "flags", label: "flags", text: true},
  ];
  const table = {sort: "id", desc: false, page: 0, size: 100, query: "", fmin: "", fmax: "", cls: "", flag: "all"};

  function rowsOf(data) {  // the latent ids passing the filters, in the table's order
    const n = meta.d_sae, out = [];
    const fmin = table.fmin === "" ? -Infinity : Number(table.fmin) / 100;
    const fmax = table.fmax === "" ? Infinity : Number(table.fmax) / 100;
    const cls = table.cls === "" ? null : Number(table.cls), q = table.query.trim();
    for (let j = 0; j < n; j++) {
      const f = data.freq[j], flags = data.flags[j];
      if (f < fmin || f > fmax) continue;
      if (cls !== null && data.top[j] !== cls) continue;
      if (table.flag === "dead" && !(flags & 1)) continue;
      if (table.flag === "alive" && flags & 1) continue;
      if (table.flag === "dense" && !(flags & 2)) continue;
      if (q && !String(j).startsWith(q)) continue;
      out.push(j);
    }
    const key = table.sort, sign = table.desc ? -1 : 1;
    const value = key === "id" ? (j) => j : key === "top" ? (j) => className(data.top[j]) : (j) => data[key][j];
    out.sort((a, b) => {
      const va = value(a), vb = value(b);
      return va < vb ? -sign : va > vb ? sign : a - b;
    });
    if (q && /^\d+$/.test(q) && Number(q) < n) {  // an exact id first
      const at = out.indexOf(Number(q));
      if (at > 0) { out.splice(at, 1); out.unshift(Number(q)); }
    }
    return out;
  }

  function tableRow(data, j) {
    const flags = data.flags[j];
    const flagCell = el("td", {class: "text"},
      flags & 1 ? el("span", {class: "flag dead", text: "dead"}) : null,
      flags & 2 ? el("span", {class: "flag dense", text: "dense"}) : null);
    return el("tr", {"data-latent": j},
      el("td", {class: "text"}, latentLink(j)),
      el("td", {text: percent(data.freq[j])}),
      el("td", {text: fmt(data.mean[j])}),
      el("td", {text: fmt(data.max[j])}),
      el("td", {text: String(data.images[j])}),
      el("td", {class: "text", text: className(data.top[j])}),
      el("td", {text: fmt(data.sel[j])}),
      flagCell);
  }

  async function showTable() {
    await render("table", async () => {
      const data = await load("latents");
      const tbody = el("tbody");
      const info = el("span", {id: "page-info"});
      const heads = COLUMNS.map((c) => el("th", {"data-key": c.key, class: c.text ? "text" : "", text: c.label,
                                                 title: `sort by ${c.label}`}));
      const grid = el("table", {class: "latents", id: "latent-table"}, el("thead", {}, el("tr", {}, ...heads)), tbody);
      let rows = [];
      const refresh = (filtered) => {
        if (filtered) rows = rowsOf(data);
        const size = table.size > 0 ? table.size : rows.length || 1;
        const pages = Math.max(1, Math.ceil(rows.length / size));
        table.page = Math.min(table.page, pages - 1);
        const shown = rows.slice(table.page * size, (table.page + 1) * size);
        tbody.replaceChildren(...shown.map((j) => tableRow(data, j)));
        grid.dataset.total = rows.length;
        info.textContent = `${rows.length} of ${meta.d_sae} latents; page ${table.page + 1} of ${pages}`;
        for (const th of heads) {
          if (th.dataset.key === table.sort) th.setAttribute("aria-sort", table.desc ? "descending" : "ascending");
          else th.removeAttribute("aria-sort");
        }
      };
      for (const th of heads) {
        th.addEventListener("click", () => {
          const key = th.dataset.key;
          if (table.sort === key) table.desc = !table.desc;
          else { table.sort = key; table.desc = !(key === "id" || key === "top"); }
          table.page = 0;
          refresh(true);
        });
      }
      const input = (id, attrs, field) => {
        const node = el("input", {id, ...attrs});
        node.value = table[field];
        node.addEventListener("input", () => { table[field] = node.value; table.page = 0; refresh(true); });
        return node;
      };
      const select = (id, options, field) => {
        const node = el("select", {id}, ...options.map(([value, label]) => el("option", {value, text: label})));
        node.value = table[field];
        node.addEventListener("change", () => {
          table[field] = field === "size" ? Number(node.value) : node.value;
          table.page = 0;
          refresh(true);
        });
        return node;
      };
      const search = input("search", {type: "search", placeholder: "latent id", "aria-label": "search latent id"}, "query");
      search.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && /^\d+$/.test(search.value.trim()) && Number(search.value) < meta.d_sae) {
          location.hash = `#/latent/${Number(search.value)}`;
        }
      });
      const controls = el("div", {class: "controls"},
        el("label", {}, "id ", search),
        el("label", {}, "frequency % from ", input("freq-min", {type: "number", min: 0, max: 100, step: "any"}, "fmin"),
           " to ", input("freq-max", {type: "number", min: 0, max: 100, step: "any"}, "fmax")),
        el("label", {}, "top class ", select("class-filter",
          [["", "any"], ...meta.classes.map((name, c) => [String(c), name])], "cls")),
        el("label", {}, "flags ", select("flag-filter",
          [["all", "all"], ["alive", "not dead"], ["dead", "dead"], ["dense", "dense"]], "flag")),
        el("label", {}, "rows ", select("page-size",
          [["50", "50"], ["100", "100"], ["500", "500"], ["0", "all"]], "size")));
      const move = (step) => () => { table.page = Math.max(0, table.page + step); refresh(false); };
      const pager = el("div", {class: "pager"},
        el("button", {id: "prev-page", type: "button", onclick: move(-1), text: "previous"}),
        info,
        el("button", {id: "next-page", type: "button", onclick: move(1), text: "next"}));
      refresh(true);
      const dead = data.flags.filter((f) => f & 1).length, dense = data.flags.filter((f) => f & 2).length;
      const summary = el("p", {class: "muted", text: `${meta.d_sae} latents on ${meta.indices.length} images ` +
        `(${meta.grid[0]}x${meta.grid[1]} patches): ${dead} dead, ${dense} dense (frequency above ` +
        `${percent(meta.dense)}). Frequency: share of patch tokens where the latent is active; mean act.: mean ` +
        `over those tokens; selectivity: max / mean of the per-class mean activations (1 to ${meta.classes.length}).`});
      return el("div", {}, controls, summary, grid, pager);
    });
  }

  // ---------------------------------------------------------------------------------------------- latent
  function histogram(counts, vmax) {  // SVG bars, log-scale y: height ~ log10(1 + count)
    const W = 320, H = 150, left = 34, bottom = 18, top = 6, n = counts.length;
    const peak = Math.max(1, ...counts), scale = (c) => Math.log10(1 + c) / Math.log10(1 + peak);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("id", "histogram");
    svg.setAttribute("width", W); svg.setAttribute("height", H);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.dataset.bins = n;
    const add = (tag, attrs, text) => {
      const node = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      if (text !== undefined) node.textContent = text;
      svg.append(node);
      return node;
    };
    const plotH = H - bottom - top, plotW = W - left - 4, bw = plotW / n;
    for (let p = 1; p <= peak; p *= 10) {  // powers of ten
      const y = top + plotH * (1 - scale(p));
      add("line", {x1: left, x2: W - 4, y1: y, y2: y, stroke: "#e5e7eb"});
      add("text", {x: left - 4, y: y + 3, "text-anchor": "end"}, p >= 1000 ? `1e${Math.round(Math.log10(p))}` : String(p));
    }
    counts.forEach((c, b) => {
      const h = plotH * scale(c);
      const bar = add("rect", {x: left + b * bw + 0.5, y: top + plotH - h, width: Math.max(1, bw - 1), height: h,
                               fill: "#2563eb", "data-count": c});
      const title = document.createElementNS(ns, "title");
      title.textContent = `(${fmt(vmax * b / n)}, ${fmt(vmax * (b + 1) / n)}]: ${c} tokens`;
      bar.append(title);
    });
    add("line", {x1: left, x2: W - 4, y1: top + plotH, y2: top + plotH, stroke: "#9ca3af"});
    add("text", {x: left, y: H - 4}, "0");
    add("text", {x: W - 4, y: H - 4, "text-anchor": "end"}, `${fmt(vmax)} (activation)`);
    return svg;
  }

  function classBars(means, fired) {
    const peak = Math.max(...means.map(Math.abs), 1e-12);
    const order = means.map((m, c) => c).sort((a, b) => means[b] - means[a] || a - b);
    return el("ol", {id: "classes", class: "values"}, ...order.map((c) => el("li", {"data-class": c},
      el("span", {class: "bar", style: `width:${Math.round(120 * Math.max(0, means[c]) / peak)}px`}),
      `${className(c)}: ${fmt(means[c])} `, el("span", {class: "muted", text: `(${fired[c]} tokens)`}))));
  }

  async function showLatent(j) {
    await render("latent", async (stale) => {
      if (!(j >= 0 && j < meta.d_sae)) throw new Error(`There is no latent ${j} (0 to ${meta.d_sae - 1}).`);
      const per = meta.latents_per_shard;
      const [data, shard] = await Promise.all([load("latents"),
                                               load(`latent/${String(Math.floor(j / per)).padStart(5, "0")}`)]);
      if (stale()) return null;
      const rec = shard[j % per];
      const T = meta.tokens_per_image, offsets = rec.ho;
      const tokens = ints(rec.ht, meta.token_kind), values = halves(rec.hv);
      const scale = rec.scores.length ? rec.scores[0] : 0;
      const heatOn = setting("mim-heat") !== "off";
      const thumbs = el("div", {id: "top-images", class: heatOn ? "thumbs" : "thumbs hide-heat"});
      rec.images.forEach((index, i) => {
        const map = new Float32Array(T);
        for (let e = offsets[i]; e < offsets[i + 1]; e++) map[tokens[e]] = values[e];
        const box = thumb(imageRow(index), 96);
        const canvas = el("canvas", {class: "heat", "data-heat": Array.from(map).join(",")});
        drawHeat(canvas, map, scale);
        box.append(canvas);
        thumbs.append(el("a", {class: "thumb-link", href: `#/image/${index}`, "data-image": index,
                               title: `image ${index}, score ${fmt(rec.scores[i])}`},
          box, el("div", {}, `${className(rec.labels[i])} `, el("span", {class: "muted", text: fmt(rec.scores[i])}))));
      });
      const toggle = el("input", {id: "heat-toggle", type: "checkbox"});
      toggle.checked = heatOn;
      toggle.addEventListener("change", () => {
        thumbs.classList.toggle("hide-heat", !toggle.checked);
        setting("mim-heat", toggle.checked ? "on" : "off");
      });
      const flags = data.flags[j];
      const stats = el("p", {id: "latent-stats"},
        `frequency ${percent(data.freq[j])} · mean activation ${fmt(data.mean[j])} · max ${fmt(data.max[j])} · ` +
        `${data.images[j]} images · top class ${className(data.top[j])} · selectivity ${fmt(data.sel[j])}`,
        flags & 1 ? el("span", {class: "flag dead", text: " dead"}) : null,
        flags & 2 ? el("span", {class: "flag dense", text: " dense"}) : null);
      const near = el("ol", {id: "neighbours", class: "values"}, ...rec.nn.map((n, i) => el("li", {},
        latentLink(n), ` cosine ${fmt(rec.nc[i])} · `,
        el("span", {class: "muted", text: `${percent(data.freq[n])}, ${className(data.top[n])}`}))));
      const nav = el("div", {class: "nav"},
        j > 0 ? el("a", {href: `#/latent/${j - 1}`, id: "prev-latent", text: `← #${j - 1}`}) : null,
        el("a", {href: "#/", text: "all latents"}),
        j + 1 < meta.d_sae ? el("a", {href: `#/latent/${j + 1}`, id: "next-latent", text: `#${j + 1} →`}) : null);
      document.title = `latent ${j} · mim explorer`;
      return el("div", {"data-latent": j},
        nav, el("h1", {text: `Latent #${j}`}), stats,
        el("h2", {}, `Top ${rec.images.length} images `,
           el("label", {class: "muted"}, toggle, " heat-map (patch activation / top score)")),
        rec.images.length ? thumbs : el("p", {class: "muted", text: "Never positive on these images."}),
        el("div", {class: "columns"},
          el("section", {}, el("h2", {text: "Activations (log count)"}), histogram(rec.hist, data.max[j])),
          el("section", {}, el("h2", {text: "Mean activation per class"}), classBars(rec.cm, rec.cf)),
          el("section", {}, el("h2", {text: "Nearest latents (decoder cosine)"}), near)));
    });
  }

  // ----------------------------------------------------------------------------------------------- image
  async function showImage(index) {
    await render("image", async (stale) => {
      const row = imageRow(index);
      if (row < 0) throw new Error(`There is no image ${index} in this site.`);
      const per = meta.images_per_shard;
      const [data, shard] = await Promise.all([load("latents"),
                                               load(`image/${String(Math.floor(row / per)).padStart(5, "0")}`)]);
      if (stale()) return null;
      const rec = shard[row % per];
      const offsets = ints(rec.o, "i32"), latents = ints(rec.l, meta.latent_kind), values = halves(rec.v);
      const [h, w] = meta.grid, T = meta.tokens_per_image;
      // the image's top latents: score = max over its tokens
      const best = new Map(), count = new Map();
      for (let t = 0; t < T; t++) {
        for (let e = offsets[t]; e < offsets[t + 1]; e++) {
          const j = latents[e];
          if (!best.has(j) || values[e] > best.get(j)) best.set(j, values[e]);
          count.set(j, (count.get(j) || 0) + 1);
        }
      }
      const top = [...best.entries()].sort((a, b) => b[1] - a[1] || a[0] - b[0]).slice(0, 20);
      const box = thumb(row, 320);
      const heat = el("canvas", {class: "heat", id: "image-heat"});
      box.append(heat);
      const showLatentMap = (j) => {  // heat-map of latent j on this image (hover in the lists)
        const map = new Float32Array(T);
        for (let t = 0; t < T; t++) {
          for (let e = offsets[t]; e < offsets[t + 1]; e++) if (latents[e] === j) map[t] = values[e];
        }
        drawHeat(heat, map, best.get(j) || 0);
      };
      const clearMap = () => drawHeat(heat, new Float32Array(T), 0);
      clearMap();
      const item = (j, value, extra) => el("li", {"data-latent": j, "data-value": value,
                                                  onmouseenter: () => showLatentMap(j), onmouseleave: clearMap},
        latentLink(j), ` ${fmt(value)}`, extra ? el("span", {class: "muted", text: ` ${extra}`}) : null);
      const tokenList = el("ol", {id: "token-latents", class: "values"});
      const tokenTitle = el("h2", {id: "token-title", text: "Click a patch to list its active latents"});
      const patches = el("div", {class: "patches", id: "patches"});
      patches.style.gridTemplateColumns = `repeat(${w}, 1fr)`;
      patches.style.gridTemplateRows = `repeat(${h}, 1fr)`;
      const choose = (t) => {
        for (const b of patches.children) b.classList.toggle("selected", Number(b.dataset.token) === t);
        const entries = [];
        for (let e = offsets[t]; e < offsets[t + 1]; e++) entries.push([latents[e], values[e]]);
        entries.sort((a, b) => b[1] - a[1] || a[0] - b[0]);
        tokenTitle.textContent = `Patch ${t} (row ${Math.floor(t / w)}, column ${t % w}): ${entries.length} active latents`;
        tokenList.dataset.token = t;
        tokenList.replaceChildren(...entries.map(([j, v]) => item(j, v, `${percent(data.freq[j])}`)));
      };
      for (let t = 0; t < h * w; t++) {
        patches.append(el("button", {type: "button", "data-token": t, title: `patch ${t}`, onclick: () => choose(t)}));
      }
      box.append(patches);
      const label = meta.labels[row];
      const nav = el("div", {class: "nav"},
        row > 0 ? el("a", {href: `#/image/${meta.indices[row - 1]}`, id: "prev-image", text: "← previous image"}) : null,
        el("a", {href: "#/", text: "all latents"}),
        row + 1 < meta.indices.length ? el("a", {href: `#/image/${meta.indices[row + 1]}`, id: "next-image",
                                                 text: "next image →"}) : null);
      document.title = `image ${index} · mim explorer`;
      return el("div", {"data-image": index},
        nav, el("h1", {text: `Image ${index} · ${className(label)}`}),
        el("div", {class: "columns"},
          el("section", {}, el("div", {class: "image-box"}, box),
             el("p", {class: "muted", text: `${h}x${w} patches; hover a latent to see where it fires here.`})),
          el("section", {}, tokenTitle, tokenList),
          el("section", {}, el("h2", {text: "Top latents of the image (max over patches)"}),
             el("ol", {id: "image-top", class: "values"},
                ...top.map(([j, v]) => item(j, v, `on ${count.get(j)} patches`))))));
    });
  }

  // ---------------------------------------------------------------------------------------------- router
  function route() {
    const hash = location.hash || "#/";
    let m;
    if ((m = hash.match(/^#\/latent\/(\d+)$/))) return showLatent(Number(m[1]));
    if ((m = hash.match(/^#\/image\/(\d+)$/))) return showImage(Number(m[1]));
    document.title = "mim latent explorer";
    return showTable();
  }

  function start() {
    meta = loaded.meta;
    if (!meta) {
      view().textContent = "data/meta.js is missing: rebuild the site with mim-explore.";
      view().dataset.state = "error";
      return;
    }
    document.getElementById("site-title").textContent = meta.title;
    document.getElementById("jump").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = document.getElementById("jump-latent").value;
      if (value !== "") location.hash = `#/latent/${Number(value)}`;
    });
    window.addEventListener("hashchange", route);
    route();
  }

  return {put, load, start, ints, halves};
})();
