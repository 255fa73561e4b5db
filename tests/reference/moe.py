"""PyTorch reference MoE FFN layer for `moe` (the oracle's MoE), exactly as docs/moe.md.

One `MoE` module replaces the dense FFN of every layer with `is_moe_layer(l)`; registered as
`h.{l}.moe` by model.build_ffn, its parameters and buffers carry DESIGN.md's names:

    router.weight (E, C)             topk, sinkhorn, expert_choice (absent for hash and soft)
    router.noise_weight (E, C)       router.noise == gaussian
    router.slots (C, E*p)            soft
    router.expert_bias (E)  buffer   balance.bias_rate > 0 (not trained; updated after a step)
    router.hash_table (V)   buffer   hash, int32
    experts.c_fc.weight (E, Fe, C)   swiglu: (E, 2*Fe, C), gate rows first
    experts.c_fc.bias (E, Fe)        swiglu: (E, 2*Fe)
    experts.c_proj.weight (E, C, Fe) experts.c_proj.bias (E, C)
    shared.*                         the same with S = shared_experts, Fs = shared_ff (S > 0)

This is a reference: it is written for clarity (explicit per-expert loops over explicit
assignment lists), autograd provides every gradient. What must carry no gradient is detached
explicitly: the selection scores (s + b, the Sinkhorn matrix), the selection itself, the
capacity ranking, the aux loss's f_i, the load loss's threshold and the bias.

Mode and noise come from a `MoEContext` passed down by GPT.forward: training mode uses the
gaussian/jitter noise that the context's noise source gives (the oracle reads it from the batch
file, it never draws random numbers), capacity_factor, Sinkhorn and the balancing terms;
eval mode uses none of the noise, eval_capacity_factor, plain top-k for sinkhorn and no
balancing terms. Each layer's results (routed/kept counts, the four balancing terms) are
recorded in the context under the transformer layer index.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TOKEN_CHOICE = ("topk", "sinkhorn")
ROUTERS = ("topk", "sinkhorn", "expert_choice", "hash", "soft")
SINKHORN_MAX_ITERS = 100
SINKHORN_TOL = 1e-4


# ----------------------------------------------------------------------------------------------
# context: mode, noise, per-layer records


class FileNoise:
    """Noise read from tensors (the oracle's BATCH file): `noise.{s}.{l}` (N, E) holds eps for
    gaussian noise and `jitter.{s}.{l}` (N, C) the jitter multiplier m, at training step s and
    transformer layer l, rows in (b, t) row-major order (n = b*T + t)."""

    def __init__(self, tensors, source="batch"):
        self.tensors = tensors
        self.source = source

    def _get(self, name, shape, dtype):
        if name not in self.tensors:
            raise ValueError(f"{self.source}: missing tensor {name} (needed in training mode)")
        t = self.tensors[name]
        if not t.is_floating_point():
            raise ValueError(f"{self.source}: {name} must be F32, got {t.dtype}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.source}: {name} has shape {list(t.shape)}, "
                             f"expected {list(shape)}")
        return t.to(dtype)

    def gaussian(self, step, layer, N, E, dtype):
        return self._get(f"noise.{step}.{layer}", (N, E), dtype)

    def jitter(self, step, layer, N, C, dtype):
        return self._get(f"jitter.{step}.{layer}", (N, C), dtype)


class GeneratorNoise:
    """Noise drawn from a torch.Generator (for users other than the oracle, e.g. benchmarks)."""

    def __init__(self, generator, jitter_eps):
        self.g = generator
        self.jitter_eps = jitter_eps

    def gaussian(self, step, layer, N, E, dtype):
        return torch.randn((N, E), generator=self.g, dtype=torch.float64).to(dtype)

    def jitter(self, step, layer, N, C, dtype):
        u = torch.rand((N, C), generator=self.g, dtype=torch.float64)
        return (1.0 - self.jitter_eps + 2.0 * self.jitter_eps * u).to(dtype)


class LayerRecord:
    """What one MoE layer's forward produced: routed/kept counts per expert (float tensors,
    no gradient) and the four balancing terms (scalar tensors, coefficient included, with
    gradient; exactly 0 when off)."""

    def __init__(self, routed, kept, aux, z, imp, load):
        self.routed, self.kept = routed, kept
        self.aux, self.z, self.imp, self.load = aux, z, imp, load


class MoEContext:
    """Passed to GPT.forward(idx, targets, ctx=...). `training` selects the mode; `step` is the
    training step whose noise is used; `noise` is a FileNoise/GeneratorNoise (needed in
    training mode when router.noise is gaussian or jitter). After the forward, `layers` maps
    each MoE layer's transformer index to its LayerRecord."""

    TERMS = ("aux", "z", "imp", "load")

    def __init__(self, training=False, step=0, noise=None):
        self.training = bool(training)
        self.step = int(step)
        self.noise = noise
        self.idx = None          # (B, T) token ids, set by GPT.forward (the hash router reads them)
        self.layers = {}

    def term(self, name):
        """Sum over MoE layers of one balancing term (a scalar tensor, 0.0 without layers)."""
        vals = [getattr(r, name) for _, r in sorted(self.layers.items())]
        return sum(vals) if vals else torch.zeros(())

    def balance_total(self):
        return sum(self.term(n) for n in self.TERMS)


# ----------------------------------------------------------------------------------------------
# helpers


def topk_lower_index_first(values, k):
    """Indices (N, k) of the k largest entries of each row of `values` (N, E), largest first,
    ties to the lower index. torch.topk does not promise any tie order, so this is a stable
    ascending sort of -values."""
    order = torch.sort(-values, dim=1, stable=True).indices
    return order[:, :k]


def capacity(cf, k, N, E):
    """ceil(cf * k * N / E), evaluated in double left to right."""
    return int(math.ceil(float(cf) * k * N / E))


def cv_squared(v):
    """CV^2 = var / mean^2 with the population variance (divide by len(v)); 0 when the mean is
    0 (never with positive scores)."""
    mean = v.mean()
    if float(mean) == 0.0:
        return v.sum() * 0.0
    var = ((v - mean) ** 2).mean()
    return var / mean ** 2


def normal_cdf(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def sinkhorn(z):
    """The Sinkhorn-balanced matrix of docs/moe.md step 7, from logits z (N, E), no gradient.
    Computed in float64 whatever the model's precision, returned in z's dtype (the selection
    then ranks those values). P = exp(z - max z) with the max taken per token (row), so that
    no row can underflow; then at most 100 times: measure err = mean over columns of
    |colsum * E / N - 1| and stop if err < 1e-4, else scale every column to sum N/E, then
    every row to sum 1."""
    dtype = z.dtype
    z = z.detach().to(torch.float64)
    N, E = z.shape
    P = torch.exp(z - z.max(dim=1, keepdim=True).values)
    for _ in range(SINKHORN_MAX_ITERS):
        colsum = P.sum(dim=0)                                   # (E,)
        err = (colsum * E / N - 1.0).abs().mean()
        if float(err) < SINKHORN_TOL:
            break
        P = P * ((N / E) / colsum).unsqueeze(0)                 # columns sum to N/E
        P = P / P.sum(dim=1, keepdim=True)                      # rows sum to 1
    return P.to(dtype)


def balanced_hash_table(counts, E):
    """Frequency-balanced hash table: token ids sorted by count (descending, ties by lower id),
    each assigned to the expert with the smallest accumulated count so far (ties: lower
    expert). counts: (V,) integer token counts. Returns int32 (V,)."""
    counts = [int(c) for c in counts]
    order = sorted(range(len(counts)), key=lambda v: (-counts[v], v))
    load = [0] * E
    table = [0] * len(counts)
    for v in order:
        e = min(range(E), key=lambda i: (load[i], i))
        table[v] = e
        load[e] += counts[v]
    return torch.tensor(table, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# modules


class StackedLinear(nn.Module):
    """n independent linear maps: weight (n, out, in), bias (n, out)."""

    def __init__(self, n, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(n, d_out))

    def forward(self, i, x):                                  # x (M, in) -> (M, out)
        return F.linear(x, self.weight[i], self.bias[i])


class ExpertFFNs(nn.Module):
    """n FFN experts: FFN_i(v) = c_proj_i(act(c_fc_i(v))); act = GELU (tanh), or SwiGLU with
    c_fc width 2F, act(h) = silu(h[:F]) * h[F:] (gate rows first)."""

    def __init__(self, n, d_model, d_ff, activation):
        super().__init__()
        self.n, self.d_ff, self.activation = n, d_ff, activation
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.c_fc = StackedLinear(n, d_model, width)
        self.c_proj = StackedLinear(n, d_ff, d_model)

    def forward(self, i, x):                                  # x (M, C) -> (M, C)
        h = self.c_fc(i, x)
        if self.activation == "swiglu":
            a = F.silu(h[:, :self.d_ff]) * h[:, self.d_ff:]
        else:
            a = F.gelu(h, approximate="tanh")
        return self.c_proj(i, a)


class Router(nn.Module):
    """Holds the router's parameters and buffers (names as in the checkpoint); the routing
    itself is in MoE.forward."""

    def __init__(self, cfg):
        super().__init__()
        mo, r, b = cfg["model"]["moe"], cfg["router"], cfg["balance"]
        C, E, V = cfg["model"]["d_model"], mo["experts"], cfg["model"]["vocab_size"]
        if r["type"] not in ("hash", "soft"):
            self.weight = nn.Parameter(torch.zeros(E, C))
        if r["noise"] == "gaussian":
            self.noise_weight = nn.Parameter(torch.zeros(E, C))
        if r["type"] == "soft":
            self.slots = nn.Parameter(torch.zeros(C, E * r["soft_slots"]))
        if b["bias_rate"] > 0:
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        if r["type"] == "hash":
            self.register_buffer("hash_table", torch.zeros(V, dtype=torch.int32))


def validate_moe_config(cfg):
    """Raises ValueError for MoE settings the oracle cannot give a meaning to (most are also
    rejected by the C++ config validator)."""
    mo, r, b = cfg["model"]["moe"], cfg["router"], cfg["balance"]
    E, k = mo["experts"], mo["top_k"]
    if r["type"] not in ROUTERS:
        raise ValueError(f"config: router.type {r['type']!r} is not one of {ROUTERS}")
    if r["score"] not in ("softmax", "sigmoid"):
        raise ValueError(f"config: router.score {r['score']!r}")
    if r["noise"] not in ("none", "gaussian", "jitter"):
        raise ValueError(f"config: router.noise {r['noise']!r}")
    if mo["activation"] not in ("gelu", "swiglu"):
        raise ValueError(f"config: model.moe.activation {mo['activation']!r}")
    if b["aux_scope"] not in ("micro_batch", "sequence", "global"):
        raise ValueError(f"config: balance.aux_scope {b['aux_scope']!r}")
    if r["drop_policy"] not in ("probs", "position"):
        raise ValueError(f"config: router.drop_policy {r['drop_policy']!r}")
    if not 1 <= k <= E:
        raise ValueError(f"config: model.moe.top_k = {k} must be in [1, {E}]")
    if r["groups"] < 1 or E % r["groups"]:
        raise ValueError(f"config: router.groups = {r['groups']} must divide {E} experts")
    if not 1 <= r["topk_groups"] <= r["groups"]:
        raise ValueError("config: router.topk_groups must be in [1, router.groups]")
    if k > r["topk_groups"] * (E // r["groups"]):
        raise ValueError("config: model.moe.top_k exceeds the experts of router.topk_groups groups")
    if r["groups"] > 1 and r["type"] != "topk":
        raise ValueError("config: router.groups > 1 needs router.type = topk")
    if r["noise"] != "none" and r["type"] not in TOKEN_CHOICE:
        raise ValueError("config: router.noise needs router.type topk or sinkhorn")
    if b["bias_rate"] > 0 and r["type"] not in TOKEN_CHOICE:
        raise ValueError("config: balance.bias_rate > 0 needs router.type topk or sinkhorn")
    if r["type"] == "hash" and k != 1:
        raise ValueError(f"config: router.type = hash needs model.moe.top_k = 1, got {k}")
    if r["soft_slots"] < 1:
        raise ValueError("config: router.soft_slots must be >= 1")


class MoE(nn.Module):
    """The MoE FFN of transformer layer `layer`: forward(x (B, T, C), ctx) -> y (B, T, C),
    the FFN output (the block adds the residual)."""

    def __init__(self, cfg, layer):
        super().__init__()
        validate_moe_config(cfg)
        self.cfg = cfg
        self.layer = layer
        mo = cfg["model"]["moe"]
        C = cfg["model"]["d_model"]
        self.E, self.k = mo["experts"], mo["top_k"]
        self.router = Router(cfg)
        self.experts = ExpertFFNs(self.E, C, mo["expert_ff"], mo["activation"])
        if mo["shared_experts"] > 0:
            self.shared = ExpertFFNs(mo["shared_experts"], C, mo["shared_ff"], mo["activation"])
        else:
            self.shared = None

    # ---- forward ----

    def forward(self, x, ctx):
        B, T, C = x.shape
        N = B * T
        r = self.cfg["router"]
        xf = x.reshape(N, C)                                   # row n = b*T + t
        rtype = r["type"]
        if rtype == "soft":
            y, rec = self._soft(x)
            y = y.reshape(N, C)
        else:
            if rtype == "hash":
                tok, exp, gate, kept, rec = self._hash(ctx, N, x.dtype)
            elif rtype == "expert_choice":
                tok, exp, gate, kept, rec = self._expert_choice(xf, ctx, B, T)
            else:
                tok, exp, gate, kept, rec = self._token_choice(xf, ctx, B, T)
            y = self._dispatch_combine(xf, tok, exp, gate, kept)
        if self.shared is not None:
            for j in range(self.shared.n):
                y = y + self.shared(j, xf)                      # gate 1, every token
        ctx.layers[self.layer] = rec
        return y.reshape(B, T, C)

    def _dispatch_combine(self, xf, tok, exp, gate, kept):
        """y[n] = sum over kept assignments a = (n, e) of gate[a] * FFN_e(x[n]). A dropped
        assignment is simply not in the sum: it contributes exactly 0 and its gate gets no
        gradient."""
        y = torch.zeros_like(xf)
        for e in range(self.E):
            mine = (exp == e) & kept
            rows = tok[mine]
            if rows.numel() == 0:
                continue
            out = self.experts(e, xf[rows]) * gate[mine].unsqueeze(1)
            y = y.index_add(0, rows, out.to(y.dtype))   # bf16 autocast (bench.py --bf16): sum in y's dtype
        return y

    def _counts(self, exp, mask=None):
        """Assignments per expert (float, (E,))."""
        if mask is not None:
            exp = exp[mask]
        return torch.bincount(exp, minlength=self.E).to(torch.float64)

    # ---- token choice: topk, sinkhorn ----

    def _scores(self, z):
        return F.softmax(z, dim=1) if self.cfg["router"]["score"] == "softmax" else torch.sigmoid(z)

    def _token_choice(self, xf, ctx, B, T):
        r = self.cfg["router"]
        N, C = xf.shape
        E, k = self.E, self.k
        train = ctx.training

        # 1. jitter: the router sees x * m, the experts the plain x
        x_r = xf
        if train and r["noise"] == "jitter":
            x_r = xf * self._noise(ctx).jitter(ctx.step, self.layer, N, C, xf.dtype)
        # 2. logits, noisy top-k
        z_clean = F.linear(x_r, self.router.weight)            # (N, E)
        std = None
        z = z_clean
        if train and r["noise"] == "gaussian":
            std = F.softplus(F.linear(x_r, self.router.noise_weight))
            eps = self._noise(ctx).gaussian(ctx.step, self.layer, N, E, xf.dtype)
            z = z_clean + eps * std
        # 3. scores
        s = self._scores(z)                                     # (N, E)
        # 4. selection scores (no gradient)
        if r["type"] == "sinkhorn" and train:
            sel = sinkhorn(z)                                   # the bias plays no part
        else:
            sel = s.detach().clone()
            if hasattr(self.router, "expert_bias"):
                sel = sel + self.router.expert_bias.to(sel.dtype).unsqueeze(0)
        if r["groups"] > 1:
            sel = self._group_mask(sel)
        # 5. top-k, ties to the lower expert index
        choice = topk_lower_index_first(sel, k)                 # (N, k)
        # 6. gates from s
        w = s.gather(1, choice)                                 # (N, k)
        if r["normalize_topk"]:
            w = w / w.sum(dim=1, keepdim=True)
        w = w * r["scale"]
        # assignments in (n, j) order
        tok = torch.arange(N).repeat_interleave(k)              # (N*k,)
        exp = choice.reshape(-1)
        gate = w.reshape(-1)
        # capacity
        cf = r["capacity_factor"] if train else r["eval_capacity_factor"]
        kept = torch.ones(N * k, dtype=torch.bool)
        if cf > 0:
            kept = self._apply_capacity(exp, gate.detach(), capacity(cf, k, N, E), r["drop_policy"])

        routed = self._counts(exp)
        rec = LayerRecord(routed, self._counts(exp, kept), *self._zero_terms(xf))
        if train:
            self._balancing_terms(rec, z, z_clean, std, s, choice, B, T)
        return tok, exp, gate, kept, rec

    def _group_mask(self, sel):
        """Group-limited routing: experts split into G contiguous groups of E/G (group g =
        experts [g*E/G, (g+1)*E/G)); a group's score is the sum of its top max(1, k //
        topk_groups) selection scores; the best topk_groups groups are kept (ties: lower group);
        the other experts get -inf so that top-k never picks them."""
        r = self.cfg["router"]
        N, E = sel.shape
        G, keep = r["groups"], r["topk_groups"]
        per = E // G
        m = max(1, self.k // keep)
        grouped = sel.reshape(N, G, per)
        top_in_group = torch.sort(grouped, dim=2, descending=True).values[:, :, :m]
        group_score = top_in_group.sum(dim=2)                   # (N, G)
        best = topk_lower_index_first(group_score, keep)        # (N, keep)
        allowed = torch.zeros(N, G, dtype=torch.bool)
        allowed.scatter_(1, best, True)
        allowed = allowed.repeat_interleave(per, dim=1)         # (N, E)
        return sel.masked_fill(~allowed, float("-inf"))

    def _apply_capacity(self, exp, gate, cap, policy):
        """Expert e keeps at most `cap` of its assignments: `probs` the ones with the largest
        gate (ties: earlier position in (n, j) order), `position` the earliest in (n, j)
        order. Returns the kept mask."""
        kept = torch.zeros(exp.shape[0], dtype=torch.bool)
        for e in range(self.E):
            mine = torch.nonzero(exp == e).flatten()            # ascending = (n, j) order
            if policy == "probs":
                order = torch.sort(-gate[mine], stable=True).indices
                mine = mine[order]
            kept[mine[:cap]] = True
        return kept

    def _zero_terms(self, xf):
        z0 = xf.new_zeros(())
        return z0, z0, z0, z0

    def _balancing_terms(self, rec, z, z_clean, std, s, choice, B, T):
        """aux, z, imp, load (training mode), coefficient included; 0 when off."""
        bal = self.cfg["balance"]
        N, k = choice.shape
        if bal["aux_loss"] > 0:
            rec.aux = bal["aux_loss"] * self._aux(s, choice.reshape(-1),
                                                  torch.arange(N).repeat_interleave(k), B, T)
        if bal["z_loss"] > 0:
            lse = torch.logsumexp(z, dim=1)
            rec.z = bal["z_loss"] * (lse ** 2).mean()
        if bal["importance_loss"] > 0:
            rec.imp = bal["importance_loss"] * cv_squared(s.sum(dim=0))
        if bal["load_loss"] > 0 and std is not None:            # needs gaussian noise, else 0
            rec.load = bal["load_loss"] * cv_squared(self._load(z, z_clean, std, k))
        return rec

    @staticmethod
    def _fractions(counts):
        """f_i = count_i / sum_j count_j (0 if nothing was selected): for token choice the sum
        is k * tokens, so this is docs/moe.md's count_i / (k N); for expert choice it is the
        share of the selected (token, expert) pairs."""
        total = counts.sum()
        return counts / total if float(total) > 0 else counts * 0.0

    def _aux(self, s, exp, tok, B, T):
        """E * sum_i f_i P_i, f_i the fraction of the selected assignments (before dropping)
        that went to expert i (a constant), P_i = mean s[:, i]; per sequence and averaged over
        the B sequences with aux_scope sequence. `exp`/`tok`: the selected assignments."""
        E = self.E
        if self.cfg["balance"]["aux_scope"] == "sequence":
            total = s.new_zeros(())
            for b in range(B):
                in_seq = (tok >= b * T) & (tok < (b + 1) * T)
                f = self._fractions(self._counts(exp, in_seq)).to(s.dtype)
                P = s[b * T:(b + 1) * T].mean(dim=0)
                total = total + E * (f * P).sum()
            return total / B
        # micro_batch; global == micro_batch here (one micro-batch on one rank)
        f = self._fractions(self._counts(exp)).to(s.dtype)
        P = s.mean(dim=0)
        return E * (f * P).sum()

    def _load(self, z, z_clean, std, k):
        """Load_i = sum_n Phi((z_clean[n,i] - thr[n,i]) / std[n,i]) with thr from
        load_threshold (no gradient); where thr = -inf (k = E) the term is the constant 1."""
        thr = self.load_threshold(z.detach(), k)
        finite = torch.isfinite(thr)
        safe_thr = torch.where(finite, thr, torch.zeros_like(thr))   # no inf/nan in backward
        p = normal_cdf((z_clean - safe_thr) / std)
        p = torch.where(finite, p, torch.ones_like(p))
        return p.sum(dim=0)

    @staticmethod
    def load_threshold(z, k):
        """thr[n, i] = the k-th largest of the noisy logits z[n, j] over j != i, i.e. the
        (k+1)-th largest of z[n, :] if z[n, i] is in its top k, else the k-th largest (by
        value, so ties need no rule); -inf when k = E. A constant (z is detached)."""
        N, E = z.shape
        thr = torch.empty_like(z)
        for i in range(E):
            others = torch.cat([z[:, :i], z[:, i + 1:]], dim=1)     # (N, E-1)
            if k <= E - 1:
                thr[:, i] = torch.sort(others, dim=1, descending=True).values[:, k - 1]
            else:
                thr[:, i] = float("-inf")
        return thr

    def _noise(self, ctx):
        if ctx.noise is None:
            raise ValueError(f"layer {self.layer}: router.noise = {self.cfg['router']['noise']} "
                             "needs a noise source in training mode")
        return ctx.noise

    # ---- expert choice ----

    def _expert_choice(self, xf, ctx, B, T):
        r, bal = self.cfg["router"], self.cfg["balance"]
        N, C = xf.shape
        E = self.E
        z = F.linear(xf, self.router.weight)
        s = self._scores(z)                                     # per token, over experts
        cap = min(N, capacity(r["expert_choice_capacity"], 1, N, E))
        sd = s.detach()
        toks, exps = [], []
        for e in range(E):
            order = torch.sort(-sd[:, e], stable=True).indices  # ties: lower token index
            toks.append(order[:cap])
            exps.append(torch.full((cap,), e, dtype=torch.long))
        tok = torch.cat(toks)
        exp = torch.cat(exps)
        gate = r["scale"] * s[tok, exp]
        kept = torch.ones(tok.shape[0], dtype=torch.bool)
        counts = self._counts(exp)
        rec = LayerRecord(counts, counts.clone(), *self._zero_terms(xf))
        if ctx.training:
            # the balancing terms apply as written (README): aux with f_i = the share of the
            # selected (token, expert) pairs, z, imp; load needs gaussian noise, which expert
            # choice does not allow, so it is 0.
            if bal["aux_loss"] > 0:
                rec.aux = bal["aux_loss"] * self._aux(s, exp, tok, B, T)
            if bal["z_loss"] > 0:
                rec.z = bal["z_loss"] * (torch.logsumexp(z, dim=1) ** 2).mean()
            if bal["importance_loss"] > 0:
                rec.imp = bal["importance_loss"] * cv_squared(s.sum(dim=0))
        return tok, exp, gate, kept, rec

    # ---- hash ----

    def _hash(self, ctx, N, dtype):
        """expert = table[token id], gate 1 (no scale, no gradient); top_k is 1. A token-choice
        router with one choice, so capacity applies as for top-k (every gate is 1, so `probs`
        keeps the earliest, like `position`)."""
        if ctx.idx is None:
            raise ValueError("the hash router needs the token ids")
        r = self.cfg["router"]
        ids = ctx.idx.reshape(-1).long()                        # (N,)
        table = self.router.hash_table.long()
        exp = table[ids]
        tok = torch.arange(N)
        gate = torch.ones(N, dtype=dtype)                       # gate 1, no gradient
        kept = torch.ones(N, dtype=torch.bool)
        cf = r["capacity_factor"] if ctx.training else r["eval_capacity_factor"]
        if cf > 0:
            kept = self._apply_capacity(exp, gate, capacity(cf, 1, N, self.E), r["drop_policy"])
        counts = self._counts(exp)
        z0 = torch.zeros((), dtype=dtype)
        return tok, exp, gate, kept, LayerRecord(counts, self._counts(exp, kept), z0, z0, z0, z0)

    # ---- soft ----

    def _soft(self, x):
        """Per sequence: L = x Phi (T, E*p); D = softmax over tokens (each column);
        Xs = D^T x (E*p, C); expert e on slots [e*p, (e+1)*p); Cw = softmax over slots (each
        row); y = Cw Ys."""
        B, T, C = x.shape
        p = self.cfg["router"]["soft_slots"]
        ys = []
        for b in range(B):
            xb = x[b]                                           # (T, C)
            L = xb @ self.router.slots                          # (T, E*p)
            D = F.softmax(L, dim=0)
            Cw = F.softmax(L, dim=1)
            Xs = D.t() @ xb                                     # (E*p, C)
            Ys = torch.cat([self.experts(e, Xs[e * p:(e + 1) * p]) for e in range(self.E)], dim=0)
            ys.append(Cw @ Ys)                                  # (T, C)
        y = torch.stack(ys)
        counts = torch.full((self.E,), float(B * p), dtype=torch.float64)
        z0 = x.new_zeros(())
        return y, LayerRecord(counts, counts.clone(), z0, z0, z0, z0)

    # ---- aux-loss-free bias ----

    @torch.no_grad()
    def update_bias(self, routed):
        """b_i += u * sign(mean_j load_j - load_i) (sign(0) = 0), with bias_center the mean of
        the update subtracted. `routed`: this step's selected assignments per expert. The
        sign is taken of sum_j load_j - E * load_i, exact in integers."""
        if not hasattr(self.router, "expert_bias"):
            return
        bal = self.cfg["balance"]
        load = routed.to(torch.float64).round()
        diff = load.sum() - self.E * load
        delta = bal["bias_rate"] * torch.sign(diff)            # float64
        if bal["bias_center"]:
            delta = delta - delta.mean()
        b = self.router.expert_bias
        b.copy_(b + delta.to(b.dtype))


def moe_layers(model):
    """(transformer layer index, MoE module) for each MoE layer of a GPT."""
    return [(l, getattr(blk, "moe")) for l, blk in enumerate(model.h) if blk.ffn_name == "moe"]


def update_biases(model, ctx):
    """The aux-loss-free bias update after an optimizer step, from that step's forward."""
    for l, m in moe_layers(model):
        m.update_bias(ctx.layers[l].routed)
