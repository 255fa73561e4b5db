#!/usr/bin/python3
"""PyTorch oracle for the C++ trainer (llm.c test_gpt2 style). See README.md in this folder.

    /usr/bin/python3 tests/reference/oracle.py --ckpt MODEL.safetensors \
        --batch BATCH.safetensors --out OUT.safetensors [--steps K] [--eval]

BATCH: `inputs`, `targets`, I32 (B, T); for MoE training mode with router noise also
`noise.{s}.{l}` F32 (B*T, E) (gaussian eps) / `jitter.{s}.{l}` F32 (B*T, C) (jitter multiplier)
for step s and MoE layer l. OUT (F32 unless noted):
    loss (1)  logits (B, T, V)                                       # LM loss on step 0
    aux z imp load (1)  total (1)  routed.{l} kept.{l} (E)           # MoE terms and counts
    grad.<param> (param shape)                                       # d total / d param
    losses totals lrs norms (K)  final.<param|buffer>                # with --steps K > 0
Exit status 0 on success; 1 with one line `error: ...` on stderr otherwise.
"""
import argparse
import math
import os
import sys

sys.dont_write_bytecode = True  # keep the source tree clean when the C++ tests call us
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import model as ref  # noqa: E402
import moe as moe_ref  # noqa: E402
import safetensors_io  # noqa: E402

OUT_FORMAT = "moe-oracle-1"


def lr_at(step, train):
    """Learning rate of 0-based step `step`: linear warmup, then cosine from lr to min_lr
    over the remaining train.steps - warmup steps (clamped past the end)."""
    lr, min_lr, warmup, steps = train["lr"], train["min_lr"], train["warmup"], train["steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    ratio = (step - warmup) / max(1, steps - warmup)
    ratio = min(max(ratio, 0.0), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def make_optimizer(model, train):
    """AdamW, weight decay on matrices only: parameters with dim >= 2 that are not biases
    (stacked expert biases are (E, F) but are still biases)."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith(".bias")]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and not n.endswith(".bias"))]
    groups = [{"params": decay, "weight_decay": train["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train["lr"], betas=(train["beta1"], train["beta2"]),
                             eps=1e-8)


def grad_norm(params):
    """Global L2 norm of the gradients, computed the way clip_grad_norm_ does."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)


def load_batch(path, vocab_size, seq_len):
    """Returns inputs, targets (B, T) long and all of the file's tensors (noise included)."""
    tensors, _ = safetensors_io.load(path)
    for name in ("inputs", "targets"):
        if name not in tensors:
            raise ValueError(f"{path}: missing tensor {name}")
    x, y = tensors["inputs"], tensors["targets"]
    for name, t in (("inputs", x), ("targets", y)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{path}: {name} must be I32, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{path}: {name} must be (B, T), got shape {list(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            raise ValueError(f"{path}: {name} has tokens outside [0, {vocab_size})")
    if x.shape != y.shape:
        raise ValueError(f"{path}: inputs {list(x.shape)} and targets {list(y.shape)} differ")
    if x.shape[1] > seq_len:
        raise ValueError(f"{path}: T = {x.shape[1]} exceeds model.seq_len = {seq_len}")
    return x.long(), y.long(), tensors


def check_noise(model, noise, steps, N):
    """Training mode: every noise tensor the run will read must be in the batch file."""
    r = model.cfg["router"]
    kind = {"gaussian": "noise", "jitter": "jitter"}.get(r["noise"])
    if kind is None:
        return
    for s in range(max(1, steps)):
        for l, m in moe_ref.moe_layers(model):
            if kind == "noise":
                noise.gaussian(s, l, N, m.E, torch.float32)
            else:
                mult = noise.jitter(s, l, N, model.cfg["model"]["d_model"], torch.float32)
                eps = r["jitter_eps"]
                if mult.numel() and float((mult - 1.0).abs().max()) > eps + 1e-6:
                    raise ValueError(f"jitter.{s}.{l}: multipliers outside [1 - {eps}, 1 + {eps}]"
                                     " (router.jitter_eps)")


def objective(model, x, y, step, training, noise):
    """One forward: logits, LM loss, the context (MoE records) and the objective
    total = loss + sum over MoE layers of aux + z + imp + load (0 in eval mode)."""
    ctx = moe_ref.MoEContext(training=training, step=step, noise=noise)
    logits, loss = model(x, y, ctx=ctx)
    total = loss + ctx.balance_total()
    return logits, loss, ctx, total


def run(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # nothing random happens; set for good measure
    dtype = torch.float64 if args.fp64 else torch.float32

    model = ref.from_checkpoint(args.ckpt).to(dtype)
    m = model.cfg["model"]
    x, y, batch_tensors = load_batch(args.batch, m["vocab_size"], m["seq_len"])
    training = not args.eval
    noise = moe_ref.FileNoise(batch_tensors, source=args.batch)
    if training:
        check_noise(model, noise, args.steps, x.numel())
    initial = {n: t.detach().clone() for n, t in model.state_tensors().items()}

    out = {}
    # 1. forward + backward of the objective on the loaded weights (step 0's noise).
    model.zero_grad(set_to_none=True)
    logits, loss, ctx, total = objective(model, x, y, 0, training, noise)
    total.backward()
    out["loss"] = loss.detach().float().reshape(1)
    out["logits"] = logits.detach().float()
    for name in moe_ref.MoEContext.TERMS:
        out[name] = torch.as_tensor(ctx.term(name)).detach().float().reshape(1)
    out["total"] = total.detach().float().reshape(1)
    for l, rec in sorted(ctx.layers.items()):
        out[f"routed.{l}"] = rec.routed.float()
        out[f"kept.{l}"] = rec.kept.float()
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)  # e.g. never-used expert
        out["grad." + n] = g.detach().float()

    # 2. K training steps on the same batch, from the same weights, fresh optimizer state.
    if args.steps > 0:
        train = model.cfg["train"]
        with torch.no_grad():
            for n, t in model.state_tensors().items():
                t.copy_(initial[n])
        params = list(model.parameters())
        opt = make_optimizer(model, train)
        losses, totals, lrs, norms = [], [], [], []
        for s in range(args.steps):
            lr = lr_at(s, train)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            _, loss, ctx, total = objective(model, x, y, s, True, noise)
            total.backward()
            for p in params:  # a parameter the step did not reach has gradient 0, not None,
                if p.grad is None:  # so that AdamW still decays it and moves it by its m
                    p.grad = torch.zeros_like(p)
            if train["grad_clip"] > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, train["grad_clip"])
            else:
                norm = grad_norm(params)
            opt.step()
            moe_ref.update_biases(model, ctx)             # aux-loss-free bias, this step's counts
            losses.append(loss.item())
            totals.append(total.item())
            lrs.append(lr)
            norms.append(float(norm))
        out["losses"] = torch.tensor(losses, dtype=torch.float32)
        out["totals"] = torch.tensor(totals, dtype=torch.float32)
        out["lrs"] = torch.tensor(lrs, dtype=torch.float32)
        out["norms"] = torch.tensor(norms, dtype=torch.float32)
        for n, t in model.state_tensors().items():          # parameters and buffers
            t = t.detach()
            out["final." + n] = t.float() if t.is_floating_point() else t.to(torch.int32)

    meta = {"format": OUT_FORMAT, "ckpt": os.path.abspath(args.ckpt),
            "batch": os.path.abspath(args.batch), "steps": str(args.steps),
            "mode": "eval" if args.eval else "train",
            "precision": "fp64" if args.fp64 else "fp32", "torch": torch.__version__}
    safetensors_io.save(args.out, out, meta)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="PyTorch oracle: loss, logits, gradients and K "
                                "AdamW steps of a moe checkpoint on one batch.")
    p.add_argument("--ckpt", required=True, help="model checkpoint (moe-ckpt-1 safetensors)")
    p.add_argument("--batch", required=True, help="safetensors with I32 inputs, targets (B, T)")
    p.add_argument("--out", required=True, help="output safetensors")
    p.add_argument("--steps", type=int, default=0, help="training steps to run (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--fp64", action="store_true",
                   help="compute in float64 (outputs are still F32); default float32")
    p.add_argument("--eval", action="store_true",
                   help="eval mode: no router noise, eval_capacity_factor, Sinkhorn routes as "
                   "plain top-k, no balancing terms (not with --steps)")
    args = p.parse_args(argv)
    if args.eval and args.steps:
        p.error("--eval and --steps do not go together")
    if args.steps < 0:
        p.error("--steps must be >= 0")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    try:
        run(args)
    except (ValueError, OSError, NotImplementedError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
