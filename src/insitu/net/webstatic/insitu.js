// insitu's shared page helpers: DOM building, JSON calls with the CSRF header, live updates
// (Server-Sent Events), time formatting and small inline-SVG charts.  No framework, no CDN.
"use strict";

const insitu = (() => {
  let csrf = null;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function replace(id, node) {
    const old = document.getElementById(id);
    node.id = id;
    old.replaceWith(node);
    return node;
  }

  async function api(path, opts) {
    opts = opts || {};
    const headers = {"Accept": "application/json"};
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    if ((opts.method || "GET") !== "GET") headers["X-Insitu-CSRF"] = csrf || "";
    const res = await fetch(path, {method: opts.method || "GET", headers, credentials: "same-origin",
                                   body: opts.body === undefined ? undefined : JSON.stringify(opts.body)});
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
    return data;
  }

  async function session() {
    const s = await api("/api/session");
    csrf = s.csrf;
    return s;
  }

  // Live state from a Server-Sent Events stream; calls onState(state) and onLink(connected).
  function live(url, onState, onLink) {
    let src = null;
    function open() {
      if (src) src.close();
      src = new EventSource(url(), {withCredentials: true});
      src.addEventListener("state", (ev) => onState(JSON.parse(ev.data)));
      src.onopen = () => onLink(true);
      src.onerror = () => onLink(false);  // the browser reconnects on its own
    }
    open();
    return {reopen: open, close: () => src && src.close()};
  }

  function ago(t, now) {
    if (!t) return "";
    const d = Math.max(0, (now || Date.now() / 1000) - t);
    if (d < 120) return `${d.toFixed(0)} s ago`;
    if (d < 7200) return `${(d / 60).toFixed(0)} min ago`;
    return `${(d / 3600).toFixed(1)} h ago`;
  }

  function duration(s) {
    if (s === null || s === undefined) return "–";
    if (s < 120) return `${s.toFixed(1)} s`;
    if (s < 7200) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function expiry(t, now) {
    if (!t) return "";
    const days = (t - (now || Date.now() / 1000)) / 86400;
    const date = new Date(t * 1000).toISOString().slice(0, 10);
    return days < 0 ? `${date} (expired)` : `${date} (${days.toFixed(0)} d)`;
  }

  function fmt(v, digits) {
    return (typeof v === "number" && isFinite(v)) ? v.toFixed(digits === undefined ? 3 : digits) : "";
  }

  // ---- inline SVG charts -------------------------------------------------------------------
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

  function svg(tag, attrs, ...children) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
    for (const c of children.flat()) if (c) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  const W = 520, H = 220, PAD = {l: 44, r: 110, t: 12, b: 30};

  function axes(xmin, xmax, ymin, ymax, xlabel, ylabel, yticks) {
    const sx = (x) => PAD.l + (xmax === xmin ? 0.5 : (x - xmin) / (xmax - xmin)) * (W - PAD.l - PAD.r);
    const sy = (y) => H - PAD.b - (ymax === ymin ? 0.5 : (y - ymin) / (ymax - ymin)) * (H - PAD.t - PAD.b);
    const g = svg("g", {class: "axes"});
    g.append(svg("line", {x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b}));
    g.append(svg("line", {x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b}));
    for (const t of yticks) {
      g.append(svg("line", {class: "grid", x1: PAD.l, y1: sy(t), x2: W - PAD.r, y2: sy(t)}));
      g.append(svg("text", {x: PAD.l - 6, y: sy(t) + 4, "text-anchor": "end"}, String(t)));
    }
    const step = Math.max(1, Math.ceil((xmax - xmin + 1) / 10));
    for (let x = Math.ceil(xmin); x <= xmax; x += step) g.append(svg("text", {x: sx(x), y: H - PAD.b + 16, "text-anchor": "middle"}, String(x)));
    g.append(svg("text", {x: (PAD.l + W - PAD.r) / 2, y: H - 2, "text-anchor": "middle", class: "label"}, xlabel));
    g.append(svg("text", {x: 10, y: PAD.t + 8, class: "label"}, ylabel));
    return {g, sx, sy};
  }

  // series: [{name, points: [[x, y], ...], strong}]; y in [ymin, ymax]
  function lineChart(series, opts) {
    const xs = series.flatMap((s) => s.points.map((p) => p[0]));
    const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": opts.title});
    if (!xs.length) { root.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no round yet")); return root; }
    const a = axes(Math.min(...xs), Math.max(...xs), opts.ymin, opts.ymax, opts.xlabel || "round", opts.ylabel || "", opts.yticks);
    root.append(a.g);
    const labels = [];
    series.forEach((s, i) => {
      const color = s.strong ? "#111" : COLORS[i % COLORS.length];
      const pts = s.points.filter((p) => typeof p[1] === "number" && isFinite(p[1]));
      if (!pts.length) return;
      root.append(svg("polyline", {class: s.strong ? "line strong" : "line", stroke: color,
                                   points: pts.map((p) => `${a.sx(p[0])},${a.sy(p[1])}`).join(" ")}));
      for (const p of pts) root.append(svg("circle", {cx: a.sx(p[0]), cy: a.sy(p[1]), r: s.strong ? 3 : 2, fill: color, "data-series": s.name, "data-x": p[0]},
                                           svg("title", {}, `${s.name} round ${p[0]}: ${p[1].toFixed(4)}`)));
      labels.push({y: a.sy(pts[pts.length - 1][1]) + 4, color, name: s.name});
    });
    labels.sort((p, q) => p.y - q.y);  // end-of-line labels, pushed apart so none overlaps
    for (let i = 1; i < labels.length; i++) labels[i].y = Math.max(labels[i].y, labels[i - 1].y + 12);
    for (const l of labels) root.append(svg("text", {x: W - PAD.r + 6, y: l.y, fill: l.color, class: "legend"}, l.name));
    return root;
  }

  // bars: [{x, parts: [{value, cls, title}]}]: stacked bars per round
  function stackedBars(bars, opts) {
    const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": opts.title});
    if (!bars.length) { root.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no round yet")); return root; }
    const xmin = Math.min(...bars.map((b) => b.x)), xmax = Math.max(...bars.map((b) => b.x));
    const top = Math.max(1, ...bars.map((b) => b.parts.reduce((s, p) => s + p.value, 0)));
    const a = axes(xmin - 0.5, xmax + 0.5, 0, top, opts.xlabel || "round", opts.ylabel || "", [...Array(top + 1).keys()].filter((t) => top <= 10 || t % Math.ceil(top / 10) === 0));
    root.append(a.g);
    const bw = Math.max(3, Math.min(28, (W - PAD.l - PAD.r) / (xmax - xmin + 2) * 0.7));
    for (const b of bars) {
      let base = 0;
      for (const p of b.parts) {
        if (!p.value) continue;
        root.append(svg("rect", {x: a.sx(b.x) - bw / 2, y: a.sy(base + p.value), width: bw, height: a.sy(base) - a.sy(base + p.value),
                                 class: `bar ${p.cls}`, "data-x": b.x}, svg("title", {}, p.title)));
        base += p.value;
      }
    }
    (opts.legend || []).forEach((l, i) => root.append(svg("text", {x: W - PAD.r + 6, y: PAD.t + 14 + 16 * i, class: `legend ${l.cls}`}, l.name)));
    return root;
  }

  // rows: [{name, value, limit}] horizontal bars with the limit marked
  function budgetBars(rows, opts) {
    const h = 28 * Math.max(1, rows.length) + 30;
    const root = svg("svg", {viewBox: `0 0 ${W} ${h}`, class: "chart", role: "img", "aria-label": opts.title});
    if (!rows.length) { root.append(svg("text", {x: W / 2, y: 24, "text-anchor": "middle"}, opts.empty || "nothing to show")); return root; }
    const top = Math.max(...rows.map((r) => Math.max(r.value || 0, r.limit || 0)), 1e-9) * 1.1;
    const x0 = 120, x1 = W - 20, sx = (v) => x0 + (v / top) * (x1 - x0);
    rows.forEach((r, i) => {
      const y = 10 + 28 * i;
      root.append(svg("text", {x: x0 - 8, y: y + 14, "text-anchor": "end"}, r.name));
      const over = r.limit !== null && r.limit !== undefined && r.value > r.limit;
      root.append(svg("rect", {x: x0, y, width: Math.max(1, sx(r.value || 0) - x0), height: 18, class: over ? "bar over" : "bar spent", "data-site": r.name},
                      svg("title", {}, `${r.name}: ε ${fmt(r.value)}` + (r.limit ? ` of ${r.limit}` : ""))));
      if (r.limit) {
        root.append(svg("line", {class: "limit", x1: sx(r.limit), x2: sx(r.limit), y1: y - 3, y2: y + 21}));
        root.append(svg("text", {x: Math.min(sx(r.limit) + 4, W - 40), y: y + 14, class: "legend"}, `limit ${r.limit}`));
      }
    });
    root.append(svg("text", {x: x0, y: h - 4, class: "label"}, opts.xlabel || ""));
    return root;
  }

  return {el, replace, api, session, live, ago, duration, expiry, fmt, lineChart, stackedBars, budgetBars};
})();
