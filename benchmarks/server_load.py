#!/usr/bin/env python3
"""A bounded loopback load test and benchmark of `dsv4-ggml serve` (issue 17).

Load phase (one server, `--load-parallel` slots): reference requests (temperature 0 or a fixed
seed) are first run alone on the idle server; then `--clients` clients send `--requests` mixed
requests (chat / completion, streamed / not, max_tokens 8-32, a third of them closing the
connection after a few events) while /health is polled every 100 ms. The reference requests are
mixed into the load and must give the text they gave alone (no cross-talk between slots); an
answer that differs is replayed alone, teacher-forced, and counts as rounding when each token is
a choice the sampler could make from logits within the file's measured batch variance
(benchmarks/crosstalk.py), as cross-talk otherwise. Where that variance is so large that other
prompts' answers would pass too (the negative control), the check says it is inconclusive.
Checks: no 5xx, no transport error, no /health failure, no cross-talk, RSS after the load within
`--rss-tolerance` of RSS after the warm-up. Any failure: exit status 1.

Bench phase: the same streamed request set (`--bench-requests` at `--bench-clients` at once,
max_tokens 32, temperature 0, distinct prompts) against `--parallel 1` and `--parallel 4`, each in
its own server process, alternating (`--bench-order 1,4,1,4`): time to first token p50/p99 and
aggregate generated tokens/s (sum of completion_tokens over the wall time).

    python benchmarks/server_load.py [--model PATH] [--threads 2] [--phase load|bench|all]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
PROMPTS = [
    "Hello!", "What is the capital of France?", "Write a haiku about the sea.", "Count from one to ten.",
    "Explain recursion in one sentence.", "Translate 'good morning' into German.", "What is 17 times 23?",
    "Name three prime numbers.", "Describe a cat to someone who has never seen one.", "Why is the sky blue?",
    "Give me a word that rhymes with orange.", "Summarize the plot of Hamlet.", "def fibonacci(n):",
    "The quick brown fox", "List the planets of the solar system.", "What does HTTP stand for?",
    "Once upon a time, in a land far away,", "Tell me a joke about programmers.", "import numpy as np\n",
    "What is the boiling point of water?", "Write a limerick about a robot.", "SELECT * FROM users WHERE",
    "How many legs does a spider have?", "Suggest a name for a bakery.",
]


# --- the server process ----------------------------------------------------------------------------------
class Server:
    def __init__(self, model: str, parallel: int, args, log_dir: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(log_dir, f"server-np{parallel}-{self.port}.log")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONFAULTHANDLER="1")
        cmd = [sys.executable, "-m", "dsv4_ggml.server", "-m", model, "--host", "127.0.0.1", "--port", str(self.port),
               "-c", str(args.ctx), "-t", str(args.threads), "-np", str(parallel), "--log-level", args.server_log_level]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    async def wait_ready(self, timeout: float = 600.0) -> None:
        t0 = time.monotonic()
        async with httpx.AsyncClient() as c:
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.log_tail()}")
                try:
                    if (await c.get(self.url + "/health", timeout=2)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"the server did not answer /health in {timeout:.0f} s: {self.log_tail()}")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def log_tail(self, n: int = 2000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def stop(self) -> None:
        """SIGTERM (then SIGKILL); prints the log's tail if the server had died on its own."""
        if self.proc.poll() is not None:
            print(f"!! the server (pid {self.proc.pid}) had exited with {self.proc.returncode}:\n{self.log_tail()}")
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the cross-talk check ----------------------------------------------------------------------------------
def prompt_ids(model, spec: dict) -> list[int]:
    """The prompt tokens the server evaluates for a request spec (its own prompt code)."""
    from dsv4_ggml.server.params import chat_args
    from dsv4_ggml.server.prompts import chat_prompt, text_prompt

    path, body = body_of(spec)
    if spec["kind"] == "chat":
        return chat_prompt(model, **chat_args(body)).tokens
    return text_prompt(model, body["prompt"]).tokens


def sampling_params(spec: dict):
    from dsv4_ggml.sampling import SamplingParams
    from dsv4_ggml.server.params import sampling

    kw = sampling(body_of(spec)[1], None, 1 << 20)
    return SamplingParams(**{k: kw[k] for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")})


def check_differences(args, refs: list[dict], alone: list[dict], differ: list) -> tuple[list, list, bool]:
    """The reference answers that differ from their alone runs, split into (cross-talk, numeric):
    numeric when every token is a choice the sampler could make from the alone logits moved by at
    most eps, the file's measured batch variance (benchmarks/crosstalk.py); and whether that split
    is decisive: a negative control checks the other references' alone answers against each greedy
    prompt, and when any of those foreign answers passes, eps is too large for the answers to tell
    cross-talk from rounding (the random-weight bench models: a logit moves by ~1.5 with the
    batch; there tests/test_sequences.py's bit-for-bit content test is the evidence)."""
    import dsv4_ggml

    from crosstalk import batch_variance, explained, replay

    model = dsv4_ggml.Model(args.model, n_ctx=args.ctx, n_threads=args.threads, n_seq=args.load_parallel)
    cases = [(prompt_ids(model, r), a["ids"]) for r, a in zip(refs, alone)]
    eps = batch_variance(model, cases)
    cross, numeric, gaps = [], [], []
    for s, r in differ:
        ids, ok = r["ids"] or [], False
        if ids:
            ok, gap = explained(replay(model, cases[s["ref"]][0], ids), ids, sampling_params(s), eps)
            gaps.append(gap)
        (numeric if ok else cross).append((s, r))
    greedy = [k for k, r in enumerate(refs) if r["temperature"] <= 0]
    control = [(a, b) for a in greedy for b in greedy if refs[a]["prompt"] != refs[b]["prompt"]]
    passed = sum(explained(replay(model, cases[a][0], cases[b][1]), cases[b][1], sampling_params(refs[a]), eps)[0]
                 for a, b in control)
    print(f"batch variance of this file: max |Δlogit| {eps:.3g} (the {len(cases)} references alone vs "
          f"{model.n_seq} at a time); {len(differ)} answers under load differ from alone: {len(numeric)} within it "
          f"(greedy gaps up to {max(gaps, default=0):.3g} of {2 * eps:.3g} allowed), {len(cross)} not; "
          f"negative control: {passed} of {len(control)} foreign greedy answers would pass"
          + ("" if not passed else " — so on this file the answers cannot tell cross-talk from rounding"))
    model.close()
    return cross, numeric, passed == 0


# --- one request -------------------------------------------------------------------------------------------
def body_of(spec: dict) -> tuple[str, dict]:
    """(path, JSON body) of a request spec {kind, prompt, max_tokens, temperature, seed, stream}."""
    body = {"max_tokens": spec["max_tokens"], "temperature": spec["temperature"], "stream": spec["stream"],
            "return_tokens": True}
    if spec.get("seed") is not None:
        body["seed"] = spec["seed"]
    if spec["stream"]:
        body["stream_options"] = {"include_usage": True}
    if spec["kind"] == "chat":
        return "/v1/chat/completions", dict(body, messages=[{"role": "user", "content": spec["prompt"]}])
    return "/v1/completions", dict(body, prompt=spec["prompt"])


def text_of(obj: dict, chat: bool, stream: bool) -> str:
    if not obj.get("choices"):
        return ""
    c = obj["choices"][0]
    if not chat:
        return c.get("text") or ""
    m = c.get("delta" if stream else "message") or {}
    return (m.get("reasoning_content") or "") + (m.get("content") or "")


async def send(client: httpx.AsyncClient, spec: dict, disconnect_after: int = 0) -> dict:
    """Sends one request. Returns {status, text, tokens, ttft, error, disconnected}; status None on a
    transport error. `disconnect_after` > 0: close the stream after that many events."""
    path, body = body_of(spec)
    chat = spec["kind"] == "chat"
    res = {"status": None, "text": "", "tokens": 0, "ids": None, "ttft": None, "error": None, "disconnected": False}
    t0 = time.perf_counter()
    try:
        if not spec["stream"]:
            r = await client.post(path, json=body)
            res["status"] = r.status_code
            if r.status_code == 200:
                obj = r.json()
                res["text"], res["tokens"] = text_of(obj, chat, False), obj["usage"]["completion_tokens"]
                res["ids"] = obj["choices"][0].get("tokens")
            else:
                res["error"] = r.text[:300]
            return res
        async with client.stream("POST", path, json=body) as r:
            res["status"] = r.status_code
            if r.status_code != 200:
                res["error"] = (await r.aread()).decode(errors="replace")[:300]
                return res
            pieces, events = [], 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                events += 1
                if "error" in obj:
                    res["error"] = json.dumps(obj)[:300]
                piece = text_of(obj, chat, True)
                if piece and res["ttft"] is None:
                    res["ttft"] = time.perf_counter() - t0
                pieces.append(piece)
                if obj.get("choices") and "tokens" in obj["choices"][0]:
                    res["ids"] = obj["choices"][0]["tokens"]
                if obj.get("usage"):
                    res["tokens"] = obj["usage"]["completion_tokens"]
                if disconnect_after and events >= disconnect_after:
                    res["disconnected"] = True
                    break           # leaving the `async with` closes the half-read connection
            res["text"] = "".join(pieces)
    except httpx.HTTPError as e:
        res["status"], res["error"] = None, f"{type(e).__name__}: {e}"
    finally:
        res["seconds"] = time.perf_counter() - t0
    return res


async def run_all(url: str, specs: list[dict], clients: int, timeout: float = 300.0) -> tuple[list[dict], float]:
    """Sends `specs` from `clients` concurrent clients; returns (results in spec order, wall seconds)."""
    results: list = [None] * len(specs)
    next_i = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def worker() -> None:
            nonlocal next_i
            while next_i < len(specs):
                i, next_i = next_i, next_i + 1
                results[i] = await send(client, specs[i], specs[i].get("disconnect_after", 0))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return results, time.perf_counter() - t0


async def poll_health(srv: Server, stop: asyncio.Event, out: dict) -> None:
    """Every 100 ms: GET /health (latency, failures) and the server's RSS."""
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        while not stop.is_set():
            out["rss"].append(srv.rss_mib())
            t0 = time.perf_counter()
            try:
                r = await c.get("/health")
                if r.status_code != 200:
                    out["failures"].append(f"HTTP {r.status_code}")
            except httpx.HTTPError as e:
                out["failures"].append(f"{type(e).__name__}: {e}")
            out["latencies"].append(time.perf_counter() - t0)
            await asyncio.sleep(0.1)


async def settle(url: str, timeout: float = 60.0) -> dict:
    """Waits until no slot is busy and nothing is queued; returns the last /health body."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        t0 = time.monotonic()
        while True:
            h = (await c.get("/health")).json()
            if (not h["busy"] and not h["queued"]) or time.monotonic() - t0 > timeout:
                return h
            await asyncio.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (nan when empty)."""
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))] if v else float("nan")


# --- the phases --------------------------------------------------------------------------------------------
def random_spec(rng: random.Random) -> dict:
    temperature, seed = (0.0, None) if rng.random() < 0.5 else (0.8, rng.randrange(1 << 30))
    return {"kind": rng.choice(("chat", "completion")), "prompt": rng.choice(PROMPTS), "stream": rng.random() < 0.5,
            "max_tokens": rng.randint(8, 32), "temperature": temperature, "seed": seed}


async def load_phase(args, log_dir: str) -> bool:
    rng = random.Random(1234)
    refs = [dict(random_spec(rng), temperature=0.0, seed=None) for _ in range(8)]
    refs += [dict(random_spec(rng), temperature=0.8, seed=1000 + i) for i in range(4)]
    specs = []
    n_ref = min(len(refs) * 3, args.requests // 4)
    for i in range(args.requests - n_ref):
        s = random_spec(rng)
        if i < args.requests // 3:           # a third of all requests: read a few events, then hang up
            s.update(stream=True, disconnect_after=rng.randint(1, 3))
        specs.append(s)
    specs += [dict(refs[i % len(refs)], ref=i % len(refs)) for i in range(n_ref)]
    rng.shuffle(specs)

    srv = Server(args.model, args.load_parallel, args, log_dir)
    try:
        await srv.wait_ready()
        rss_idle = srv.rss_mib()
        warm = [random_spec(rng) for _ in range(args.warmup)]       # the load's mix, disconnects included
        for s in warm[::3]:
            s.update(stream=True, disconnect_after=2)
        await run_all(srv.url, warm, args.clients)
        alone = [(await run_all(srv.url, [r], 1))[0][0] for r in refs]         # the references, alone
        await settle(srv.url)
        await asyncio.sleep(2)
        rss_before = srv.rss_mib()
        health = {"latencies": [], "failures": [], "rss": []}
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_health(srv, stop, health))
        results, wall = await run_all(srv.url, specs, args.clients)
        stop.set()
        await poller
        h = await settle(srv.url)
        await asyncio.sleep(args.settle)
        rss_after = srv.rss_mib()
    finally:
        srv.stop()

    pairs = list(zip(specs, results))
    n5xx = [(s, r) for s, r in pairs if (r["status"] or 0) >= 500]
    transport = [(s, r) for s, r in pairs if r["status"] is None]
    other = [(s, r) for s, r in pairs if r["status"] is not None and r["status"] != 200 and r["status"] < 500]
    stream_err = [(s, r) for s, r in pairs if r["status"] == 200 and r["error"]]
    differ = [(s, r) for s, r in pairs if "ref" in s and r["status"] == 200 and r["text"] != alone[s["ref"]]["text"]]
    bad_alone = [r for r in alone if r["status"] != 200]
    mismatch, numeric, decisive = differ, [], True
    if differ and not bad_alone:
        mismatch, numeric, decisive = check_differences(args, refs, alone, differ)
    change = (rss_after - rss_before) / rss_before
    checks = [
        ("5xx responses", len(n5xx), not n5xx),
        ("transport errors", len(transport), not transport),
        ("other non-200 (4xx)", len(other), not other),
        ("error events in streams", len(stream_err), not stream_err),
        ("/health failures", len(health["failures"]), not health["failures"]),
        ("reference requests failing alone", len(bad_alone), not bad_alone),
        (f"cross-talk mismatches (of {n_ref} reference requests)",
         len(mismatch) if decisive else f"{len(mismatch)} (inconclusive)", not mismatch or not decisive),
        ("  answers that differ within the batch variance", len(numeric), True),
        ("RSS after warm-up / after load (MiB)", f"{rss_before:.1f} / {rss_after:.1f} ({change:+.2%})",
         abs(change) <= args.rss_tolerance),
    ]
    print(f"\n== load phase: {len(specs)} requests, {args.clients} clients, -np {args.load_parallel}, "
          f"{wall:.1f} s ==")
    print(f"requests that hang up mid-stream: {sum(1 for s in specs if s.get('disconnect_after'))} sent, "
          f"{sum(r['disconnected'] for r in results)} closed before the end; the server counted (warm-up included) "
          f"{h['served']} served, {h['cancelled']} cancelled")
    took = [r["seconds"] for r in results]
    slowest = max(range(len(specs)), key=lambda i: took[i])
    print(f"request latency p50 {pct(took, .5):.2f} s, p99 {pct(took, .99):.2f} s, slowest {took[slowest]:.2f} s: "
          f"{json.dumps(body_of(specs[slowest]))}")
    lat = health["latencies"]
    rss = health["rss"] or [float("nan")]
    print(f"RSS (MiB): idle after start {rss_idle:.1f}, after {args.warmup} warm-up requests {rss_before:.1f}, "
          f"during the load {min(rss):.1f}-{max(rss):.1f}, after it {rss_after:.1f}")
    print(f"/health polls: {len(lat)}, latency p50 {pct(lat, .5) * 1e3:.1f} ms, p99 {pct(lat, .99) * 1e3:.1f} ms, "
          f"worst {max(lat, default=float('nan')) * 1e3:.1f} ms")
    print(f"{'check':<58} {'value':>28}  ok")
    for name, value, ok in checks:
        print(f"{name:<58} {str(value):>28}  {'yes' if ok else 'NO'}")
    for label, rows in (("5xx", n5xx), ("transport", transport), ("non-200", other), ("stream error", stream_err)):
        for s, r in rows[:5]:
            print(f"  {label}: {json.dumps(body_of(s))} -> {r['status']} {r['error']}")
    for s, r in mismatch[:5]:
        print(f"  mismatch: {json.dumps(body_of(s))}\n    alone: {alone[s['ref']]['text']!r}\n    load:  {r['text']!r}")
    for f in health["failures"][:5]:
        print(f"  /health: {f}")
    return all(ok for _, _, ok in checks)


async def bench_phase(args, log_dir: str) -> None:
    rng = random.Random(99)
    specs = [{"kind": ("chat", "completion")[i % 2], "prompt": f"Request {i}: {rng.choice(PROMPTS)}", "stream": True,
              "max_tokens": args.bench_max_tokens, "temperature": 0.0, "seed": None}
             for i in range(args.bench_requests)]
    warm = [dict(s, prompt=f"Warm-up {i}") for i, s in enumerate(specs[:args.bench_clients])]
    rows = []
    for run_i, np_ in enumerate(int(x) for x in args.bench_order.split(",")):
        srv = Server(args.model, np_, args, log_dir)
        try:
            await srv.wait_ready()
            await run_all(srv.url, warm, args.bench_clients)
            await settle(srv.url)
            results, wall = await run_all(srv.url, specs, args.bench_clients)
        finally:
            srv.stop()
        bad = [r for r in results if r["status"] != 200 or r["error"] or r["ttft"] is None]
        ttft = [r["ttft"] for r in results if r["ttft"] is not None]
        tokens = sum(r["tokens"] for r in results)
        rows.append((run_i + 1, np_, pct(ttft, .5), pct(ttft, .99), tokens, wall, tokens / wall, len(bad),
                     os.getloadavg()[0]))
        print(f"run {run_i + 1}: -np {np_}: {tokens} tokens in {wall:.2f} s", flush=True)
        for s, r in [(s, r) for s, r in zip(specs, results) if r in bad][:3]:
            print(f"  failed: {json.dumps(body_of(s))} -> {r['status']} {r['error']} (text {r['text']!r})")
    print(f"\n== bench phase: {args.bench_requests} streamed requests, {args.bench_clients} clients, max_tokens "
          f"{args.bench_max_tokens}, temperature 0 ==")
    print("| run | -np | TTFT p50 (ms) | TTFT p99 (ms) | completion tokens | wall (s) | tokens/s | failed | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run_i, np_, p50, p99, tokens, wall, tps, nbad, load in rows:
        print(f"| {run_i} | {np_} | {p50 * 1e3:.0f} | {p99 * 1e3:.0f} | {tokens} | {wall:.2f} | {tps:.1f} | {nbad} "
              f"| {load:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf file (default: the tiny seed-0 model, written to a temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--clients", type=int, default=16, help="load phase: concurrent clients")
    ap.add_argument("--requests", type=int, default=300, help="load phase: requests in all")
    ap.add_argument("--load-parallel", type=int, default=4, help="load phase: the server's -np")
    ap.add_argument("--warmup", type=int, default=64,
                    help="load phase: warm-up requests (the load's mix) before RSS is read")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait after the load before RSS")
    ap.add_argument("--rss-tolerance", type=float, default=0.05)
    ap.add_argument("--bench-requests", type=int, default=32)
    ap.add_argument("--bench-clients", type=int, default=8)
    ap.add_argument("--bench-max-tokens", type=int, default=32)
    ap.add_argument("--bench-order", default="1,4,1,4", help="the -np of each bench run, in order")
    ap.add_argument("--phase", choices=("load", "bench", "all"), default="all")
    ap.add_argument("--log-dir", help="keep the server logs here (default: a temp dir, removed)")
    ap.add_argument("--server-log-level", default="warning", help="the server's --log-level (default warning)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsv4-server-load-") as tmp:
        log_dir = args.log_dir or tmp
        os.makedirs(log_dir, exist_ok=True)
        if args.model is None:
            sys.path.insert(0, ROOT)
            from dsv4_ggml.tiny import write_tiny_model
            args.model = os.path.join(tmp, "tiny-seed0.gguf")
            write_tiny_model(args.model, seed=0)
        print(f"model {args.model}, {args.threads} threads, n_ctx {args.ctx}; nproc {os.cpu_count()}, "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        ok = True
        if args.phase in ("load", "all"):
            ok = asyncio.run(load_phase(args, log_dir))
        if args.phase in ("bench", "all"):
            asyncio.run(bench_phase(args, log_dir))
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not ok:
        print("LOAD-PHASE CHECKS FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
