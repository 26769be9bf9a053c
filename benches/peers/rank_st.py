"""sentence-transformers' CrossEncoder on the workload of benches/rank.rs.

Same folder (target/bench-models/minilm-l6-cross-encoder, written by
`cargo bench --bench rank`), same query and 75 passages, 2 threads. Prints
pairs/s (median of 5 runs of 20 calls) and per-call p50/p99, and the largest
difference to the scores aitl wrote beside the model.

    python benches/peers/rank_st.py
"""

import json
import os
import statistics
import time

import torch

torch.set_num_threads(2)
from sentence_transformers import CrossEncoder  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MODEL = os.path.join(ROOT, "target", "bench-models", "minilm-l6-cross-encoder")
WORKLOADS = os.path.join(ROOT, "..", "shared", "peers", "workloads")


def texts(name):
    with open(os.path.join(WORKLOADS, name), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def main():
    query = texts("e1_queries.jsonl")[0]
    passages = [" ".join(p.split()[:48]) for p in texts("e2_passages.jsonl")[:75]]
    pairs = [(query, p) for p in passages]
    model = CrossEncoder(MODEL, device="cpu")
    scores = model.predict(pairs, batch_size=32)
    aitl_path = os.path.join(MODEL, "aitl_scores.json")
    if os.path.exists(aitl_path):
        with open(aitl_path) as f:
            aitl = json.load(f)
        print(f"max |aitl - sentence-transformers| over {len(pairs)} scores: "
              f"{max(abs(a - b) for a, b in zip(aitl, scores)):.2e}")
    for batch_size in (32, 75):
        rates, latencies = [], []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(20):
                t = time.perf_counter()
                model.predict(pairs, batch_size=batch_size)
                latencies.append(time.perf_counter() - t)
            rates.append(20 * len(pairs) / (time.perf_counter() - started))
        latencies.sort()
        print(f"sentence-transformers CrossEncoder batch {batch_size}: {statistics.median(rates):.0f} pairs/s, "
              f"call p50 {latencies[len(latencies) // 2] * 1e3:.1f} ms, p99 {latencies[int(len(latencies) * .99)] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
