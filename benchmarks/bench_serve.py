"""`llama3-mini serve` under concurrent load: N clients (the official `openai` client, one
per thread, N = 1, 8, 32) on the loopback against one server process and its bounded queue,
each asking `--requests` questions about a story in turn (streamed and not, alternately).
Every request must be answered or refused with 429: none lost, none hung past `--timeout`.
Prints, per N, the answered and refused counts, p50/p95 latency of the answered requests and
the tokens per second the server made, with its ratio to one client's.

    .venv/bin/python benchmarks/bench_serve.py [--clients 1 8 32] [--requests 4]
        [--max-queue 16] [--checkpoint FOLDER] [--threads 1]

The server is `llama3-mini serve` in a child process (the shipped qa-full fine-tune unless
--checkpoint), so the clients' threads do not share its interpreter."""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from llama3_mini.finetune import make_qa


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(opts, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "llama3_mini", "serve", "--port", str(port),
               "--max-queue", str(opts.max_queue), "--device", "cpu", "--model-id", "bench"]
    if opts.checkpoint:
        command += ["--checkpoint", opts.checkpoint]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}: run {command}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).raise_for_status()
            return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not answer within 120 s")


def one_request(client, messages, stream: bool, max_tokens: int):
    """(outcome, seconds, completion tokens): outcome 'ok', '429' or the error's name."""
    start = time.perf_counter()
    try:
        if stream:
            chunks = list(client.chat.completions.create(
                model="bench", messages=messages, temperature=0, max_tokens=max_tokens,
                stream=True, stream_options={"include_usage": True}))
            tokens = chunks[-1].usage.completion_tokens
        else:
            r = client.chat.completions.create(model="bench", messages=messages,
                                               temperature=0, max_tokens=max_tokens)
            tokens = r.usage.completion_tokens
        return "ok", time.perf_counter() - start, tokens
    except openai.RateLimitError:
        return "429", time.perf_counter() - start, 0
    except Exception as e:  # noqa: BLE001 - a lost or hung request, counted and named
        return type(e).__name__, time.perf_counter() - start, 0


def run_clients(base_url: str, n: int, opts, dialogs) -> tuple[list, float]:
    def client_loop(i):
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                           timeout=opts.timeout) as client:
            return [one_request(client, dialogs[(i + k) % len(dialogs)], (i + k) % 2 == 1,
                                opts.max_tokens) for k in range(opts.requests)]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        results = [r for rs in pool.map(client_loop, range(n)) for r in rs]
    return results, time.perf_counter() - start


def percentile(values, q):
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a request may take before it counts as hung")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--threads", type=int, default=1, help="the server's CPU threads")
    opts = parser.parse_args(argv)
    dialogs = [e.dialog() for e in make_qa(16, seed=123)]  # stories the fine-tune never saw
    port = free_port()
    server = start_server(opts, port)
    base_url = f"http://127.0.0.1:{port}/v1"
    rows, lost = [], 0
    try:
        run_clients(base_url, 1, opts, dialogs[:1])  # warm-up
        for n in opts.clients:
            results, seconds = run_clients(base_url, n, opts, dialogs)
            ok = [r for r in results if r[0] == "ok"]
            refused = sum(r[0] == "429" for r in results)
            other = [r[0] for r in results if r[0] not in ("ok", "429")]
            lost += len(other)
            latency = [r[1] for r in ok]
            rows.append((n, len(results), len(ok), refused, other,
                         percentile(latency, 50) if ok else float("nan"),
                         percentile(latency, 95) if ok else float("nan"),
                         sum(r[2] for r in ok) / seconds))
    finally:
        server.terminate()
        server.wait(timeout=30)
    base = rows[0][7]
    print(f"bench_serve: {opts.requests} requests per client, max_queue {opts.max_queue}, "
          f"max_tokens {opts.max_tokens}, server on {opts.threads} CPU thread(s)")
    print(f"{'clients':>7} | {'sent':>4} | {'answered':>8} | {'429':>4} | {'lost':>4} | "
          f"{'p50 s':>6} | {'p95 s':>6} | {'tokens/s':>8} | {'vs 1':>5}")
    for n, sent, ok, refused, other, p50, p95, rate in rows:
        print(f"{n:>7} | {sent:>4} | {ok:>8} | {refused:>4} | {len(other):>4} | {p50:>6.2f} | "
              f"{p95:>6.2f} | {rate:>8.1f} | {rate / base:>5.2f}")
        if other:
            print(f"        lost or failed: {sorted(set(other))}")
    print("Latency counts answered requests only (a 429 comes back at once). Timings on a "
          "shared, busy machine vary from run to run.")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
