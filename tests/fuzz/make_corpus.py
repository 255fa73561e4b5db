#!/usr/bin/env python3
"""Writes the seed corpora under tests/fuzz/corpus/<target>/: small valid inputs and slightly
broken ones. Run from the repository root; the output is committed, so this only needs to run
again when a format changes. Standard library only."""
import json, os, struct, shutil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None, pad=True):
    """tensors: [(name, dtype, shape, raw bytes)] laid out in order."""
    header, off, data = {}, 0, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def f32(*v): return struct.pack("<%df" % len(v), *v)
def i32(*v): return struct.pack("<%di" % len(v), *v)
def bf16(*v): return b"".join(struct.pack("<f", x)[2:] for x in v)


# ---- safetensors
good = safetensors([("a", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6)), ("b", "I32", [4], i32(0, 1, -1, 7)),
                    ("c", "BF16", [2, 2], bf16(1, -2, 0.5, 3)), ("e", "F32", [0, 5], b"")],
                   {"format": "moe-ckpt-1", "step": "3"})
put("safetensors", "valid", good)
put("safetensors", "valid_empty", safetensors([]))
put("safetensors", "valid_scalar", safetensors([("s", "F32", [], f32(2.5))], {}))
put("safetensors", "truncated", good[:-5])
put("safetensors", "trailing", good + b"\0\0\0\0")
bad = json.loads(good[8:8 + struct.unpack("<Q", good[:8])[0]])
bad["b"]["data_offsets"] = [0, 16]
text = json.dumps(bad).encode()
put("safetensors", "overlap", struct.pack("<Q", len(text)) + text + good[8 + struct.unpack("<Q", good[:8])[0]:])
put("safetensors", "bad_json", struct.pack("<Q", 12) + b'{"a": {"dty' + b"\0" * 8)
put("safetensors", "huge_header", struct.pack("<Q", 1 << 62) + b"{}")
put("safetensors", "zero_dims", safetensors([("z", "F32", [1 << 40, 1 << 40, 0], b"")]))

# ---- shards: 256 x int32 header (magic, version, count), then uint16 tokens
def shard(tokens, magic=20240520, version=1, count=None):
    h = [0] * 256
    h[0], h[1], h[2] = magic, version, len(tokens) if count is None else count
    return struct.pack("<256i", *h) + struct.pack("<%dH" % len(tokens), *tokens)

toks = [(i * 7) % 64 for i in range(24)]
put("shard", "valid", shard(toks))
put("shard", "valid_empty", shard([]))
put("shard", "bad_magic", shard(toks, magic=20240326))
put("shard", "bad_version", shard(toks, version=2))
put("shard", "truncated", shard(toks)[:-3])
put("shard", "count_too_small", shard(toks, count=10))
put("shard", "negative_count", shard(toks, count=-1))
put("shard", "short_header", shard(toks)[:100])

# ---- llm.c GPT-2 checkpoints (and our dense safetensors, the other format upcycle reads)
def llmc(maxT, V, L, NH, C, Vp, version=3, cut=0, extra=b""):
    h = [0] * 256
    h[:8] = [20240326, version, maxT, V, L, NH, C, Vp]
    per_layer = C + C + 3 * C * C + 3 * C + C * C + C + C + C + 4 * C * C + 4 * C + 4 * C * C + C
    n = Vp * C + maxT * C + L * per_layer + 2 * C
    vals = [((i * 37) % 11 - 5) / 8 for i in range(n)]
    body = f32(*vals) if version == 3 else bf16(*vals)
    out = struct.pack("<256i", *h) + body + extra
    return out[:len(out) - cut] if cut else out

put("llmc", "valid_fp32", llmc(2, 3, 1, 1, 2, 4))
put("llmc", "valid_bf16", llmc(2, 3, 2, 2, 2, 4, version=5))
put("llmc", "truncated", llmc(2, 3, 1, 1, 2, 4, cut=6))
put("llmc", "trailing", llmc(2, 3, 1, 1, 2, 4, extra=b"\0" * 4))
put("llmc", "bad_version", llmc(2, 3, 1, 1, 2, 4, version=4))
put("llmc", "vp_below_v", llmc(2, 4, 1, 1, 2, 3))
cfg = "model: {vocab_size: 2, seq_len: 1, n_layer: 1, n_head: 1, d_model: 1, d_ff: 1}\n"
names = [("wte", [2, 1]), ("wpe", [1, 1])]
for p in ["ln_1.weight", "ln_1.bias"]: names.append(("h.0." + p, [1]))
names += [("h.0.attn.c_attn.weight", [3, 1]), ("h.0.attn.c_attn.bias", [3]), ("h.0.attn.c_proj.weight", [1, 1]),
          ("h.0.attn.c_proj.bias", [1]), ("h.0.ln_2.weight", [1]), ("h.0.ln_2.bias", [1]),
          ("h.0.mlp.c_fc.weight", [1, 1]), ("h.0.mlp.c_fc.bias", [1]), ("h.0.mlp.c_proj.weight", [1, 1]),
          ("h.0.mlp.c_proj.bias", [1]), ("ln_f.weight", [1]), ("ln_f.bias", [1])]
def numel(s):
    n = 1
    for d in s: n *= d
    return n
dense = [(n, "F32", s, f32(*[0.25] * numel(s))) for n, s in names]
put("llmc", "moe_dense", safetensors(dense, {"format": "moe-ckpt-1", "config": cfg, "step": "1"}))
put("llmc", "moe_dense_is_moe", safetensors(dense, {"format": "moe-ckpt-1", "step": "1",
                                                    "config": cfg + "  moe: {experts: 2, top_k: 1}\n"}))

# ---- YAML configs: the repository's own, and broken ones
repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for rel in ["configs/quickstart.yaml", "configs/dense.yaml", "configs/variants/group_limited.yaml",
            "configs/variants/expert_choice.yaml", "configs/variants/noisy_topk.yaml"]:
    with open(os.path.join(repo, rel), "rb") as f:
        put("config", os.path.basename(rel), f.read())
put("config", "empty", "")
put("config", "flow", "model: {vocab_size: 64, seq_len: 16, n_layer: 1, n_head: 2, d_model: 16, d_ff: 32, "
                      "moe: {experts: 4, top_k: 2}}\nrouter: {type: hash, hash: balanced}\n"
                      "train: {nonfinite: skip, steps: 10}\n")
put("config", "unknown_key", "balance:\n  aux_los: 0.1\n")
put("config", "bad_type", "train:\n  steps: 2.5\n  lr: fast\n")
put("config", "tab", "model:\n\tvocab_size: 64\n")
put("config", "duplicate", "train: {steps: 1}\ntrain: {steps: 2}\n")
put("config", "anchors", "a: &x {steps: 1}\ntrain: *x\n")
put("config", "dotted", "model.n_layer: 4\n")
put("config", "list_top", "- model\n- train\n")
put("config", "quoted", "train: {steps: \"10\", out_dir: 'a: b # c', seed: -5}\n")

# every key once, as config_to_yaml prints a full MoE config (what a checkpoint stores)
ALL_KEYS = """model:
  vocab_size: 256
  seq_len: 16
  n_layer: 1
  n_head: 2
  d_model: 16
  d_ff: 32
  moe:
    every: 1
    first_dense: 0
    experts: 4
    top_k: 2
    expert_ff: 256
    activation: gelu
    shared_experts: 0
    shared_ff: 256
router:
  type: topk
  score: softmax
  normalize_topk: true
  scale: 1.0
  noise: none
  jitter_eps: 0.01
  groups: 1
  topk_groups: 1
  capacity_factor: 0.0
  eval_capacity_factor: 0.0
  drop_policy: probs
  expert_choice_capacity: 1.0
  soft_slots: 1
  hash: random
balance:
  aux_loss: 0.0
  aux_scope: micro_batch
  z_loss: 0.0
  importance_loss: 0.0
  load_loss: 0.0
  bias_rate: 0.0
  bias_center: false
train:
  batch_size: 2
  grad_accum: 1
  steps: 1
  lr: 0.003
  min_lr: 0.0003
  warmup: 1
  weight_decay: 0.1
  beta1: 0.9
  beta2: 0.95
  grad_clip: 1.0
  seed: 1337
  eval_every: 0
  eval_batches: 1
  ckpt_every: 2
  out_dir: "moerun"
  device: auto
  dtype: fp32
  threads: 1
  init_from: ""
  nonfinite: stop
data:
  train: "d/train_*.bin"
  val: "d/val_*.bin"
dist:
  expert_parallel: 1
"""
put("config", "all_keys.yaml", ALL_KEYS)

# ---- --set overrides: one per line, applied to a fixed MoE config
put("set", "valid", "train.steps=50\nrouter.type=expert_choice\nrouter.capacity_factor=0\n"
                    "balance.aux_loss=0\nbalance.z_loss=0\nbalance.load_loss=0\nrouter.noise=none\n")
put("set", "glob", "data.train=data/[ab]*.bin\ndata.val= 'x: y'\n")
put("set", "bad_range", "model.moe.top_k=9\n")
put("set", "malformed", "nonsense\n=5\nmodel=1\ntrain.lr=[1, 2\n")
put("set", "nonfinite", "train.nonfinite=skip\ntrain.lr=1.0e-3\ntrain.seed=-1\n")
put("set", "moe_from_dense", "model.moe.experts=4\nmodel.moe.top_k=1\nrouter.type=hash\n")
# the same keys as overrides: key.path=value, one per line
lines, stack = [], []
for line in ALL_KEYS.splitlines():
    depth = (len(line) - len(line.lstrip())) // 2
    key, _, value = line.strip().partition(":")
    stack[depth:] = [key]
    if value.strip():
        lines.append(".".join(stack) + "=" + value.strip())
put("set", "all_keys", "\n".join(lines) + "\n")
# crashes found by fuzzing, minimised (each also has a doctest in tests/test_hardening.cpp)
put("set", "crash_expert_parallel_0", "dist.expert_parallel=0\n")   # division by zero in validate()
print("wrote", ROOT)
