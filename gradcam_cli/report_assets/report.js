/* The Grad-CAM report page. Everything is built from the JSON in #report-data with
   createElement and textContent: file names and labels are user data and are only ever text.
   The view (filter, class, path text, sort, page) lives in the URL hash. */
(function () {
  "use strict";

  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const INFO = DATA.info;
  // summary.csv's number strings, read once; "nan", "inf" and empty ones become null
  const toNumber = (text) => {
    const value = text === "" ? NaN : Number(text);
    return Number.isFinite(value) ? value : null;
  };
  const NUMBERS = { prob: DATA.prob.map((column) => column.map(toNumber)),
    metric: DATA.metric.map((column) => column.map(toNumber)) };
  const N = DATA.index.length;
  const PAGE_SIZE = 100;
  // The fields of rowAt(p), the p-th image in index order (the columns: report.page_data).
  const INDEX = 0, PATH = 1, FOLDER = 2, LABELS = 3, PROBS = 4, FIGURES = 5, RIGHT = 6,
    RIGHT_K = 7, METRICS = 8;
  const DEFAULTS = { filter: "all", class: "", by: "any", q: "", sort: "index", page: "1",
    method: "all" };
  // The method of each figure (INFO.layers' order); a run with several shows a switch.
  const FIGURE_METHODS = INFO.methods || [];
  const METHODS = Array.from(new Set(FIGURE_METHODS.filter(Boolean)));
  const FILTERS = ["all", "correct", "wrong"];
  const BYS = { any: "true or predicted", true: "true (folder)", predicted: "predicted (top-1)" };
  const JUDGED = DATA.right.some((right) => right !== -1);
  const IS_TOP = DATA.top > 0;
  // What "top-k" means for this run's head: a multi-label model's shown classes are those
  // at or above its threshold; a binary model is judged on the class it predicts.
  const TOP_K = DATA.info.head === "sigmoid"
    ? "at or above " + DATA.info.threshold + " (or the most probable)" : "top-" + DATA.top;
  const SORTS = makeSorts();

  let state = readHash();
  let view = [];           // positions (0..N-1) in the current filter and sort
  let viewKey = null;
  const sortedCache = {};
  let viewer = null;       // { pos, layer } while the viewer is open
  const nodes = {};

  // ------------------------------------------------------------------ helpers

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function rowAt(p) {
    return [DATA.index[p], DATA.path[p], DATA.folder[p], DATA.panel.map((column) => column[p]),
      NUMBERS.prob.map((column) => column[p]), DATA.figures[p].split(";").filter(Boolean),
      DATA.right[p], DATA.right_k[p], NUMBERS.metric.map((column) => column[p])];
  }

  function nameKey(text) {
    return text.split(",").map((part) => part.replace(/_/g, " ").trim().split(/\s+/)
      .filter(Boolean).join(" ")).join(", ").toLowerCase();
  }

  function firstName(label) {
    return label.split(",")[0].trim();
  }

  function percent(p) {
    if (p === null || p === undefined) return "?";
    const v = p * 100;
    if (v >= 0.1) return v.toFixed(1) + "%";
    if (v >= 1e-4) return String(Number(v.toPrecision(1))) + "%";
    return v.toExponential(1).replace(/e([+-])(\d)$/, "e$10$2") + "%";
  }

  function ratio(value) {
    return value === null || value === undefined ? "\u2014" : (100 * value).toFixed(1) + "%";
  }

  function figureUrl(name) {
    return name.split("/").map(encodeURIComponent).join("/");
  }

  function layerCaption(i) {
    const layer = INFO.layers[i];
    return layer ? layer[0] + (layer[1] && layer[1] !== layer[0] ? " (" + layer[1] + ")" : "")
      : "figure " + (i + 1);
  }

  // ------------------------------------------------------------------ state in the URL hash

  function makeSorts() {
    const index = DATA.index;
    const sorts = { index: { label: "index", key: (p) => index[p], desc: false },
      "index-desc": { label: "index, last first", key: (p) => index[p], desc: true } };
    const prob = IS_TOP ? "top-1 probability" : (DATA.ranks[0] || "first panel") + " probability";
    sorts["prob-asc"] = { label: prob + ", lowest first", key: (p) => NUMBERS.prob[0][p], desc: false };
    sorts["prob-desc"] = { label: prob + ", highest first", key: (p) => NUMBERS.prob[0][p], desc: true };
    DATA.metrics.forEach((column, k) => {
      sorts[column + "-asc"] = { label: column + ", lowest first", key: (p) => NUMBERS.metric[k][p], desc: false };
      sorts[column + "-desc"] = { label: column + ", highest first", key: (p) => NUMBERS.metric[k][p], desc: true };
    });
    return sorts;
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    const read = {};
    for (const key of Object.keys(DEFAULTS)) {
      const value = params.get(key);
      read[key] = value === null ? DEFAULTS[key] : value;
    }
    if (!FILTERS.includes(read.filter)) read.filter = DEFAULTS.filter;
    if (!Object.prototype.hasOwnProperty.call(BYS, read.by)) read.by = DEFAULTS.by;
    if (!Object.prototype.hasOwnProperty.call(SORTS, read.sort)) read.sort = DEFAULTS.sort;
    if (!METHODS.includes(read.method)) read.method = DEFAULTS.method;
    const page = parseInt(read.page, 10);
    read.page = String(Number.isFinite(page) && page > 0 ? page : 1);
    return read;
  }

  function writeHash(push) {
    const params = new URLSearchParams();
    for (const key of Object.keys(DEFAULTS)) {
      if (state[key] !== DEFAULTS[key]) params.set(key, state[key]);
    }
    const hash = params.toString();
    const url = location.href.split("#")[0] + (hash ? "#" + hash : "");
    if (url === location.href) return;
    try {
      if (push) history.pushState(null, "", url);
      else history.replaceState(null, "", url);
    } catch (error) {  // some browsers refuse history changes on file:// pages
      location.hash = hash;
    }
  }

  function update(changes, push) {
    Object.assign(state, changes);
    if (!("page" in changes)) state.page = "1";
    writeHash(push);
    syncControls();
    render();
  }

  // ------------------------------------------------------------------ the current list

  function sortedPositions(sortName) {
    if (!sortedCache[sortName]) {
      const sort = SORTS[sortName];
      const positions = DATA.index.map((value, p) => p);
      const keys = positions.map(sort.key);
      const index = DATA.index;
      positions.sort((a, b) => {
        const ka = keys[a], kb = keys[b];
        const missingA = ka === null || ka === undefined, missingB = kb === null || kb === undefined;
        if (missingA !== missingB) return missingA ? 1 : -1;  // missing values last, either way
        if (!missingA && ka !== kb) return sort.desc ? kb - ka : ka - kb;
        return index[a] - index[b];
      });
      sortedCache[sortName] = positions;
    }
    return sortedCache[sortName];
  }

  let labelNames = null;
  let lowerPaths = null;

  function classIds(text) {
    const key = nameKey(text);
    if (!key) return null;
    if (!labelNames) {
      labelNames = DATA.labels.map((label) =>
        new Set([nameKey(label)].concat(label.split(",").map(nameKey))));
    }
    const ids = new Set();
    labelNames.forEach((names, id) => { if (names.has(key)) ids.add(id); });
    return ids;
  }

  function computeView() {
    const key = [state.filter, state.class, state.by, state.q, state.sort].join("\u0000");
    if (key === viewKey) return;
    const ids = classIds(state.class);
    const query = state.q.trim().toLowerCase();
    if (query && !lowerPaths) lowerPaths = DATA.path.map((path) => path.toLowerCase());
    const want = state.filter === "correct" ? 1 : state.filter === "wrong" ? 0 : null;
    const byTrue = state.by !== "predicted", byPredicted = state.by !== "true" && IS_TOP;
    view = sortedPositions(state.sort).filter((i) => {
      if (want !== null && DATA.right[i] !== want) return false;
      if (ids && !((byTrue && ids.has(DATA.folder[i])) ||
                   (byPredicted && ids.has(DATA.panel[0][i])))) return false;
      return !query || lowerPaths[i].includes(query);
    });
    viewKey = key;
  }

  // ------------------------------------------------------------------ page parts

  function buildHeader() {
    const header = el("header");
    header.appendChild(el("h1", null, "Grad-CAM report"));
    if (INFO.stopped) {
      header.appendChild(el("p", "notice", "The run ended early (" + INFO.stopped + ") with " + N +
        " of " + INFO.n_images + " images done. Rerun the same command with --skip_existing " +
        "to finish it."));
    } else if (!INFO.finished) {
      header.appendChild(el("p", "notice", "The run is still going: " + N + " of " +
        INFO.n_images + " images so far. Reload the page to see more."));
    }
    const list = el("dl", "settings");
    const add = (name, value) => {
      list.appendChild(el("dt", null, name));
      const dd = el("dd");
      if (value instanceof Node) dd.appendChild(value); else dd.textContent = value;
      list.appendChild(dd);
      return dd;
    };
    add("model", INFO.model);
    add("layers", INFO.layers.map((layer, i) => layerCaption(i)).join("; "));
    add("method", INFO.method);
    add("images", N === INFO.n_images ? String(N) : N + " explained of " + INFO.n_images);
    add("skipped", skippedList());
    let accuracy;
    if (INFO.accuracy) {
      accuracy = DATA.info.head === "binary"
        ? ratio(INFO.accuracy[0]) + " (the class predicted at " + DATA.info.threshold +
          "; folder names as labels)"
        : "top-1 " + ratio(INFO.accuracy[0]) + ", " + TOP_K + " " +
          ratio(INFO.accuracy[1]) + " (folder names as labels)";
    } else {
      accuracy = IS_TOP ? "\u2014 (not every folder name is a label)" : "\u2014 (run with --classes)";
    }
    add("accuracy", accuracy).id = "accuracy";
    if (INFO.metrics) add("metrics", "faithfulness of each map (sort by it below)");
    for (const name of Object.keys(INFO.settings)) add(name, INFO.settings[name]);
    header.appendChild(list);
    if (INFO.means_rows && INFO.means_rows.length) {
      header.appendChild(tableSection("means", "Faithfulness: each method beside the baselines",
        INFO.means_note, INFO.means_header, INFO.means_rows));
    }
    if (INFO.sanity) {
      header.appendChild(tableSection("sanity", "Sanity check: do the maps depend on the weights?",
        INFO.sanity, INFO.sanity_header, INFO.sanity_rows));
    }
    return header;
  }

  // A folded section with a sentence and a table of text cells (the run's own numbers).
  function tableSection(id, title, note, columns, rows) {
    const section = el("details", "summary-table");
    section.id = id;
    section.open = true;
    section.appendChild(el("summary", null, title));
    if (note) section.appendChild(el("p", "note", note));
    const table = el("table");
    const head = el("tr");
    for (const column of columns) head.appendChild(el("th", null, column));
    const thead = el("thead");
    thead.appendChild(head);
    table.appendChild(thead);
    const body = el("tbody");
    for (const row of rows) {
      const tr = el("tr");
      row.forEach((cell, c) => tr.appendChild(el("td", c > 0 && !isNaN(Number(cell)) ? "num" : null,
                                                  String(cell))));
      body.appendChild(tr);
    }
    table.appendChild(body);
    section.appendChild(table);
    return section;
  }

  function skippedList() {
    const skipped = INFO.skipped;
    if (!skipped.length) return "none";
    const details = el("details");
    details.id = "skipped";
    details.appendChild(el("summary", null, skipped.length + " file(s) not processed"));
    const list = el("ul");
    for (const item of skipped) {
      const li = el("li");
      li.appendChild(el("span", "path", item[0]));
      li.appendChild(document.createTextNode(": " + item[1]));
      list.appendChild(li);
    }
    details.appendChild(list);
    return details;
  }

  function buildClassTable() {
    const section = el("details", "classes");
    section.id = "classes";
    section.open = DATA.classes.length <= 30;
    section.appendChild(el("summary", null, "Per class (" + DATA.classes.length +
      " folder classes; click a class to list its images, a heading to sort)"));
    const table = el("table");
    const columns = ["class", "images", "top-1 accuracy", TOP_K + " accuracy",
      "most frequent wrong top-1"];
    const head = el("tr");
    const body = el("tbody");
    let order = { column: 0, desc: false };
    const keyOf = (row, c) => c === 4 ? (row[5] || 0) : c === 0 ? nameKey(row[0]) : row[c];
    const fill = () => {
      const sorted = DATA.classes.slice().sort((a, b) => {
        const ka = keyOf(a, order.column), kb = keyOf(b, order.column);
        if (ka === kb) return 0;
        if (ka === null) return 1;
        if (kb === null) return -1;
        return (ka < kb ? -1 : 1) * (order.desc ? -1 : 1);
      });
      body.replaceChildren();
      for (const row of sorted) {
        const tr = el("tr");
        const nameCell = el("td");
        const button = el("button", "linklike", row[0]);
        button.type = "button";
        button.dataset.class = row[0];
        button.addEventListener("click", () => {
          update({ class: row[0], by: "true", filter: "all" }, true);
          nodes.list.scrollIntoView();
        });
        nameCell.appendChild(button);
        tr.appendChild(nameCell);
        tr.appendChild(el("td", "num", row[1]));
        tr.appendChild(el("td", "num", ratio(row[2])));
        tr.appendChild(el("td", "num", ratio(row[3])));
        const wrongLabel = row[4] === null ? "\u2014" : firstName(row[4]) + " (" + row[5] + ")";
        const wrongCell = el("td", null, wrongLabel);
        if (row[4] !== null) wrongCell.title = row[4];
        tr.appendChild(wrongCell);
        body.appendChild(tr);
      }
    };
    columns.forEach((name, c) => {
      const th = el("th");
      const button = el("button", "linklike", name);
      button.type = "button";
      button.addEventListener("click", () => {
        // first click: names A-Z, most images first, worst accuracy first, most confusions first
        order = { column: c, desc: order.column === c ? !order.desc : c === 1 || c === 4 };
        fill();
      });
      th.appendChild(button);
      head.appendChild(th);
    });
    const thead = el("thead");
    thead.appendChild(head);
    table.appendChild(thead);
    table.appendChild(body);
    fill();
    section.appendChild(table);
    return section;
  }

  function buildControls() {
    const bar = el("div", "controls");
    const group = el("span", "group");
    group.appendChild(el("span", "caption", "show"));
    nodes.filters = {};
    for (const name of FILTERS) {
      const button = el("button", "toggle", name);
      button.type = "button";
      button.id = "filter-" + name;
      if (name !== "all" && !JUDGED) {
        button.disabled = true;
        button.title = "the folder names are not labels, so right and wrong are unknown";
      }
      button.addEventListener("click", () => update({ filter: name }, true));
      nodes.filters[name] = button;
      group.appendChild(button);
    }
    bar.appendChild(group);

    const classLabel = el("label", "group", "class ");
    nodes.classInput = el("input");
    nodes.classInput.id = "class";
    nodes.classInput.type = "search";
    nodes.classInput.placeholder = "type a class name";
    nodes.classInput.setAttribute("list", "class-names");
    nodes.classInput.addEventListener("input", () => update({ class: nodes.classInput.value }, false));
    classLabel.appendChild(nodes.classInput);
    const datalist = el("datalist");
    datalist.id = "class-names";
    const suggestions = new Set(DATA.classes.map((row) => row[0]));
    if (IS_TOP) for (const id of new Set(DATA.panel[0])) suggestions.add(DATA.labels[id]);
    for (const name of Array.from(suggestions).sort()) {
      const option = el("option");
      option.value = name;
      datalist.appendChild(option);
    }
    classLabel.appendChild(datalist);
    nodes.by = el("select");
    nodes.by.id = "by";
    for (const key of Object.keys(BYS)) {
      if (key === "predicted" && !IS_TOP) continue;
      const option = el("option", null, BYS[key]);
      option.value = key;
      nodes.by.appendChild(option);
    }
    nodes.by.addEventListener("change", () => update({ by: nodes.by.value }, true));
    classLabel.appendChild(nodes.by);
    bar.appendChild(classLabel);

    const pathLabel = el("label", "group", "path ");
    nodes.q = el("input");
    nodes.q.id = "q";
    nodes.q.type = "search";
    nodes.q.placeholder = "text in the path";
    nodes.q.addEventListener("input", () => update({ q: nodes.q.value }, false));
    pathLabel.appendChild(nodes.q);
    bar.appendChild(pathLabel);

    const sortLabel = el("label", "group", "sort ");
    nodes.sort = el("select");
    nodes.sort.id = "sort";
    for (const key of Object.keys(SORTS)) {
      const option = el("option", null, SORTS[key].label);
      option.value = key;
      nodes.sort.appendChild(option);
    }
    nodes.sort.addEventListener("change", () => update({ sort: nodes.sort.value }, true));
    sortLabel.appendChild(nodes.sort);
    bar.appendChild(sortLabel);

    if (METHODS.length > 1) {  // show every method's figures side by side, or one method's
      const methodLabel = el("label", "group", "method ");
      nodes.method = el("select");
      nodes.method.id = "method";
      for (const name of ["all"].concat(METHODS)) {
        const option = el("option", null, name === "all" ? "all, side by side" : name);
        option.value = name;
        nodes.method.appendChild(option);
      }
      nodes.method.addEventListener("change", () => update({ method: nodes.method.value }, true));
      methodLabel.appendChild(nodes.method);
      bar.appendChild(methodLabel);
    }

    const reset = el("button", null, "reset");
    reset.type = "button";
    reset.id = "reset";
    reset.addEventListener("click", () => update(Object.assign({}, DEFAULTS), true));
    bar.appendChild(reset);
    return bar;
  }

  function buildPager(id) {
    const pager = el("nav", "pager");
    pager.id = id;
    const make = (text, title, delta) => {
      const button = el("button", null, text);
      button.type = "button";
      button.title = title;
      button.dataset.delta = delta;
      button.addEventListener("click", () => {
        const pages = Math.max(1, Math.ceil(view.length / PAGE_SIZE));
        const target = delta === "first" ? 1 : delta === "last" ? pages
          : Math.min(pages, Math.max(1, Number(state.page) + Number(delta)));
        update({ page: String(target) }, true);
        if (id === "pager-bottom") nodes.status.scrollIntoView();
      });
      pager.appendChild(button);
    };
    make("\u00ab", "first page", "first");
    make("\u2039 previous", "previous page", "-1");
    pager.appendChild(el("span", "where"));
    make("next \u203a", "next page", "1");
    make("\u00bb", "last page", "last");
    return pager;
  }

  function entryElement(row, pos) {
    const entry = el("article", "entry");
    entry.dataset.index = String(row[INDEX]);
    entry.dataset.pos = String(pos);
    if (row[RIGHT] === 0) entry.classList.add("wrong");
    if (row[RIGHT] === 1) entry.classList.add("right");
    const figures = el("div", "figures");
    row[FIGURES].forEach((name, layer) => {
      if (state.method !== "all" && FIGURE_METHODS[layer] !== state.method) return;
      const figure = el("figure");
      const link = el("a", "thumb");
      link.href = figureUrl(name);
      link.dataset.layer = String(layer);
      const image = el("img");
      image.loading = "lazy";
      image.decoding = "async";
      image.alt = "figure for " + row[PATH] + (row[FIGURES].length > 1 ? ", " + layerCaption(layer) : "");
      if (DATA.figure_size) {
        image.width = DATA.figure_size[0];
        image.height = DATA.figure_size[1];
      }
      image.src = link.href;
      link.appendChild(image);
      figure.appendChild(link);
      if (row[FIGURES].length > 1) figure.appendChild(el("figcaption", null, layerCaption(layer)));
      figures.appendChild(figure);
    });
    entry.appendChild(figures);

    const about = el("div", "about");
    const title = el("div", "title");
    title.appendChild(el("span", "index", "#" + row[INDEX]));
    title.appendChild(el("span", "path", row[PATH]));
    about.appendChild(title);
    const folder = row[FOLDER] === -1 ? null : DATA.labels[row[FOLDER]];
    const truth = el("div", "folder");
    truth.appendChild(el("span", "caption", "folder "));
    truth.appendChild(el("span", "label", folder === null ? "\u2014" : folder));
    about.appendChild(truth);
    if (IS_TOP && row[LABELS].length) {
      const top1 = el("div", "top1");
      if (row[RIGHT] === 0) {
        top1.appendChild(el("span", "mark bad", "\u2717 wrong"));
      } else if (row[RIGHT] === 1) {
        top1.appendChild(el("span", "mark good", "\u2713 right"));
      }
      top1.appendChild(el("span", "caption", " top-1 "));
      const label = el("span", "label", DATA.labels[row[LABELS][0]]);
      top1.appendChild(label);
      top1.appendChild(el("span", "prob", " " + percent(row[PROBS][0])));
      if (row[RIGHT] === 0 && row[RIGHT_K] === 1) {
        top1.appendChild(el("span", "note", " (folder class " + (DATA.info.head === "sigmoid"
          ? TOP_K : "in " + TOP_K) + ")"));
      }
      about.appendChild(top1);
    }
    const panels = el("ol", "panels");
    DATA.ranks.forEach((rank, k) => {
      if (IS_TOP && k === 0) return;  // shown above as the top-1 (or predicted) class
      const item = el("li");
      item.appendChild(el("span", "caption", rank + " "));
      item.appendChild(el("span", "label", DATA.labels[row[LABELS][k]]));
      item.appendChild(el("span", "prob", " " + percent(row[PROBS][k])));
      panels.appendChild(item);
    });
    about.appendChild(panels);
    if (DATA.metrics.length) {
      const metrics = el("dl", "metrics");
      DATA.metrics.forEach((column, k) => {
        metrics.appendChild(el("dt", null, column));
        const value = row[METRICS][k];
        metrics.appendChild(el("dd", null, value === null ? "\u2014" : value.toPrecision(4)));
      });
      about.appendChild(metrics);
    }
    entry.appendChild(about);
    return entry;
  }

  function buildViewer() {
    const box = el("div", "viewer");
    box.id = "viewer";
    box.hidden = true;
    box.setAttribute("role", "dialog");
    box.setAttribute("aria-modal", "true");
    const bar = el("div", "bar");
    nodes.viewerCaption = el("span", "caption");
    nodes.viewerCaption.id = "viewer-caption";
    nodes.viewerCount = el("span", "where");
    nodes.viewerCount.id = "viewer-count";
    bar.appendChild(nodes.viewerCount);
    bar.appendChild(nodes.viewerCaption);
    const button = (text, id, title, action) => {
      const b = el("button", null, text);
      b.type = "button";
      b.id = id;
      b.title = title;
      b.addEventListener("click", (event) => { event.stopPropagation(); action(); });
      bar.appendChild(b);
      return b;
    };
    button("\u2190", "viewer-prev", "previous image (Left arrow)", () => step(-1));
    button("\u2192", "viewer-next", "next image (Right arrow)", () => step(1));
    nodes.viewerOpen = el("a", null, "open file");
    nodes.viewerOpen.target = "_blank";
    nodes.viewerOpen.rel = "noopener";
    bar.appendChild(nodes.viewerOpen);
    button("\u2715", "viewer-close", "close (Esc)", closeViewer);
    box.appendChild(bar);
    nodes.viewerImage = el("img");
    nodes.viewerImage.id = "viewer-img";
    nodes.viewerImage.alt = "";
    box.appendChild(nodes.viewerImage);
    box.addEventListener("click", (event) => { if (event.target === box) closeViewer(); });
    return box;
  }

  // ------------------------------------------------------------------ the viewer

  function openViewer(pos, layer) {
    viewer = { pos: pos, layer: layer };
    showInViewer();
    nodes.viewer.hidden = false;
    document.body.classList.add("viewing");
  }

  function showInViewer() {
    const row = rowAt(view[viewer.pos]);
    const figures = row[FIGURES];
    const layer = Math.min(viewer.layer, figures.length - 1);
    const url = figureUrl(figures[layer]);
    nodes.viewerImage.src = url;
    nodes.viewerImage.alt = "figure for " + row[PATH];
    nodes.viewerOpen.href = url;
    nodes.viewer.dataset.viewing = String(row[INDEX]);
    nodes.viewerCount.textContent = (viewer.pos + 1) + " / " + view.length;
    let caption = "#" + row[INDEX] + " " + row[PATH];
    if (figures.length > 1) caption += " \u2014 " + layerCaption(layer);
    if (IS_TOP && row[LABELS].length) {
      caption += " \u2014 top-1 " + firstName(DATA.labels[row[LABELS][0]]) + " " + percent(row[PROBS][0]);
    }
    if (row[RIGHT] === 0) caption += " \u2014 \u2717 folder: " + DATA.labels[row[FOLDER]];
    nodes.viewerCaption.textContent = caption;
    const page = String(Math.floor(viewer.pos / PAGE_SIZE) + 1);
    if (page !== state.page) {  // the list behind follows, so closing lands on this image
      state.page = page;
      writeHash(false);
      renderList();
    }
  }

  function step(delta) {
    if (!viewer) return;
    const pos = Math.min(view.length - 1, Math.max(0, viewer.pos + delta));
    if (pos === viewer.pos) return;
    viewer.pos = pos;
    showInViewer();
  }

  function closeViewer() {
    if (!viewer) return;
    const index = nodes.viewer.dataset.viewing;
    viewer = null;
    nodes.viewer.hidden = true;
    nodes.viewerImage.removeAttribute("src");
    document.body.classList.remove("viewing");
    const entry = nodes.list.querySelector('[data-index="' + CSS.escape(index) + '"]');
    if (entry) {
      entry.scrollIntoView({ block: "nearest" });
      const link = entry.querySelector("a.thumb");
      if (link) link.focus({ preventScroll: true });
    }
  }

  function onKey(event) {
    if (!viewer) return;
    const keys = { ArrowLeft: () => step(-1), ArrowRight: () => step(1), Escape: closeViewer,
      ArrowUp: () => changeLayer(-1), ArrowDown: () => changeLayer(1) };
    if (keys[event.key]) {
      event.preventDefault();
      keys[event.key]();
    }
  }

  function changeLayer(delta) {
    const count = rowAt(view[viewer.pos])[FIGURES].length;
    const layer = Math.min(count - 1, Math.max(0, viewer.layer + delta));
    if (layer !== viewer.layer) {
      viewer.layer = layer;
      showInViewer();
    }
  }

  // ------------------------------------------------------------------ rendering

  function syncControls() {
    for (const name of FILTERS) nodes.filters[name].setAttribute("aria-pressed", String(state.filter === name));
    if (nodes.classInput.value !== state.class) nodes.classInput.value = state.class;
    if (nodes.q.value !== state.q) nodes.q.value = state.q;
    nodes.by.value = nodes.by.querySelector('option[value="' + state.by + '"]') ? state.by : "any";
    nodes.sort.value = state.sort;
    if (nodes.method) nodes.method.value = state.method;
  }

  function renderList() {
    const pages = Math.max(1, Math.ceil(view.length / PAGE_SIZE));
    const page = Math.min(pages, Math.max(1, Number(state.page)));
    state.page = String(page);
    const start = (page - 1) * PAGE_SIZE;
    const end = Math.min(view.length, start + PAGE_SIZE);
    const fragment = document.createDocumentFragment();
    for (let pos = start; pos < end; pos++) fragment.appendChild(entryElement(rowAt(view[pos]), pos));
    nodes.list.replaceChildren(fragment);
    if (!view.length) nodes.list.appendChild(el("p", "empty", "No image matches this view."));
    for (const pager of [nodes.pagerTop, nodes.pagerBottom]) {
      pager.querySelector(".where").textContent = view.length
        ? "page " + page + " of " + pages + " (" + (start + 1) + "\u2013" + end + ")" : "";
      for (const button of pager.querySelectorAll("button")) {
        const back = button.dataset.delta === "first" || button.dataset.delta === "-1";
        button.disabled = back ? page <= 1 : page >= pages;
      }
    }
  }

  function render() {
    computeView();
    const parts = [];
    if (state.filter !== "all") parts.push(state.filter);
    if (state.class.trim()) parts.push("class \u201c" + state.class.trim() + "\u201d (" + BYS[state.by] + ")");
    if (state.q.trim()) parts.push("path contains \u201c" + state.q.trim() + "\u201d");
    nodes.count.textContent = view.length + " of " + N + " images" +
      (parts.length ? ": " + parts.join(", ") : "") + ", sorted by " + SORTS[state.sort].label;
    renderList();
    if (viewer) closeViewer();
  }

  function build() {
    document.body.appendChild(buildHeader());
    if (DATA.classes.length) document.body.appendChild(buildClassTable());
    const main = el("main");
    main.appendChild(buildControls());
    nodes.status = el("div", "status");
    nodes.count = el("span", "count");
    nodes.count.id = "count";
    nodes.count.setAttribute("aria-live", "polite");
    nodes.status.appendChild(nodes.count);
    nodes.pagerTop = buildPager("pager");
    nodes.status.appendChild(nodes.pagerTop);
    main.appendChild(nodes.status);
    nodes.list = el("div", "entries");
    nodes.list.id = "entries";
    nodes.list.addEventListener("click", (event) => {
      const link = event.target.closest("a.thumb");
      if (!link || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey) return;
      event.preventDefault();
      const entry = link.closest(".entry");
      openViewer(Number(entry.dataset.pos), Number(link.dataset.layer));
    });
    main.appendChild(nodes.list);
    nodes.pagerBottom = buildPager("pager-bottom");
    main.appendChild(nodes.pagerBottom);
    document.body.appendChild(main);
    nodes.viewer = buildViewer();
    document.body.appendChild(nodes.viewer);
    document.addEventListener("keydown", onKey);
    window.addEventListener("hashchange", () => {
      state = readHash();
      syncControls();
      render();
    });
    syncControls();
    render();
    writeHash(false);
  }

  build();
})();
