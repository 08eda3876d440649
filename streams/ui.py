"""The live page of a running worker (``/`` on its metrics port): events/s, list latency and dead
letters over time, and one user picked from the stream with their interest distribution over
categories, recent clicks and queries, and their current list in each scene with each item's
reason. The page polls ``/api/live`` (JSON) once a second; it needs nothing from the network."""

from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from typing import Any, Iterable, Optional

#: Users whose latest lists are kept for the page, the most recent first out when full.
USERS_KEPT = 256


class LiveView:
    """What the page shows, kept by the worker as lists go out: the latest list of each recent
    user per scene, and the latency of each list (produced time minus event time)."""

    def __init__(self, users: int = USERS_KEPT, clock=time.time) -> None:
        self.users = users
        self.clock = clock
        self.lists: OrderedDict[str, dict[str, dict]] = OrderedDict()  # user -> scene -> list
        self.latencies: deque[tuple[float, float]] = deque(maxlen=4096)  # (produced, seconds)

    def observe(self, recommendations: Iterable[tuple[bytes, bytes]]) -> None:
        """The lists of a batch just published (keyed messages of ``streamrec.v1.Recommendations``)."""
        for _, value in recommendations:
            msg = json.loads(value)
            user = msg.get("user_id")
            if not user:
                continue
            self.lists.setdefault(user, {})[msg.get("scene") or ""] = msg
            self.lists.move_to_end(user)
            while len(self.lists) > self.users:
                self.lists.popitem(last=False)
            produced, event = msg.get("produced_time"), msg.get("event_time")
            if produced and event and msg.get("trigger_type") != "request":
                self.latencies.append((float(produced), max(0.0, float(produced) - float(event))))

    def latency_ms(self, window_s: float = 60.0) -> Optional[float]:
        """The median latency of the lists of the last ``window_s`` seconds, in ms."""
        now = self.clock()
        recent = sorted(s for t, s in self.latencies if now - t <= window_s)
        return round(1e3 * recent[len(recent) // 2], 1) if recent else None

    def pick(self, wanted: Optional[str] = None) -> Optional[str]:
        """The user to show: ``wanted`` if the worker has a list for them, else the most recent
        user with lists in the most scenes."""
        if wanted:
            return wanted
        if not self.lists:
            return None
        recent = list(self.lists)[-32:]
        return max(reversed(recent), key=lambda u: len(self.lists[u]))


def user_view(user_id: str, profile: Any, lists: dict[str, dict], titles: dict[str, str],
              distribution: dict[str, float]) -> dict:
    """The page's user panel: the interest distribution over categories (``*``: each category
    never touched), recent history (newest first) and the latest list of each scene."""
    interest = sorted(((c if c != "*" else "each other category", round(float(p), 4))
                       for c, p in distribution.items() if c != "*" or p > 0), key=lambda cp: -cp[1])
    history = [{"type": h.get("type"), "scene": h.get("scene"), "t": h.get("t"),
                "what": titles.get(h.get("item_id", ""), h.get("item_id")) if h.get("type") == "click"
                else h.get("text")} for h in reversed(profile.history[-12:])]
    scenes = {scene or "(no scene)": {
        "trigger": m.get("trigger_type"), "trigger_event_id": m.get("trigger_event_id"),
        "items": [{"item_id": i.get("item_id"), "title": i.get("title"), "category": i.get("category"),
                   "score": i.get("score"), "reason": i.get("reason")} for i in m.get("items", [])]}
        for scene, m in sorted(lists.items())}
    return {"user_id": user_id, "clicks": profile.clicks, "queries": profile.queries, "interest": interest,
            "history": history, "scenes": scenes, "cold": bool(profile.is_cold)}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>streamrec live</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:18px;margin:0} header span{opacity:.8}
main{padding:14px 18px;display:grid;grid-template-columns:repeat(3,1fr);gap:14px}
.card{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 3px rgba(0,0,0,.12)}
.card h2{font-size:13px;margin:0 0 6px;text-transform:uppercase;letter-spacing:.04em;color:#56607a}
.big{font-size:26px;font-weight:600} svg{width:100%;height:90px}
#user{grid-column:1/4} .row{display:flex;gap:14px;flex-wrap:wrap} .col{flex:1;min-width:260px}
.bar{display:flex;align-items:center;gap:6px;margin:2px 0} .bar i{display:block;height:12px;background:#4a7bd0;border-radius:2px}
table{border-collapse:collapse;width:100%} td,th{text-align:left;padding:3px 6px;border-bottom:1px solid #eee;font-size:13px}
th{color:#56607a;font-weight:600} .reason{color:#56607a;font-style:italic}
</style></head><body>
<header><h1>streamrec live</h1><span id="status">connecting...</span></header>
<main>
<div class="card"><h2>Events per second</h2><div class="big" id="eps">-</div><svg id="c-eps"></svg></div>
<div class="card"><h2>List latency p50, last minute (ms)</h2><div class="big" id="lat">-</div><svg id="c-lat"></svg></div>
<div class="card"><h2>Dead letters per second</h2><div class="big" id="dlq">-</div><svg id="c-dlq"></svg></div>
<div class="card" id="user"><h2>User <span id="uid">-</span></h2>
<div class="row"><div class="col"><h2>Interest over categories</h2><div id="interest"></div></div>
<div class="col"><h2>Recent clicks and queries</h2><table id="history"></table></div></div>
<h2 style="margin-top:10px">Current list, by scene</h2><div class="row" id="scenes"></div></div>
</main>
<script>
const series = {eps: [], lat: [], dlq: []}; let last = null;
const esc = s => String(s ?? "").replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
function chart(id, xs) {
  const svg = document.getElementById(id), w = 300, h = 90, max = Math.max(1e-9, ...xs);
  const pts = xs.map((v, i) => `${(i / Math.max(1, xs.length - 1)) * w},${h - 4 - (v / max) * (h - 8)}`).join(" ");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.innerHTML = `<polyline fill="none" stroke="#4a7bd0" stroke-width="2" points="${pts}"/>`;
}
function push(k, v) { series[k].push(v); if (series[k].length > 120) series[k].shift(); chart("c-" + k, series[k]); }
async function tick() {
  const q = new URLSearchParams(location.search).get("user");
  try {
    const r = await fetch("api/live" + (q ? "?user=" + encodeURIComponent(q) : ""));
    const d = await r.json();
    document.getElementById("status").textContent = `${d.events_total} events, ${d.lists_out} lists, ${d.dead_letters} dead letters`;
    if (last) {
      const dt = Math.max(1e-3, d.time - last.time);
      const eps = (d.events_total - last.events_total) / dt, dlq = (d.dead_letters - last.dead_letters) / dt;
      document.getElementById("eps").textContent = eps.toFixed(1); push("eps", eps);
      document.getElementById("dlq").textContent = dlq.toFixed(2); push("dlq", dlq);
    }
    document.getElementById("lat").textContent = d.latency_ms ?? "-"; push("lat", d.latency_ms ?? 0);
    last = d;
    const u = d.user; if (!u) return;
    document.getElementById("uid").textContent = `${u.user_id} (${u.clicks} clicks, ${u.queries} queries)`;
    const top = Math.max(1e-9, ...u.interest.map(x => x[1]));
    document.getElementById("interest").innerHTML = u.interest.slice(0, 10).map(([c, p]) =>
      `<div class="bar"><span style="width:110px">${esc(c)}</span><i style="width:${160 * p / top}px"></i><span>${(100 * p).toFixed(1)}%</span></div>`).join("");
    document.getElementById("history").innerHTML = "<tr><th>what</th><th></th><th>scene</th></tr>" + u.history.map(h =>
      `<tr><td>${h.type === "query" ? "searched" : "clicked"}</td><td>${esc(h.what)}</td><td>${esc(h.scene)}</td></tr>`).join("");
    document.getElementById("scenes").innerHTML = Object.entries(u.scenes).map(([s, l]) =>
      `<div class="col list" data-scene="${esc(s)}"><h2>${esc(s)} <span style="text-transform:none">(after ${esc(l.trigger)} ${esc(l.trigger_event_id)})</span></h2><table>` +
      l.items.map((it, i) => `<tr data-item="${esc(it.item_id)}"><td>${i + 1}</td><td>${esc(it.title || it.item_id)}<div class="reason">${esc(it.reason)}</div></td><td>${esc(it.category)}</td></tr>`).join("") +
      "</table></div>").join("");
    document.body.dataset.user = u.user_id;
  } catch (e) { document.getElementById("status").textContent = "worker unreachable: " + e; }
}
tick(); setInterval(tick, 1000);
</script></body></html>
"""
