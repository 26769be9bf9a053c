#!/usr/bin/env python3
"""sentence-transformers on PyTorch CUDA, the peer for the GPU figures of
benches/cuda.rs: the same workloads (E1 questions, E2 passages truncated
at 256 tokens), batch sizes and model shapes, timed from text to unit vector
(CrossEncoder: text pairs to scores), medians of 5 after a warm-up, in fp32,
fp16 and bf16.

    python3 scripts/gpu_peers.py MINILM_DIR CROSS_ENCODER_DIR WORKLOADS_DIR
"""
import json
import statistics
import sys
import time

import torch
from sentence_transformers import CrossEncoder, SentenceTransformer

minilm, cross_dir, workloads = sys.argv[1:4]


def texts(name):
    with open(f"{workloads}/{name}") as f:
        return [json.loads(line)["text"] for line in f]


def timed(f, runs=5):
    f()
    torch.cuda.synchronize()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


queries, passages = texts("e1_queries.jsonl"), texts("e2_passages.jsonl")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
print("| figure | value |\n| --- | --- |")
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    model = SentenceTransformer(minilm, device="cuda")
    model.max_seq_length = 256
    model.to(dtype)
    name = str(dtype).replace("torch.", "")
    for batch in (32, 256):
        for label, items, unit in (("E1", queries, "embeddings"), ("E2", passages, "passages")):
            t = timed(lambda: model.encode(items, batch_size=batch, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False))
            print(f"| sentence-transformers {label} {name} batch {batch} | {len(items) / t:.0f} {unit}/s |")
    latencies = []
    for q in queries[:500]:
        start = time.perf_counter()
        model.encode([q], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    print(f"| sentence-transformers E1 {name} single query | p50 {latencies[249] * 1e3:.2f} ms, "
          f"p99 {latencies[494] * 1e3:.2f} ms |")
    ranker = CrossEncoder(cross_dir, device="cuda", max_length=256)
    ranker.model.to(dtype)
    pairs = [("Can I get a refund if my booking is cancelled?", p) for p in passages]
    for batch in (32, 75):
        t = timed(lambda: ranker.predict(pairs, batch_size=batch, show_progress_bar=False))
        print(f"| sentence-transformers CrossEncoder {name} batch {batch} | {len(pairs) / t:.0f} pairs/s |")
