"""PyTorch reference GPT for `moe` (the oracle's model, also used by benchmarks).

The model follows DESIGN.md's conventions exactly:
  * GPT-2: pre-LayerNorm blocks (eps 1e-5), causal multi-head attention on a packed qkv
    projection (c_attn weight (3C, C), rows q | k | v, head h = columns h*hs:(h+1)*hs of each),
    scaled by 1/sqrt(hs), GELU with the tanh approximation, learned position embeddings,
    final LayerNorm, LM head tied to `wte` (logits = x @ wte^T, no bias).
  * loss = mean next-token cross-entropy over all B*T positions.
  * Parameter names are the checkpoint tensor names (`wte`, `wpe`, `h.{l}.ln_1.weight`,
    `h.{l}.attn.c_attn.weight`, `h.{l}.mlp.c_fc.weight`, `ln_f.bias`, ...), so
    `named_parameters()` (plus the MoE buffers `router.expert_bias` and `router.hash_table`)
    maps 1:1 onto a checkpoint's tensors. MoE layers live under `h.{l}.moe.*` (moe.py,
    docs/moe.md).

Config: the YAML schema of DESIGN.md, as nested dicts (`cfg["model"]["d_model"]`), with the
defaults of src/config.h filled in. `model.moe` absent (or null) = dense model.

    model = from_checkpoint("model_00000000.safetensors")      # float32, CPU
    model = init_from_config(parse_config(yaml_text), seed=1337)
    logits, loss = model(idx, targets)                          # idx, targets: (B, T) int
    ctx = moe.MoEContext(training=True, step=0, noise=moe.FileNoise(batch_tensors))
    logits, loss = model(idx, targets, ctx=ctx)                 # MoE: mode, noise, records
    total = loss + ctx.balance_total()                          # the training objective
    save_checkpoint(model, path, step=0)
"""
import copy
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402
import moe as moe_ref  # noqa: E402

CKPT_FORMAT = "moe-ckpt-1"

# Defaults as in src/config.h (the C++ stores the full resolved config in checkpoints, so these
# only matter for hand-written configs).
DEFAULTS = {
    "model": {"vocab_size": 256, "seq_len": 256, "n_layer": 4, "n_head": 4, "d_model": 128,
              "d_ff": 512, "moe": None},
    "router": {"type": "topk", "score": "softmax", "normalize_topk": True, "scale": 1.0,
               "noise": "none", "jitter_eps": 0.01, "groups": 1, "topk_groups": 1,
               "capacity_factor": 0.0, "eval_capacity_factor": 0.0, "drop_policy": "probs",
               "expert_choice_capacity": 1.0, "soft_slots": 1, "hash": "random"},
    "balance": {"aux_loss": 0.0, "aux_scope": "micro_batch", "z_loss": 0.0,
                "importance_loss": 0.0, "load_loss": 0.0, "bias_rate": 0.0,
                "bias_center": False},
    "train": {"batch_size": 8, "grad_accum": 1, "steps": 300, "lr": 3.0e-3, "min_lr": 3.0e-4,
              "warmup": 20, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0,
              "seed": 1337, "eval_every": 50, "eval_batches": 8, "ckpt_every": 100,
              "out_dir": "runs/quickstart", "device": "auto", "dtype": "fp32", "threads": 0},
    "data": {"train": "data/synth/train_*.bin", "val": "data/synth/val_*.bin"},
    "dist": {"expert_parallel": 1},
}
MOE_DEFAULTS = {"every": 1, "first_dense": 0, "experts": 8, "top_k": 2, "expert_ff": 256,
                "activation": "gelu", "shared_experts": 0, "shared_ff": 256}


def _coerce(value, default, where):
    """Converts a YAML value to the type of its default. PyYAML (YAML 1.1) reads `3e-4` (no dot)
    as a string, so numeric strings are accepted for numeric keys."""
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config: {where}: cannot read {value!r} as {type(default).__name__}")
    return value


def _merge(defaults, given, where):
    out = dict(defaults)
    for k, v in (given or {}).items():
        if k in defaults and defaults[k] is not None and v is not None:
            out[k] = _coerce(v, defaults[k], f"{where}.{k}")
        else:
            out[k] = v  # unknown keys are the C++ validator's business; keep them
    return out


def parse_config(src):
    """YAML text (or an already-parsed dict) -> nested dict with defaults filled in."""
    raw = yaml.safe_load(src) if isinstance(src, str) else copy.deepcopy(src)
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError("config: top level must be a mapping")
    cfg = {}
    for sec, d in DEFAULTS.items():
        given = raw.get(sec) or {}
        if not isinstance(given, dict):
            raise ValueError(f"config: {sec} must be a mapping")
        cfg[sec] = _merge(d, given, sec)
    for sec in raw:
        if sec not in cfg:
            cfg[sec] = raw[sec]
    moe = cfg["model"].get("moe")
    if moe is not None:
        if not isinstance(moe, dict):
            raise ValueError("config: model.moe must be a mapping")
        cfg["model"]["moe"] = _merge(MOE_DEFAULTS, moe, "model.moe")
    m = cfg["model"]
    for k in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "d_ff"):
        if m[k] <= 0:
            raise ValueError(f"config: model.{k} must be > 0 (got {m[k]})")
    if m["d_model"] % m["n_head"]:
        raise ValueError(f"config: model.d_model ({m['d_model']}) must be divisible by "
                         f"model.n_head ({m['n_head']})")
    return cfg


def load_config(path):
    with open(path) as f:
        return parse_config(f.read())


def is_moe_layer(cfg, l):
    """Same rule as ModelConfig::is_moe_layer in src/config.h."""
    moe = cfg["model"].get("moe")
    return moe is not None and l >= moe["first_dense"] and (l - moe["first_dense"]) % moe["every"] == 0


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_head, seq_len, use_sdpa=False):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d_model, 3 * d_model)   # weight (3C, C): rows q | k | v
        self.c_proj = nn.Linear(d_model, d_model)
        # SDPA is an opt-in for benchmarks on newer torch; the oracle uses the explicit path.
        self.use_sdpa = use_sdpa and hasattr(F, "scaled_dot_product_attention")
        mask = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, seq_len, seq_len), persistent=False)

    def forward(self, x):                                 # x (B, T, C)
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)          # each (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, NH, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))   # (B, NH, T, T)
            att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v                                    # (B, NH, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    """Dense FFN: c_fc (F, C), GELU (tanh), c_proj (C, F)."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff)
        self.c_proj = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


def build_ffn(cfg, l):
    """The FFN of layer l as (attribute name, module): ("mlp", MLP) for a dense layer, or
    ("moe", moe.MoE) for an MoE layer, whose parameters and buffers are then named as
    DESIGN.md's `h.{l}.moe.*` tensors (router.weight, experts.c_fc.weight (E, Fe, C), ...)."""
    m = cfg["model"]
    if is_moe_layer(cfg, l):
        return "moe", moe_ref.MoE(cfg, l)
    return "mlp", MLP(m["d_model"], m["d_ff"])


class Block(nn.Module):
    def __init__(self, cfg, l, use_sdpa=False):
        super().__init__()
        m = cfg["model"]
        C = m["d_model"]
        self.ln_1 = nn.LayerNorm(C, eps=1e-5)
        self.attn = CausalSelfAttention(C, m["n_head"], m["seq_len"], use_sdpa)
        self.ln_2 = nn.LayerNorm(C, eps=1e-5)
        self.ffn_name, ffn = build_ffn(cfg, l)
        self.add_module(self.ffn_name, ffn)               # registers h.{l}.mlp.* / h.{l}.moe.*

    def forward(self, x, ctx=None):
        x = x + self.attn(self.ln_1(x))
        if self.ffn_name == "moe":
            x = x + self.moe(self.ln_2(x), ctx)
        else:
            x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg, use_sdpa=False, init=True):
        super().__init__()
        cfg = parse_config(cfg)                            # text or dict; fills defaults
        self.cfg = cfg
        m = cfg["model"]
        V, T, C = m["vocab_size"], m["seq_len"], m["d_model"]
        self.wte = nn.Parameter(torch.empty(V, C))         # (V, C); also the LM head
        self.wpe = nn.Parameter(torch.empty(T, C))         # (T, C)
        self.h = nn.ModuleList([Block(cfg, l, use_sdpa) for l in range(m["n_layer"])])
        self.ln_f = nn.LayerNorm(C, eps=1e-5)
        if init:                                           # from_checkpoint skips this
            self.init_weights(seed=cfg["train"]["seed"])

    @torch.no_grad()
    def init_weights(self, seed, token_counts=None):
        """GPT-2 init: N(0, 0.02) weights and embeddings, N(0, 0.02/sqrt(2L)) for the residual
        projections (attn.c_proj, mlp.c_proj, experts/shared c_proj), zero biases, LayerNorm
        weight 1 / bias 0. MoE (docs/moe.md): router weight and slots N(0, 0.02), noise weight
        0, expert bias 0, hash table random (seeded), or frequency-balanced from
        `token_counts` (V,) when router.hash is balanced."""
        g = torch.Generator().manual_seed(int(seed))
        std_res = 0.02 / math.sqrt(2 * self.cfg["model"]["n_layer"])
        for name, p in self.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                p.fill_(1.0)
            elif name.endswith(".bias") or name.endswith("router.noise_weight"):
                p.zero_()
            else:
                std = std_res if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
        for name, b in self.named_buffers():
            if name.endswith("router.expert_bias"):
                b.zero_()
            elif name.endswith("router.hash_table"):
                E = self.cfg["model"]["moe"]["experts"]
                if self.cfg["router"]["hash"] == "balanced":
                    if token_counts is None:
                        raise ValueError("router.hash = balanced needs token_counts")
                    b.copy_(moe_ref.balanced_hash_table(token_counts, E))
                else:
                    b.copy_(torch.randint(0, E, b.shape, generator=g).to(torch.int32))

    def forward(self, idx, targets=None, ctx=None):
        """idx, targets (B, T) integer tensors, T <= seq_len. Returns logits (B, T, V) and the
        mean cross-entropy over all B*T positions (None without targets), the LM loss alone.
        `ctx` (moe.MoEContext) sets the MoE layers' mode and noise and collects their routing
        counts and balancing terms; without one, MoE layers run in eval mode."""
        B, T = idx.shape
        if T > self.wpe.shape[0]:
            raise ValueError(f"sequence length {T} > model.seq_len {self.wpe.shape[0]}")
        idx = idx.long()
        if ctx is None:
            ctx = moe_ref.MoEContext(training=False)
        ctx.idx = idx
        x = F.embedding(idx, self.wte) + self.wpe[:T]      # (B, T, C)
        for block in self.h:
            x = block(x, ctx)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte)                     # (B, T, V), tied head
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T).long())
        return logits, loss

    # ---- checkpoint tensors ----
    def state_tensors(self):
        """name -> tensor for every checkpoint tensor: the parameters, then the persistent
        buffers (MoE router.expert_bias, router.hash_table); not the attention mask."""
        out = dict(self.named_parameters())
        persistent = set(self.state_dict().keys())
        for n, b in self.named_buffers():
            if n in persistent:
                out[n] = b
        return out

    def checkpoint_tensors(self):
        """name -> detached CPU tensor, the checkpoint's tensors: float32, except the int32
        hash tables."""
        out = {}
        for n, t in self.state_tensors().items():
            dt = torch.float32 if t.is_floating_point() else torch.int32
            out[n] = t.detach().to("cpu", dt).contiguous()
        return out

    @torch.no_grad()
    def load_tensors(self, tensors, source="checkpoint"):
        """Copies checkpoint tensors into the parameters and buffers; every one must be present
        with its exact shape and no tensor may be left over. Floating tensors must be F32 (BF16
        accepted); the hash tables I32 (I64 accepted) with values in [0, experts)."""
        own = self.state_tensors()
        missing = [n for n in own if n not in tensors]
        extra = [n for n in tensors if n not in own]
        if missing or extra:
            raise ValueError(f"{source}: tensors do not match the config's model "
                             f"(missing: {missing[:8]}, unexpected: {extra[:8]})")
        for n, p in own.items():
            t = tensors[n]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{source}: tensor {n} has shape {list(t.shape)}, "
                                 f"expected {list(p.shape)}")
            if p.is_floating_point():
                if not t.is_floating_point():
                    raise ValueError(f"{source}: tensor {n} must be F32, got {t.dtype}")
            else:
                if t.dtype not in (torch.int32, torch.int64):
                    raise ValueError(f"{source}: tensor {n} must be I32, got {t.dtype}")
                E = self.cfg["model"]["moe"]["experts"]
                if t.numel() and (int(t.min()) < 0 or int(t.max()) >= E):
                    raise ValueError(f"{source}: tensor {n} has experts outside [0, {E})")
            p.copy_(t.to(p.dtype))


def init_from_config(cfg, seed=None, use_sdpa=False, token_counts=None):
    """A freshly initialised float32 GPT; `cfg` is YAML text or a (parsed) dict. `seed`
    defaults to train.seed; `token_counts` (V,) builds a balanced hash table."""
    model = GPT(cfg, use_sdpa=use_sdpa, init=False)
    model.init_weights(model.cfg["train"]["seed"] if seed is None else seed, token_counts)
    if isinstance(cfg, str):
        model.config_text = cfg
    return model


def from_checkpoint(path, use_sdpa=False):
    """Loads one of our checkpoints (metadata format moe-ckpt-1, config YAML in
    __metadata__["config"]) into a float32 CPU GPT. The metadata is kept in model.metadata."""
    tensors, meta = safetensors_io.load(path)
    if meta.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: __metadata__.format is {meta.get('format')!r}, "
                         f"expected {CKPT_FORMAT!r}")
    if "config" not in meta:
        raise ValueError(f"{path}: __metadata__ has no config")
    model = GPT(meta["config"], use_sdpa=use_sdpa, init=False)
    model.load_tensors(tensors, source=path)
    model.metadata = meta
    model.config_text = meta["config"]
    return model


def save_checkpoint(model, path, step=0, config_text=None):
    """Writes the model as one of our checkpoints (float32 tensors, moe-ckpt-1 metadata)."""
    if config_text is None:
        config_text = getattr(model, "config_text", None) or yaml.safe_dump(model.cfg, sort_keys=False)
    meta = {"format": CKPT_FORMAT, "config": config_text, "step": str(int(step))}
    safetensors_io.save(path, model.checkpoint_tensors(), meta)
