"""PyTorch side of `make bench` and `make bench-gpu`: times full training steps (forward, backward,
AdamW) of the reference model (model.py / moe.py) on the same config, batch and thread count as
`moe bench`, on random tokens; median after warm-up, peak resident memory (and peak CUDA memory
allocated). Prints one JSON object.

    /usr/bin/python3 tests/reference/bench.py CONFIG.yaml --steps 20 --warmup 3 --threads 2 [--set k=v ...]
        [--device cpu|cuda] [--bf16] [--compile]

--device cuda runs on GPU 0 with PyTorch's fused attention (scaled_dot_product_attention) and
fp32 matmuls without TF32 (as our fp32 mode); --bf16 wraps forward and loss in
torch.autocast(bfloat16) (parameters and AdamW stay fp32, as in our bf16 mode); --compile runs the
model through torch.compile (torch >= 2.0; the MoE layer's data-dependent routing makes graph
breaks, which is the reference as it is written). Exit status 3 with one line `error: ...` when
the request cannot be run here (no CUDA in this torch, no torch.compile).
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
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--bf16", action="store_true", help="torch.autocast bfloat16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"error: torch {torch.__version__} here has no usable CUDA (torch.cuda.is_available() is False)",
              file=sys.stderr)
        sys.exit(3)
    if a.compile and not hasattr(torch, "compile"):
        print(f"error: torch {torch.__version__} has no torch.compile (needs torch >= 2.0)", file=sys.stderr)
        sys.exit(3)
    raw = yaml.safe_load(open(a.config)) or {}
    for s in a.set:
        apply_set(raw, s)
    cfg = ref.parse_config(raw)
    threads = a.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    cuda = a.device == "cuda"
    # built on the CPU (its init draws from a CPU generator), then moved
    model = ref.init_from_config(cfg, seed=cfg["train"]["seed"], use_sdpa=cuda).to(dev)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32, as on our side
        torch.backends.cudnn.allow_tf32 = False
        # moe.py makes its index tensors without a device argument: make them on the GPU
        if hasattr(torch, "set_default_device"):
            torch.set_default_device(dev)
        else:
            torch.set_default_tensor_type(torch.cuda.FloatTensor)
    train = cfg["train"]
    opt = make_optimizer(model, train)
    fwd = torch.compile(model) if a.compile else model
    B, T, V = train["batch_size"], cfg["model"]["seq_len"], cfg["model"]["vocab_size"]
    noisy = cfg["model"].get("moe") is not None and cfg["router"]["noise"] != "none"
    gen = torch.Generator(device=dev).manual_seed(1)
    autocast = torch.autocast(device_type=a.device, dtype=torch.bfloat16, enabled=a.bf16)
    times = []
    for s in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(train["grad_accum"]):
            x = torch.randint(0, V, (B, T), device=dev)
            y = torch.randint(0, V, (B, T), device=dev)
            ctx = moe_ref.MoEContext(training=True, step=0,
                                     noise=moe_ref.GeneratorNoise(gen, cfg["router"]["jitter_eps"]) if noisy else None)
            with autocast:
                _, loss = fwd(x, y, ctx=ctx)
                total = loss + ctx.balance_total()
            (total / train["grad_accum"]).backward()
        if train["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
        for g in opt.param_groups:
            g["lr"] = lr_at(s, train)  # same schedule as ours; the value does not change the timing
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        t = (time.perf_counter() - t0) * 1000
        if s >= a.warmup:
            times.append(t)
    times.sort()
    med = times[len(times) // 2]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"config": a.config, "threads": threads, "device": a.device,
                      "dtype": "bf16" if a.bf16 else "fp32", "compile": a.compile, "torch": torch.__version__,
                      "ms_per_step": med, "tokens_per_s": B * T * train["grad_accum"] / (med / 1000),
                      "peak_mb": peak_mb,
                      "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0,
                      "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
