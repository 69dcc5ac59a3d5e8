// The coordinator dashboard: renders the live state the server streams (/api/stream).
"use strict";

(() => {
  const {el, replace, api, session, live, ago, duration, expiry, fmt, lineChart, stackedBars, budgetBars} = insitu;
  let selected = decodeURIComponent((location.hash.match(/job=([^&]+)/) || [])[1] || "");
  let stream = null;
  let lastJobs = [];

  function badge(text, cls) { return el("span", {class: `badge ${cls || text}`}, text); }

  function sitesTable(sites, now) {
    const head = el("tr", {}, ["site", "state", "last heart-beat", "certificate expires", "records", "ε budget"].map((h) => el("th", {}, h)));
    const rows = sites.map((s) => el("tr", {"data-site": s.site, "data-online": String(!!s.online)},
      el("td", {}, s.site),
      el("td", {}, badge(s.online ? "online" : "offline"),
         s.online ? null : el("div", {class: "reason"}, [s.offline_since ? `since ${ago(s.offline_since, now)}` : "", s.offline_reason ? `: ${s.offline_reason}` : ""].join(""))),
      el("td", {}, ago(s.last_seen, now)),
      el("td", {}, expiry(s.cert_not_after, now)),
      el("td", {class: "num"}, s.info ? `${s.info.n_train}/${s.info.n_test}` : ""),
      el("td", {class: "num"}, s.epsilon_budget === undefined ? "" : String(s.epsilon_budget))));
    const online = sites.filter((s) => s.online).length;
    return el("table", {"data-online": online}, el("caption", {class: "muted"}, sites.length ? `${online} of ${sites.length} sites online` : "no site has connected yet"), head, rows);
  }

  function auditView(a) {
    if (!a || !a.configured) return el("div", {id: "audit", class: "muted"}, "No audit chain configured ([dashboard] audit_log, audit_key in coordinator.toml).");
    return el("div", {id: "audit", "data-ok": String(!!a.ok)},
      el("p", {}, badge(a.ok ? "intact" : "NOT intact", a.ok ? "ok" : "bad"), " ",
         a.ok ? `${a.entries} entries verified (hash chain and Ed25519 signatures)` : `entry #${a.first_bad ?? "?"}: ${a.reason}`),
      a.head ? el("p", {}, "head #", String(a.head.seq), " ", el("span", {class: "hash"}, a.head.hash)) : null,
      el("p", {class: "muted"}, `writers: ${(a.writers || []).join(", ") || "–"} · verified ${ago(a.verified_at)} · ${a.log}`));
  }

  function jobsTable(jobs) {
    const head = el("tr", {}, ["job", "status", "rounds", "ETA", "submitted by", "plan", ""].map((h) => el("th", {}, h)));
    const rows = jobs.map((j) => {
      const pr = j.progress || {};
      const waiting = j.approval ? Object.keys({...j.approval.waiting, ...j.approval.unreachable}) : [];
      const active = ["queued", "waiting", "running"].includes(j.status);
      return el("tr", {"data-job": j.id, "data-status": j.status, class: j.id === selected ? "selected" : null},
        el("td", {}, el("a", {href: `#job=${encodeURIComponent(j.id)}`, onclick: (e) => { e.preventDefault(); select(j.id); }}, j.id)),
        el("td", {}, badge(j.status), waiting.length ? el("div", {class: "muted"}, `waiting for ${waiting.join(", ")}`) : null,
           j.error ? el("div", {class: "reason"}, j.error) : null),
        el("td", {class: "num"}, `${j.rounds_applied}/${j.rounds_target}`),
        el("td", {class: "num"}, pr.eta_seconds === null || pr.eta_seconds === undefined ? "" : duration(pr.eta_seconds)),
        el("td", {}, j.submitted_by),
        el("td", {class: "hash"}, j.task_hash.slice(0, 12)),
        el("td", {},
           active ? el("button", {type: "button", class: "danger", "data-action": "cancel", onclick: () => cancel(j.id)}, "cancel") : null,
           j.rounds_applied > 0 ? el("a", {class: "button", href: `/api/jobs/${encodeURIComponent(j.id)}/model`, "data-action": "model",
                                           download: `${j.id}.zip`}, "download model") : null));
    });
    return el("table", {}, head, rows);
  }

  function jobPanel(job, now) {
    if (!job) return;
    if (job.error && !job.id) { replace("job-head", el("div", {class: "msg error"}, job.error)); return; }
    const pr = job.progress || {};
    replace("job-title", el("h2", {}, `Job ${job.id} `, badge(job.status)));
    const head = [el("p", {id: "job-progress"}, `${job.rounds_applied}/${job.rounds_target} rounds applied`,
      pr.seconds_per_round ? ` · ${duration(pr.seconds_per_round)} per round` : "",
      pr.eta_seconds !== null && pr.eta_seconds !== undefined ? ` · ETA ${duration(pr.eta_seconds)}` : "",
      pr.elapsed_seconds ? ` · elapsed ${duration(pr.elapsed_seconds)}` : "",
      ` · plan `, el("span", {class: "hash"}, job.task_hash))];
    if (job.approval) {
      const w = {...job.approval.waiting, ...job.approval.unreachable};
      head.push(el("div", {id: "approval"}, el("p", {}, `Waiting for the sites to approve the plan (up to ${job.approval.timeout} s); approved: ${job.approval.approved.join(", ") || "none"}`),
        el("ul", {}, Object.entries(w).map(([s, why]) => el("li", {"data-waiting": s}, `${s}: ${why}`)))));
    }
    if (job.error) head.push(el("p", {class: "reason"}, job.error));
    const fin = job.final || {};
    if (typeof fin.mean_site_accuracy === "number") head.push(el("p", {id: "final"}, `final mean site accuracy ${fin.mean_site_accuracy.toFixed(4)}`));
    replace("job-head", el("div", {}, head));

    const rounds = job.rounds || [];
    const applied = rounds.filter((r) => r.status === "applied");
    const siteNames = [...new Set(applied.flatMap((r) => Object.keys((r.evaluation && r.evaluation.site_accuracy) || {})))].sort();
    const series = [{name: "mean", strong: true, points: applied.filter((r) => r.evaluation).map((r) => [r.round, r.evaluation.mean_site_accuracy])}]
      .concat(siteNames.map((s) => ({name: s, points: applied.filter((r) => r.evaluation && r.evaluation.site_accuracy).map((r) => [r.round, r.evaluation.site_accuracy[s]])})));
    replace("chart-accuracy", el("div", {"data-rounds": applied.length}, lineChart(series, {title: "accuracy", ymin: 0, ymax: 1, yticks: [0, 0.25, 0.5, 0.75, 1], ylabel: "accuracy"})));
    const bars = rounds.filter((r) => r.status !== "started").map((r) => ({x: r.round, parts: [
      {value: r.participants.length, cls: "joined", title: `round ${r.round}: ${r.participants.join(", ") || "nobody"} joined`},
      {value: Object.keys(r.dropped).length, cls: "dropped", title: `round ${r.round}: ${Object.keys(r.dropped).join(", ")} dropped`}]}));
    replace("chart-participants", el("div", {"data-rounds": bars.length}, stackedBars(bars, {title: "participants", ylabel: "sites", legend: [{name: "joined", cls: "joined"}, {name: "dropped", cls: "dropped"}]})));
    const eps = (job.sites || []).filter((s) => typeof s.epsilon === "number" || typeof s.epsilon_budget === "number")
      .map((s) => ({name: s.site, value: s.epsilon || 0, limit: s.epsilon_budget}));
    replace("chart-epsilon", el("div", {}, budgetBars(eps, {title: "epsilon", xlabel: "ε (each site's own accountant)", empty: "not a DP job: no ε spent"})));
    const drops = rounds.flatMap((r) => Object.entries(r.dropped).map(([s, why]) => ({round: r.round, site: s, why})))
      .concat(rounds.filter((r) => r.status !== "applied" && r.status !== "started" && r.reason && !Object.keys(r.dropped).length).map((r) => ({round: r.round, site: "–", why: r.reason})));
    replace("dropouts", el("table", {"data-count": drops.length}, el("tr", {}, el("th", {}, "round"), el("th", {}, "site"), el("th", {}, "reason")),
      drops.length ? drops.slice(-50).reverse().map((d) => el("tr", {"data-site": d.site}, el("td", {class: "num"}, String(d.round)), el("td", {}, d.site), el("td", {class: "reason"}, d.why)))
                   : el("tr", {}, el("td", {colspan: 3, class: "muted"}, "none"))));
    const head2 = el("tr", {}, ["site", "state", "last round", "test acc", "test loss", "train loss", "ε", "last drop-out"].map((h) => el("th", {}, h)));
    replace("job-sites", el("table", {}, head2, (job.sites || []).map((s) => el("tr", {"data-site": s.site, "data-online": String(!!s.online)},
      el("td", {}, s.site), el("td", {}, badge(s.online ? "online" : "offline"), s.online ? null : el("div", {class: "reason"}, s.offline_reason || "")),
      el("td", {class: "num"}, s.last_round === undefined ? "" : String(s.last_round)), el("td", {class: "num"}, fmt(s.accuracy, 4)),
      el("td", {class: "num"}, fmt(s.loss, 4)), el("td", {class: "num"}, fmt(s.train_loss, 4)),
      el("td", {class: "num"}, typeof s.epsilon === "number" ? `${fmt(s.epsilon)}${s.epsilon_budget ? " / " + s.epsilon_budget : ""}` : ""),
      el("td", {class: "reason"}, s.dropped_reason || "")))));
  }

  function render(state) {
    const ov = state.overview, now = ov.now;
    replace("sites-table", sitesTable(ov.sites, now));
    replace("audit", auditView(ov.audit));
    lastJobs = ov.jobs;
    if (!selected && ov.jobs.length) {
      const active = ov.jobs.find((j) => ["running", "waiting", "queued"].includes(j.status));
      select((active || ov.jobs[0]).id);
      return;
    }
    replace("jobs-table", jobsTable(ov.jobs));
    if (state.job) jobPanel(state.job, now);
  }

  function select(name) {
    selected = name;
    history.replaceState(null, "", `#job=${encodeURIComponent(name)}`);
    replace("jobs-table", jobsTable(lastJobs));
    if (stream) stream.reopen();
  }

  async function cancel(name) {
    if (!confirm(`Cancel job ${name}? It stops after its current round.`)) return;
    try { await api(`/api/jobs/${encodeURIComponent(name)}/cancel`, {method: "POST", body: {}}); }
    catch (e) { alert(e.message); }
  }

  async function submit() {
    const msg = document.getElementById("submit-msg");
    msg.className = "msg";
    msg.textContent = "submitting…";
    try {
      const res = await api("/api/jobs", {method: "POST", body: {toml: document.getElementById("job-toml").value}});
      msg.className = "msg ok";
      msg.textContent = `job ${res.id} ${res.status}; plan ${res.task_hash.slice(0, 12)}`;
      select(res.id);
    } catch (e) {
      msg.className = "msg error";
      msg.textContent = e.message;
    }
  }

  async function start() {
    const who = await session();
    document.getElementById("who").textContent = `operator ${who.operator} (${who.via === "certificate" ? "certificate" : "login link"})`;
    const out = document.getElementById("logout");
    if (who.via === "login") {
      out.hidden = false;
      out.addEventListener("click", async () => { await api("/api/logout", {method: "POST", body: {}}); location.reload(); });
    }
    document.getElementById("submit").addEventListener("click", submit);
    const link = document.getElementById("link");
    stream = live(() => `/api/stream${selected ? "?job=" + encodeURIComponent(selected) : ""}`, render, (up) => {
      link.className = `link ${up ? "up" : "down"}`;
      link.textContent = up ? "live" : "reconnecting…";
      link.dataset.live = String(up);
    });
  }

  document.addEventListener("DOMContentLoaded", () => start().catch((e) => { document.getElementById("link").textContent = e.message; }));
})();
