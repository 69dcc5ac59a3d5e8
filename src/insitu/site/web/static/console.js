// The site console: what this hospital's site was asked to do, what it did, and the approve/refuse buttons.
"use strict";

(() => {
  const {el, replace, api, session, ago, fmt, budgetBars} = insitu;
  let RANGED = [];
  let busy = false;

  function when(t) { return t ? `${new Date(t * 1000).toLocaleString()} (${ago(t)})` : ""; }

  function specList(fields) {
    return el("dl", {class: "spec"}, Object.entries(fields || {}).flatMap(([k, v]) =>
      [el("dt", {}, k), el("dd", {class: k.endsWith("schema") ? "hash" : null}, Array.isArray(v) ? v.join(", ") : v === null ? "–" : String(v))]));
  }

  function pendingCard(t) {
    const msg = el("div", {class: "msg"});
    const inputs = {};
    const ranges = el("div", {class: "ranges"}, el("span", {class: "muted"}, "Also accept, within these ranges (optional): "),
      RANGED.map((k) => {
        inputs[k] = [el("input", {size: 6, "data-range": `${k}-low`, placeholder: "low", "aria-label": `${k} low`}),
                     el("input", {size: 6, "data-range": `${k}-high`, placeholder: "high", "aria-label": `${k} high`})];
        return el("label", {}, ` ${k} `, inputs[k][0], "–", inputs[k][1]);
      }));
    const reason = el("input", {size: 40, placeholder: "reason (the operator sees it)", "data-field": "reason"});
    async function act(kind) {
      busy = true;
      msg.className = "msg";
      msg.textContent = `${kind === "approve" ? "approving" : "refusing"}…`;
      try {
        let body = {};
        if (kind === "approve") {
          const r = {};
          for (const [k, [lo, hi]] of Object.entries(inputs)) if (lo.value || hi.value) r[k] = [Number(lo.value), Number(hi.value)];
          body = {ranges: r};
        } else body = {reason: reason.value};
        await api(`/api/tasks/${t.hash}/${kind}`, {method: "POST", body});
        msg.className = "msg ok";
        msg.textContent = kind === "approve" ? "approved: takes effect at this site's next round" : "refused";
        setTimeout(refresh, 300);
      } catch (e) {
        msg.className = "msg error";
        msg.textContent = e.message;
      } finally { busy = false; }
    }
    return el("article", {class: "task", "data-task": t.hash},
      el("h3", {}, "plan ", el("span", {class: "hash"}, t.id), t.job ? ` · job ${t.job}` : "", ` · first seen ${when(t.first_seen)}`),
      el("p", {class: "hash"}, t.hash),
      el("p", {"data-field": "privacy"}, el("strong", {}, "Privacy at this site: "), t.privacy),
      t.rounds_refused ? el("p", {class: "reason"}, `${t.rounds_refused} round(s) refused so far: ${t.reason}`) : el("p", {class: "muted"}, t.reason),
      specList(t.fields), ranges,
      el("p", {}, el("button", {type: "button", class: "primary", "data-action": "approve", onclick: () => act("approve")}, "Approve"), " ",
         reason, " ", el("button", {type: "button", class: "danger", "data-action": "refuse", onclick: () => act("refuse")}, "Refuse")),
      msg);
  }

  function render(st) {
    RANGED = st.rangeable || [];
    document.getElementById("title").textContent = `insitu site console · ${st.site}`;
    const p = st.policy;
    document.getElementById("policy").textContent = `coordinator ${p.coordinator} · data ${p.source}` +
      (p.epsilon_budget ? ` · ε budget ${p.epsilon_budget} (δ ${p.delta})` : " · no privacy budget") +
      (p.min_secagg_group ? ` · secure aggregation among ≥ ${p.min_secagg_group}` : "");
    replace("pending", el("div", {"data-count": st.pending.length}, st.pending.length ? st.pending.map(pendingCard) : el("p", {class: "muted"}, "Nothing is waiting for approval.")));
    replace("rounds", el("table", {"data-count": st.rounds.length},
      el("tr", {}, ["when", "job", "round", "plan", "protection", "records", "train loss", "ε this round", "ε total"].map((h) => el("th", {}, h))),
      st.rounds.length ? st.rounds.map((r) => el("tr", {"data-job": r.job, "data-round": r.round},
        el("td", {}, when(r.at)), el("td", {}, r.job), el("td", {class: "num"}, String(r.round)), el("td", {class: "hash"}, (r.plan_hash || "").slice(0, 12)),
        el("td", {}, r.protocol), el("td", {class: "num"}, String(r.metrics.num_samples ?? "")), el("td", {class: "num"}, fmt(r.metrics.train_loss, 4)),
        el("td", {class: "num"}, fmt(r.metrics.epsilon_round)), el("td", {class: "num"}, fmt(r.metrics.epsilon_total))))
      : el("tr", {}, el("td", {colspan: 9, class: "muted"}, "No round trained yet."))));
    const L = st.ledger;
    replace("ledger", el("div", {"data-records": L.records.length},
      L.budget ? budgetBars([{name: st.site, value: L.spent, limit: L.budget}], {title: "epsilon", xlabel: `ε spent at δ=${L.delta} (this site's own accountant)`})
               : el("p", {class: "muted"}, "No privacy budget: this site runs no DP task ([policy] epsilon_budget in site.toml)."),
      L.budget ? el("p", {}, `ε spent ${fmt(L.spent)} of ${L.budget} (δ ${L.delta}); ${L.records.length} charged round(s)`) : null,
      L.records.length ? el("table", {}, el("tr", {}, ["when", "job", "round", "ε round", "ε total"].map((h) => el("th", {}, h))),
        L.records.slice().reverse().map((r) => el("tr", {}, el("td", {}, r.recorded_at || ""), el("td", {}, r.job), el("td", {class: "num"}, String(r.round)),
          el("td", {class: "num"}, fmt(r.epsilon_round)), el("td", {class: "num"}, fmt(r.epsilon_total))))) : null));
    replace("refusals", el("table", {"data-count": st.refusals.length},
      el("tr", {}, ["when", "job", "round", "why"].map((h) => el("th", {}, h))),
      st.refusals.length ? st.refusals.map((r) => el("tr", {}, el("td", {}, when(r.at)), el("td", {}, r.job), el("td", {class: "num"}, String(r.round)), el("td", {class: "reason"}, r.reason)))
        : el("tr", {}, el("td", {colspan: 4, class: "muted"}, "None."))));
    const decided = st.approved.map((a) => ({...a, state: "approved"})).concat(st.refused_tasks.map((r) => ({...r, state: "refused"})));
    replace("decided", el("table", {}, el("tr", {}, ["task", "decision", "when", "ranges / reason"].map((h) => el("th", {}, h))),
      decided.length ? decided.map((d) => el("tr", {"data-task": d.hash, "data-state": d.state}, el("td", {class: "hash"}, d.hash),
        el("td", {}, el("span", {class: `badge ${d.state === "approved" ? "ok" : "bad"}`}, d.state)), el("td", {}, when(d.approved_at || d.refused_at)),
        el("td", {}, d.state === "approved" ? Object.entries(d.ranges || {}).map(([k, [lo, hi]]) => `${k} ${lo}–${hi}`).join(", ") : (d.reason || ""))))
        : el("tr", {}, el("td", {colspan: 4, class: "muted"}, "None yet."))));
  }

  async function refresh() {
    const link = document.getElementById("link");
    try {
      const st = await api("/api/state");
      if (!busy && !document.activeElement.matches("input")) render(st);
      link.className = "link up"; link.textContent = "live"; link.dataset.live = "true";
    } catch (e) {
      link.className = "link down"; link.textContent = e.message; link.dataset.live = "false";
    }
  }

  document.addEventListener("DOMContentLoaded", async () => {
    await session();
    await refresh();
    setInterval(refresh, 2000);
  });
})();
