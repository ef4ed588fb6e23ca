"""Load on `elder serve`: questions per second and latency (p50, p99) with and without a stream of edits, measured in
one run against one server process, and their ratios.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve_load.py --clients 4 --seconds 60 --edits 24

A fresh service (the embedded SmolLM2 and ELDER's `fast` preset unless --model/--method say otherwise) is started
on loopback in a temporary folder; `--clients` threads ask the demo's unrelated prompts and edited capitals one at a
time for `--seconds`, first with no edit arriving, then while `--edits` demo capital edits are submitted one by one
as fast as the server acknowledges them. Every failed request is counted and printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from elder.demo_facts import demo_edits, demo_unrelated_prompts
from elder.serve import spawn


def load(url: str, clients: int, seconds: float, prompts: list[str], tokens: int) -> dict:
    """`clients` threads asking one prompt at a time for `seconds`: answered count, latencies, failures."""
    latencies, failures, lock = [], [], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            i = offset
            while time.perf_counter() < stop:
                start = time.perf_counter()
                response = http.post("/ask", json={"prompts": [prompts[i % len(prompts)]], "max_new_tokens": tokens})
                with lock:
                    (latencies if response.status_code == 200 else failures).append(
                        time.perf_counter() - start if response.status_code == 200 else response.text)
                i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    begun = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begun
    latencies.sort()
    return {"answered": len(latencies), "failed": failures, "qps": len(latencies) / wall,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--method", default="elder")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--edits", type=int, default=24, help="demo capital edits streamed in during the second phase")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per answer")
    args = parser.parse_args()
    edits = demo_edits(args.edits)
    prompts = [e.prompt for e in edits] + demo_unrelated_prompts()
    with tempfile.TemporaryDirectory() as folder:
        options = ["--memory", str(Path(folder) / "memory"), "--method", args.method]
        process, url = spawn(options + (["--model", args.model] if args.model else []))
        try:
            quiet = load(url, args.clients, args.seconds, prompts, args.tokens)
            submitted, edit_failures = [], []

            def stream() -> None:
                with httpx.Client(base_url=url, timeout=300) as http:
                    for edit in edits:
                        response = http.post("/edits", json=edit.to_dict())
                        (submitted if response.status_code == 202 else edit_failures).append(response.json())

            streamer = threading.Thread(target=stream)
            streamer.start()
            busy = load(url, args.clients, args.seconds, prompts, args.tokens)
            streamer.join()
            applied = httpx.get(f"{url}/health").json()["applied_seq"]
        finally:
            process.terminate()
            process.wait(timeout=120)
    print(f"{args.clients} clients, {args.seconds:.0f} s per phase, {args.tokens} new tokens per answer, "
          f"method {args.method}")
    print("| phase | answered | failed | questions/s | p50 s | p99 s |")
    print("|---|---|---|---|---|---|")
    for name, phase in (("no edits arriving", quiet), (f"{len(edits)} edits streamed in", busy)):
        print(f"| {name} | {phase['answered']} | {len(phase['failed'])} | {phase['qps']:.2f} | {phase['p50']:.3f} | "
              f"{phase['p99']:.3f} |")
    print(f"ratios with edits / without: questions/s {busy['qps'] / quiet['qps']:.2f}, p50 "
          f"{busy['p50'] / quiet['p50']:.2f}, p99 {busy['p99'] / quiet['p99']:.2f}")
    print(f"edits acknowledged {len(submitted)}, refused {len(edit_failures)}, applied by the end of the phase "
          f"{applied} of {len(submitted)}")
    for failure in quiet["failed"] + busy["failed"] + edit_failures:
        print("failed:", failure)


if __name__ == "__main__":
    main()
