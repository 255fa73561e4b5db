"""PyTorch side of `make bench`: times full training steps (forward, backward, AdamW) of the
reference model (model.py / moe.py) on the same config, batch and thread count as `moe bench`,
on random tokens; median after warm-up, peak resident memory. Prints one JSON object.

    /usr/bin/python3 tests/reference/bench.py CONFIG.yaml --steps 20 --warmup 3 --threads 2 [--set k=v ...]
"""
import argparse
import json
import os
import resource
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as ref  # noqa: E402
import moe as moe_ref  # noqa: E402
from oracle import lr_at, make_optimizer  # noqa: E402


def apply_set(raw, item):
    """`--set a.b.c=value` on the raw YAML dict (the C++ side validates the same overrides)."""
    key, _, value = item.partition("=")
    node = raw
    parts = key.strip().split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = yaml.safe_load(value)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    raw = yaml.safe_load(open(a.config)) or {}
    for s in a.set:
        apply_set(raw, s)
    cfg = ref.parse_config(raw)
    threads = a.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ref.init_from_config(cfg, seed=cfg["train"]["seed"])
    train = cfg["train"]
    opt = make_optimizer(model, train)
    B, T, V = train["batch_size"], cfg["model"]["seq_len"], cfg["model"]["vocab_size"]
    noisy = cfg["model"].get("moe") is not None and cfg["router"]["noise"] != "none"
    gen = torch.Generator().manual_seed(1)
    times = []
    for s in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(train["grad_accum"]):
            x = torch.randint(0, V, (B, T))
            y = torch.randint(0, V, (B, T))
            ctx = moe_ref.MoEContext(training=True, step=0,
                                     noise=moe_ref.GeneratorNoise(gen, cfg["router"]["jitter_eps"]) if noisy else None)
            _, loss = model(x, y, ctx=ctx)
            total = loss + ctx.balance_total()
            (total / train["grad_accum"]).backward()
        if train["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
        for g in opt.param_groups:
            g["lr"] = lr_at(s, train)  # same schedule as ours; the value does not change the timing
        opt.step()
        t = (time.perf_counter() - t0) * 1000
        if s >= a.warmup:
            times.append(t)
    times.sort()
    med = times[len(times) // 2]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"config": a.config, "threads": threads, "ms_per_step": med,
                      "tokens_per_s": B * T * train["grad_accum"] / (med / 1000), "peak_mb": peak_mb,
                      "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
