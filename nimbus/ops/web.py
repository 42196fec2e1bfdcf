"""The live web view (`python -m nimbus.web`, and the all-in-one on NIMBUS_WEB_PORT): clients by
state, per-stage rates, Kafka lags, replays in progress, refreshed live.

Served by `nimbus.ops.httpd` (hypercorn; Host header checked): `GET /` is one self-contained page
that polls `GET /api/state` (JSON) every NIMBUS_WEB_REFRESH_MS; `GET /metrics` is this process's
Prometheus registry. One sampler task reads the log and the state store once per refresh period,
whatever the number of browsers watching (read-only: end offsets, committed offsets, client
records). Per-stage counters come from this process's registry (the all-in-one has every role in
it) plus the metrics endpoints listed in NIMBUS_WEB_SCRAPE (the pods and workers of a distributed
run).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
import trio_asyncio
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from nimbus.config import Settings
from nimbus.core.lifecycle import ClientRecord, Status
from nimbus.engines import open_engine
from nimbus.engines.murmur2 import partition_for
from nimbus.entry import ArgumentParser, run_process, run_with_signals
from nimbus.ops import httpd, metrics

# (label in the view, what it counts): nimbus_ops_total{op=...}, or another counter's name.
STAGES: list[tuple[str, str]] = [
    ("events ingested", "pod.events"),
    ("events computed", "events.processed"),
    ("results read by router", "router.results"),
    ("routed live", "router.live"),
    ("written to DLQ", "router.dlq"),
    ("diverted (live failed)", "router.diverted"),
    ("delivered to streams", "pod.delivered"),
    ("confirmed live", "router.delivered"),
    ("replayed (confirmed)", "nimbus_replay_drained"),
    ("flips to LIVE", "status.flips"),
    ("repeats skipped (at-least-once)", "router.repeats"),
    ("runs refused by a pod", "replay.refused"),
    ("stalled (no progress, see logs)", "replay.stalled"),
    ("stalled in a router", "router.stalled"),
]
MAX_REPLAYS_SHOWN = 25
RATE_WINDOW_S = 2.0


def merge_exposition(texts: list[str]) -> dict[str, float]:
    """Sum the samples of Prometheus text expositions by 'name{labels}' (counters and gauges)."""
    out: dict[str, float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                key = f"{s.name}{{{labels}}}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def stage_totals(samples: dict[str, float]) -> dict[str, float]:
    totals = {}
    for label, what in STAGES:
        if what.startswith("nimbus_"):
            totals[label] = samples.get(f"{what}_total{{}}", samples.get(f"{what}{{}}", 0.0))
        else:
            totals[label] = samples.get(f"nimbus_ops_total{{op={what}}}", 0.0)
    return totals


def rates(prev: dict[str, float], cur: dict[str, float], dt: float) -> dict[str, float]:
    """Per-second rates of counters between two samples (a counter that went down restarted)."""
    if dt <= 0:
        return {k: 0.0 for k in cur}
    return {
        k: max(0.0, v - prev.get(k, 0.0)) / dt if v >= prev.get(k, 0.0) else v / dt
        for k, v in cur.items()
    }


def latency_buckets(samples: dict[str, float], path: str) -> dict[str, float]:
    """The cumulative bucket counts of nimbus_delivery_latency_seconds{path}, keyed 'lat:<le>'."""
    prefix = "nimbus_delivery_latency_seconds_bucket{le="
    suffix = f",path={path}}}"
    return {
        f"lat:{k[len(prefix) : -len(suffix)]}": v
        for k, v in samples.items()
        if k.startswith(prefix) and k.endswith(suffix)
    }


def quantile(buckets: dict[str, float], q: float) -> float | None:
    """The q-quantile (seconds) of a histogram given as cumulative counts per upper bound
    ('lat:<le>' -> count, e.g. the increase over a window), interpolated within the bucket as
    Prometheus' histogram_quantile does; None without observations."""
    bounds = sorted((float(k[4:]), v) for k, v in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None
    total = bounds[-1][1]
    rank = q * total
    lo_bound, lo_count = 0.0, 0.0
    for le, count in bounds:
        if count >= rank:
            if le == float("inf"):
                return lo_bound
            span = count - lo_count
            return lo_bound + (le - lo_bound) * ((rank - lo_count) / span if span > 0 else 1.0)
        lo_bound, lo_count = le, count
    return lo_bound


def errors(samples: dict[str, float]) -> dict[str, float]:
    prefix = "nimbus_errors_total{kind="
    return {k[len(prefix) : -1]: v for k, v in samples.items() if k.startswith(prefix) and v}


async def scrape(target: str, timeout: float = 2.0) -> str:
    """GET http://target/metrics (text); raises OSError / trio.TooSlowError on failure."""
    host, _, port = target.rpartition(":")
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                f"GET /metrics HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while len(data) < 16 * 1024 * 1024:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        raise OSError(f"{target}: {status_line}")
    return body.decode()


def replays_shown(replaying: list[ClientRecord], dlq_ends: dict[int, int]) -> list[dict[str, Any]]:
    """The first MAX_REPLAYS_SHOWN replaying clients (by client_id), each with its DLQ partition
    and an upper bound of the backlog left behind its cursor."""
    replays = []
    for r in sorted(replaying, key=lambda r: r.client_id)[:MAX_REPLAYS_SHOWN]:
        part = partition_for(r.client_id.encode(), len(dlq_ends)) if dlq_ends else 0
        end = dlq_ends.get(part, 0)
        replays.append(
            {
                "client_id": r.client_id,
                "pod": r.pod,
                "epoch": r.epoch,
                "acked": r.acked,
                "routed_dlq": r.routed_dlq,
                "cursor": r.cursor,
                "dlq_partition": part,
                "backlog_upper": max(0, end - r.cursor) if r.cursor >= 0 else 0,
            }
        )
    return replays


def topic_rates(s: Settings, r: dict[str, float]) -> dict[str, float]:
    """The topics' rates, by what they count."""
    return {
        "ingested into events topic": r.get(f"end:{s.kafka_events_topic}", 0.0),
        "consumed by event consumer": r.get(f"committed:{s.kafka_events_topic}", 0.0),
        "results records written (packs of results)": r.get(f"end:{s.kafka_results_topic}", 0.0),
        "routed (router commits)": r.get(f"committed:{s.kafka_results_topic}", 0.0),
        "DLQ records written (packs of results)": r.get(f"end:{s.kafka_dlq_topic}", 0.0),
    }


@dataclass
class WebView:
    settings: Settings
    log: Any
    state: Any
    scrape_targets: list[str] = field(default_factory=list)
    snapshot: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    # Recent (time, counters) samples: rates are taken over RATE_WINDOW_S, not one refresh, so
    # a burst between two refreshes does not read as 0 then 2x.
    _history: deque[tuple[float, dict[str, float]]] = field(default_factory=deque)

    async def sample_forever(self) -> None:
        while True:
            try:
                self.snapshot = await self.sample()
            except Exception as e:  # never let the view take the process down
                logger.warning("web view: sampling failed: {}", e)
                self.snapshot = {**self.snapshot, "error": str(e)}
            await trio.sleep(self.settings.web_refresh_ms / 1000)

    async def sample(self) -> dict[str, Any]:
        s = self.settings
        now = time.time()
        problems: list[str] = []
        # Clients by state, and the replays in progress.
        records = await self.state.all_clients()
        by_state = {st.value: 0 for st in Status}
        for rec in records:
            by_state[rec.status.value] += 1
        topics, totals, dlq_ends = await self._topics()
        replaying = [r for r in records if r.status is Status.REPLAYING]
        # Per-stage counters: this process, plus the scraped ones.
        merged = await self._scraped(problems)
        stage = stage_totals(merged)
        lat_live = latency_buckets(merged, "live")
        counters = {**{f"stage:{k}": v for k, v in stage.items()}, **totals, **lat_live}
        r = self._rates(now, counters)
        recent = {k: r.get(k, 0.0) for k in lat_live}  # observations per second per bucket, lately
        self.samples += 1
        lat_n = merged.get("nimbus_delivery_latency_seconds_count{path=live}", 0.0)
        lat_sum = merged.get("nimbus_delivery_latency_seconds_sum{path=live}", 0.0)
        return {
            "time": now,
            "sample": self.samples,
            "engine": s.engine,
            "clients": {"total": len(records), **by_state},
            "stages": [{"stage": k, "total": stage[k], "rate": r[f"stage:{k}"]} for k, _ in STAGES],
            "topic_rates": topic_rates(s, r),
            "topics": topics,
            "replays": replays_shown(replaying, dlq_ends),
            "replays_total": len(replaying),
            "replays_active_here": merged.get("nimbus_replays_active{}", 0.0),
            "delivery_latency_live_mean_ms": (lat_sum / lat_n * 1000) if lat_n else None,
            "delivery_latency_live_recent_ms": {
                q: (None if (v := quantile(recent, float(q))) is None else v * 1000)
                for q in ("0.5", "0.99")
            },
            "errors": errors(merged),
            "problems": problems,
        }

    async def _topics(self) -> tuple[list[dict[str, Any]], dict[str, float], dict[int, int]]:
        """Topics: end offsets; the two consumer groups' committed offsets and lag. Also the
        counters they give ('end:<topic>', 'committed:<topic>') and the DLQ's end offsets."""
        s = self.settings
        topics: list[dict[str, Any]] = []
        totals: dict[str, float] = {}
        dlq_ends: dict[int, int] = {}
        for topic, group in (
            (s.kafka_events_topic, s.events_group),
            (s.kafka_results_topic, s.results_group),
            (s.kafka_dlq_topic, ""),
        ):
            ends = await self.log.end_offsets(topic)
            committed = await self.log.committed(group, topic) if group else {}
            parts = []
            for p in sorted(ends):
                c = committed.get(p, 0) if group else None
                parts.append(
                    {
                        "partition": p,
                        "end": ends[p],
                        "committed": c,
                        "lag": ends[p] - c if c is not None else None,
                    }
                )
            topics.append(
                {
                    "topic": topic,
                    "group": group,
                    "end": sum(ends.values()),
                    "lag": sum(x["lag"] for x in parts if x["lag"] is not None) if group else None,
                    "partitions": parts,
                }
            )
            totals[f"end:{topic}"] = float(sum(ends.values()))
            if group:
                totals[f"committed:{topic}"] = float(sum(committed.values()))
            if topic == s.kafka_dlq_topic:
                dlq_ends = ends
        return topics, totals, dlq_ends

    async def _scraped(self, problems: list[str]) -> dict[str, float]:
        """This process's samples merged with the scrape targets' (a failed scrape: a problem)."""
        texts = [metrics.exposition().decode()]
        for target in self.scrape_targets:
            try:
                texts.append(await scrape(target))
            except (OSError, trio.TooSlowError, ValueError) as e:
                problems.append(f"scrape {target}: {e or type(e).__name__}")
        return merge_exposition(texts)

    def _rates(self, now: float, counters: dict[str, float]) -> dict[str, float]:
        """The counters' rates over the last RATE_WINDOW_S; `counters` joins the history."""
        hist = self._history
        while len(hist) > 1 and now - hist[1][0] >= RATE_WINDOW_S:
            hist.popleft()
        r = rates(hist[0][1], counters, now - hist[0][0]) if hist else {k: 0.0 for k in counters}
        hist.append((now, counters))
        return r

    async def handle(self, req: httpd.Request) -> httpd.Response:
        if req.path == "/":
            return httpd.Response(
                200,
                "text/html; charset=utf-8",
                PAGE.replace("__REFRESH__", str(self.settings.web_refresh_ms)).encode(),
            )
        if req.path == "/api/state":
            if not self.snapshot:
                return httpd.Response(
                    503, "application/json", b'{"error": "first sample not taken yet"}'
                )
            return httpd.Response(200, "application/json", json.dumps(self.snapshot).encode())
        if req.path == "/metrics":
            return httpd.Response(
                200, "text/plain; version=0.0.4; charset=utf-8", metrics.exposition()
            )
        return httpd.Response(404, "text/plain", b"not found\n")


def scrape_targets(settings: Settings) -> list[str]:
    return [t.strip() for t in settings.web_scrape.split(",") if t.strip()]


async def run_web(
    settings: Settings,
    log: Any,
    state: Any,
    *,
    targets: list[str] | None = None,
    port: int | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the live view until cancelled; reports the bound port."""
    view = WebView(
        settings, log, state, targets if targets is not None else scrape_targets(settings)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(view.sample_forever)
        bound = await nursery.start(
            partial(
                httpd.serve,
                settings.web_host,
                settings.web_port if port is None else port,
                view.handle,
                "web",
                allowed_hosts=settings.http_allowed_hosts,
            )
        )
        logger.info("live web view on http://{}:{}/", settings.web_host, bound)
        task_status.started(bound)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Nimbus live</title>
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:16px;background:#f6f7f9;color:#1b1f24}
 h1{font-size:20px;margin:0 0 4px} h2{font-size:15px;margin:18px 0 6px}
 .meta{color:#667;font-size:12px} .grid{display:flex;gap:10px;flex-wrap:wrap}
 .card{background:#fff;border:1px solid #dde;border-radius:6px;padding:8px 14px;min-width:110px}
 .card .n{font-size:26px;font-weight:600} .card .l{color:#667;font-size:12px}
 .LIVE .n{color:#17803d} .REPLAYING .n{color:#b76e00} .OFFLINE .n{color:#667}
 table{border-collapse:collapse;background:#fff;border:1px solid #dde}
 td,th{padding:3px 10px;border-bottom:1px solid #eef;text-align:right} th{background:#eef1f5}
 td:first-child,th:first-child{text-align:left} .err{color:#b00020}
 .cols{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
</style></head><body>
<h1>Nimbus &mdash; live</h1>
<div class="meta">sample <span id="sample">-</span> &middot; updated <span id="updated">never</span>
 &middot; engine <span id="engine">?</span> <span id="problems" class="err"></span></div>
<h2>Clients by state</h2><div class="grid" id="clients"></div>
<div class="cols">
<div><h2>Per-stage rates</h2><table id="stages"><thead><tr><th>stage</th><th>per second</th><th>total</th></tr></thead><tbody></tbody></table>
<h2>Topic rates</h2><table id="trates"><thead><tr><th>from offsets</th><th>per second</th></tr></thead><tbody></tbody></table>
<div class="meta">live delivery latency: mean <span id="lat">-</span> &middot; last 2 s
 p50 <span id="p50">-</span>, p99 <span id="p99">-</span></div></div>
<div><h2>Kafka lag</h2><table id="lags"><thead><tr><th>topic / partition</th><th>end</th><th>committed</th><th>lag</th></tr></thead><tbody></tbody></table></div>
<div><h2>Replays in progress (<span id="nrep">0</span>)</h2><table id="replays"><thead><tr><th>client</th><th>epoch</th><th>acked</th><th>cursor</th><th>DLQ backlog &le;</th></tr></thead><tbody></tbody></table>
<h2>Errors by kind</h2><table id="errors"><thead><tr><th>kind</th><th>count</th></tr></thead><tbody></tbody></table></div>
</div>
<script>
const fmt = (x, d=1) => x == null ? "-" : (Math.abs(x) >= 100 || Number.isInteger(x) ? Math.round(x).toLocaleString() : x.toFixed(d));
function rows(id, list){ const tb=document.querySelector('#'+id+' tbody'); tb.innerHTML='';
  for(const r of list){ const tr=document.createElement('tr'); for(const c of r){ const td=document.createElement('td'); td.textContent=c; tr.appendChild(td);} tb.appendChild(tr);} }
function render(s){
  document.getElementById('sample').textContent = s.sample;
  document.getElementById('updated').textContent = new Date(s.time*1000).toLocaleTimeString();
  document.getElementById('engine').textContent = s.engine;
  document.getElementById('problems').textContent = (s.problems||[]).concat(s.error?[s.error]:[]).join('; ');
  const c = document.getElementById('clients'); c.innerHTML='';
  for(const k of ['LIVE','REPLAYING','OFFLINE','total']){ const d=document.createElement('div'); d.className='card '+k;
    d.innerHTML='<div class="n" data-state="'+k+'">'+fmt(s.clients[k])+'</div><div class="l">'+k.toLowerCase()+'</div>'; c.appendChild(d);}
  rows('stages', s.stages.map(x => [x.stage, fmt(x.rate), fmt(x.total)]));
  rows('trates', Object.entries(s.topic_rates).map(([k,v]) => [k, fmt(v)]));
  const ms = v => v == null ? '-' : v.toFixed(2) + ' ms';
  document.getElementById('lat').textContent = ms(s.delivery_latency_live_mean_ms);
  document.getElementById('p50').textContent = ms(s.delivery_latency_live_recent_ms['0.5']);
  document.getElementById('p99').textContent = ms(s.delivery_latency_live_recent_ms['0.99']);
  const lag=[]; for(const t of s.topics){ lag.push([t.topic+(t.group?' ('+t.group+')':''), fmt(t.end), '', t.lag==null?'-':fmt(t.lag)]);
    for(const p of t.partitions){ lag.push(['  #'+p.partition, fmt(p.end), p.committed==null?'-':fmt(p.committed), p.lag==null?'-':fmt(p.lag)]);}}
  rows('lags', lag);
  document.getElementById('nrep').textContent = s.replays_total;
  rows('replays', s.replays.map(r => [r.client_id, r.epoch, r.acked, r.cursor, fmt(r.backlog_upper)]));
  rows('errors', Object.entries(s.errors).map(([k,v]) => [k, fmt(v)]));
}
async function tick(){ try{ const r = await fetch('/api/state', {cache:'no-store'}); if(r.ok) render(await r.json()); }catch(e){ document.getElementById('problems').textContent = String(e);} }
tick(); setInterval(tick, __REFRESH__);
</script></body></html>
"""


async def main_async(settings: Settings) -> None:
    async with trio_asyncio.open_loop(), open_engine(settings) as engine:
        await run_with_signals(
            lambda task_status: run_web(settings, engine.log, engine.state, task_status=task_status)
        )


def main(argv: list[str] | None = None) -> None:
    ArgumentParser(prog="python -m nimbus.web", description=__doc__).parse_args(argv)
    run_process("nimbus.web", "web", main_async)
