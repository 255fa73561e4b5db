/* Token-choice top-k routing on the GPU (docs/moe.md "Router", docs/cuda.md "Routing"): the
   Backend routing ops (src/backend.h) whose CPU twins are the host functions of
   src/moe_router.cpp (tests/gpu/test_gpu_router.cpp compares them).
   - router_topk_forward: a warp per token: softmax/sigmoid scores with glibc's expf
     (src/expf_libm.h) and the host's summation order, so the scores are the host's bits; top k of
     s + bias by warp arg-max rounds (ties: lower expert), group-limited selection; gates.
   - router_plan_build: per-expert counts, an ordered list of each expert's choices, capacity
     (by gate: radix select of the cap-th largest gate, ties kept in choice order; or by
     position), fixed-order scans for the offsets, the plan in token order, the token CSR.
   - router_balance_forward / router_topk_backward: Switch aux loss (micro-batch, sequence or
     given global counts), z-loss, statistics; their gradients and the gates' down to dz (N, E).
   No atomics: every output has one writer and every sum a fixed order, so the plan is
   bit-identical to the host's and runs are bit-reproducible. */
#include "kernels.cuh"
#include "expf_libm.h"

namespace moe {
namespace cuda {

constexpr int kRouterWarps = 4;                       // warps (tokens) per block of the per-token kernels
constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// helpers

// Arg-max over v[e] for e in [lo, hi) with ok[e] set; ties: lower e. Every lane gets the answer
// (-1 when none is allowed).
__device__ int warp_argmax(const float* v, const uint8_t* ok, int lo, int hi) {
    const int lane = threadIdx.x % kWarp;
    float best = 0.0f;
    int arg = -1;
    for (int e = lo + lane; e < hi; e += kWarp)
        if (ok[e] && (arg < 0 || v[e] > best)) { best = v[e]; arg = e; }
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(kFull, best, o);
        const int oa = __shfl_xor_sync(kFull, arg, o);
        if (oa >= 0 && (arg < 0 || ob > best || (ob == best && oa < arg))) { best = ob; arg = oa; }
    }
    return arg;
}

// Rank of a flagged element among the flagged elements of this block-wide chunk (chunk order =
// thread order) and the chunk's number of flagged elements. Every thread of the block calls it.
__device__ int block_rank(bool flag, int* total, int* warp_counts /* shared (32) */) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
    const unsigned b = __ballot_sync(kFull, flag);
    if (lane == 0) warp_counts[warp] = __popc(b);
    __syncthreads();
    int base = 0, tot = 0;
    for (int w = 0; w < nwarps; w++) {
        if (w < warp) base += warp_counts[w];
        tot += warp_counts[w];
    }
    __syncthreads();
    *total = tot;
    return base + __popc(b & ((1u << lane) - 1u));
}

// Sort key of a gate: the order of the floats as unsigned integers (-0 counts as +0).
__device__ __forceinline__ uint32_t gate_key(float g) {
    uint32_t b = __float_as_uint(g);
    if (b == 0x80000000u) b = 0;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// ---------------------------------------------------------------------------------------------
// scores and top-k: a warp per token

__global__ void router_topk_forward_kernel(float* s, int* choice_expert, float* choice_gate, const float* z,
                                           const float* bias, TopkRouterArgs a) {
    __shared__ float sel_all[kRouterWarps][kRouterMaxE];
    __shared__ float gscore_all[kRouterWarps][kRouterMaxE];
    __shared__ uint8_t ok_all[kRouterWarps][kRouterMaxE];
    __shared__ uint8_t gok_all[kRouterWarps][kRouterMaxE];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int n = blockIdx.x * kRouterWarps + warp, E = a.E, k = a.k;
    if (n >= a.N) return;                              // whole warps leave together
    float* sel = sel_all[warp];
    float* gscore = gscore_all[warp];
    uint8_t* ok = ok_all[warp];
    uint8_t* gok = gok_all[warp];
    const float* zr = z + (size_t)n * E;
    float* sr = s + (size_t)n * E;

    // scores exactly as router_scores: exp, then the sum in expert order, then the division
    if (a.sigmoid) {
        for (int e = lane; e < E; e += kWarp) sr[e] = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf_libm(-zr[e])));
    } else {
        float mx = -INFINITY;
        for (int e = lane; e < E; e += kWarp) mx = fmaxf(mx, zr[e]);
        mx = warp_max(mx);
        for (int e = lane; e < E; e += kWarp) sr[e] = expf_libm(__fsub_rn(zr[e], mx));
        __syncwarp();
        float sum = 0.0f;
        if (lane == 0)
            for (int e = 0; e < E; e++) sum = __fadd_rn(sum, sr[e]);
        sum = __shfl_sync(kFull, sum, 0);
        for (int e = lane; e < E; e += kWarp) sr[e] = __fdiv_rn(sr[e], sum);
    }
    __syncwarp();
    for (int e = lane; e < E; e += kWarp) {
        sel[e] = bias ? __fadd_rn(sr[e], bias[e]) : sr[e];
        ok[e] = 1;
    }
    __syncwarp();

    // group-limited: group score = sum of its top per_group selection values, largest first
    if (a.groups > 1) {
        const int G = a.groups, Eg = E / G, per_group = min(max(1, k / a.topk_groups), Eg);
        for (int g = 0; g < G; g++) {
            float acc = 0.0f;
            for (int t = 0; t < per_group; t++) {
                const int e = warp_argmax(sel, ok, g * Eg, (g + 1) * Eg);
                acc = __fadd_rn(acc, sel[e]);
                if (lane == 0) ok[e] = 0;
                __syncwarp();
            }
            if (lane == 0) gscore[g] = acc;
            __syncwarp();
        }
        for (int g = lane; g < G; g += kWarp) gok[g] = 1;
        __syncwarp();
        for (int t = 0; t < a.topk_groups; t++) {      // the best groups stay allowed (gok 0 = kept)
            const int g = warp_argmax(gscore, gok, 0, G);
            if (lane == 0) gok[g] = 0;
            __syncwarp();
        }
        for (int e = lane; e < E; e += kWarp) ok[e] = gok[e / Eg] == 0;
        __syncwarp();
    }

    // k rounds of arg-max; gates from the scores, normalised over the k, then scaled
    int taken[kRouterMaxK];
    for (int j = 0; j < k; j++) {
        taken[j] = warp_argmax(sel, ok, 0, E);
        if (lane == 0) ok[taken[j]] = 0;
        __syncwarp();
    }
    if (lane == 0) {
        float g[kRouterMaxK], sum = 0.0f;
        for (int j = 0; j < k; j++) { g[j] = sr[taken[j]]; sum = __fadd_rn(sum, g[j]); }
        for (int j = 0; j < k; j++) {
            const float gj = a.normalize ? __fdiv_rn(g[j], sum) : g[j];
            choice_expert[(size_t)n * k + j] = taken[j];
            choice_gate[(size_t)n * k + j] = __fmul_rn(gj, a.scale);
        }
    }
}

void router_topk_forward(float* s,             // (N, E)
                         int* choice_expert,   // (N, k)
                         float* choice_gate,   // (N, k)
                         const float* z,       // (N, E)
                         const float* bias,    // (E) or null
                         const TopkRouterArgs& a, cudaStream_t stream) {
    if (a.N <= 0) return;
    router_topk_forward_kernel<<<CEIL_DIV(a.N, kRouterWarps), kRouterWarps * kWarp, 0, stream>>>(
        s, choice_expert, choice_gate, z, bias, a);
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// the dispatch plan

// one block: out (n+1) = exclusive prefix sum of in (n), chunk by chunk in index order
__global__ void exclusive_scan_kernel(int* out, const int* in, int n) {
    __shared__ int warp_sums[kWarp];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
    int carry = 0;
    for (int c0 = 0; c0 < n; c0 += blockDim.x) {
        const int i = c0 + threadIdx.x, v = i < n ? in[i] : 0;
        int x = v;
        for (int o = 1; o < kWarp; o <<= 1) {
            const int y = __shfl_up_sync(kFull, x, o);
            if (lane >= o) x += y;
        }
        if (lane == kWarp - 1) warp_sums[warp] = x;
        __syncthreads();
        int base = 0, tot = 0;
        for (int w = 0; w < nwarps; w++) {
            if (w < warp) base += warp_sums[w];
            tot += warp_sums[w];
        }
        if (i < n) out[i] = carry + base + x - v;
        carry += tot;
        __syncthreads();
    }
    if (threadIdx.x == 0) out[n] = carry;
}

static void exclusive_scan(int* out, const int* in, int n, cudaStream_t stream) {
    exclusive_scan_kernel<<<1, 1024, 0, stream>>>(out, in, n);
    cudaCheck(cudaGetLastError());
}

// a block per expert e: routed[e] = its choices; with list_offsets, also its list of choices in
// choice order: list[list_offsets[e] + i] = m
__global__ void router_expert_list_kernel(int* routed, int* list, const int* list_offsets, const int* choice_expert,
                                          int M) {
    __shared__ int warp_counts[kWarp];
    const int e = blockIdx.x;
    int pos = 0;
    for (int c0 = 0; c0 < M; c0 += blockDim.x) {
        const int m = c0 + threadIdx.x;
        const bool flag = m < M && choice_expert[m] == e;
        int tot;
        const int r = block_rank(flag, &tot, warp_counts);
        if (flag && list) list[list_offsets[e] + pos + r] = m;
        pos += tot;
    }
    if (threadIdx.x == 0 && routed) routed[e] = pos;
}

// a block per expert: which of its listed choices it keeps (keep, aligned with list) and how
// many (kept (E)). probs: the `cap` largest gates, ties in list order; else the first `cap`.
__global__ void router_capacity_kernel(uint8_t* keep, int* kept, const int* list, const int* list_offsets,
                                       const float* choice_gate, int cap, bool by_probs) {
    __shared__ int warp_counts[kWarp];
    const int e = blockIdx.x, l0 = list_offsets[e], cnt = list_offsets[e + 1] - l0;
    if (cap <= 0 || cnt <= cap) {
        for (int i = threadIdx.x; i < cnt; i += blockDim.x) keep[l0 + i] = 1;
        if (threadIdx.x == 0) kept[e] = cnt;
        return;
    }
    if (!by_probs) {
        for (int i = threadIdx.x; i < cnt; i += blockDim.x) keep[l0 + i] = i < cap;
        if (threadIdx.x == 0) kept[e] = cap;
        return;
    }
    // t = the cap-th largest key, bit by bit from the top: the largest t with #(key >= t) >= cap
    uint32_t t = 0;
    for (int bit = 31; bit >= 0; bit--) {
        const uint32_t cand = t | (1u << bit);
        int c = 0;
        for (int c0 = 0; c0 < cnt; c0 += blockDim.x) {
            const int i = c0 + threadIdx.x;
            int tot;
            block_rank(i < cnt && gate_key(choice_gate[list[l0 + i]]) >= cand, &tot, warp_counts);
            c += tot;
        }
        if (c >= cap) t = cand;
    }
    int greater = 0;
    for (int c0 = 0; c0 < cnt; c0 += blockDim.x) {
        const int i = c0 + threadIdx.x;
        int tot;
        block_rank(i < cnt && gate_key(choice_gate[list[l0 + i]]) > t, &tot, warp_counts);
        greater += tot;
    }
    const int ties_kept = cap - greater;   // the earliest ties in list order fill the rest
    int ties = 0;
    for (int c0 = 0; c0 < cnt; c0 += blockDim.x) {
        const int i = c0 + threadIdx.x;
        const uint32_t key = i < cnt ? gate_key(choice_gate[list[l0 + i]]) : 0;
        const bool tie = i < cnt && key == t;
        int tot;
        const int r = block_rank(tie, &tot, warp_counts);
        if (i < cnt) keep[l0 + i] = key > t || (tie && ties + r < ties_kept);
        ties += tot;
    }
    if (threadIdx.x == 0) kept[e] = cap;
}

// a block per expert: its kept choices in list (= token) order -> the plan's token, gate, choice;
// assign[m] = plan position of choice m (left -1 for dropped choices)
__global__ void router_plan_fill_kernel(int* token, float* gate, int* choice, int* assign, const int* offsets,
                                        const int* list, const int* list_offsets, const uint8_t* keep,
                                        const float* choice_gate, int k) {
    __shared__ int warp_counts[kWarp];
    const int e = blockIdx.x, l0 = list_offsets[e], cnt = list_offsets[e + 1] - l0;
    int pos = offsets[e];
    for (int c0 = 0; c0 < cnt; c0 += blockDim.x) {
        const int i = c0 + threadIdx.x;
        const bool flag = i < cnt && keep[l0 + i];
        int tot;
        const int r = block_rank(flag, &tot, warp_counts);
        if (flag) {
            const int m = list[l0 + i], a = pos + r;
            token[a] = m / k;
            gate[a] = choice_gate[m];
            choice[a] = m;
            assign[m] = a;
        }
        pos += tot;
    }
}

// a thread per token: its number of kept assignments
__global__ void router_token_count_kernel(int* count, const int* assign, int N, int k) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    int c = 0;
    for (int j = 0; j < k; j++) c += assign[(size_t)n * k + j] >= 0;
    count[n] = c;
}

// a thread per token: its assignments in increasing plan order -> tok_assign
__global__ void router_token_fill_kernel(int* tok_assign, const int* tok_offsets, const int* assign, int N, int k) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    int v[kRouterMaxK], c = 0;
    for (int j = 0; j < k; j++) {
        const int a = assign[(size_t)n * k + j];
        if (a < 0) continue;
        int i = c++;
        for (; i > 0 && v[i - 1] > a; i--) v[i] = v[i - 1];
        v[i] = a;
    }
    for (int i = 0; i < c; i++) tok_assign[tok_offsets[n] + i] = v[i];
}

// scratch (ints): list offsets (E+1), list (M), kept (E), assign (M), token counts (N), keep (M bytes)
size_t router_plan_scratch_bytes(int N, int E, int k) {
    const size_t M = (size_t)N * k;
    return (2 * (size_t)E + 1 + 2 * M + N) * sizeof(int) + M;
}

void router_plan_build(int* offsets,            // (E+1)
                       int* routed,             // (E)
                       int* token,              // (A <= M)
                       float* gate,             // (A)
                       int* choice,             // (A)
                       int* tok_offsets,        // (N+1)
                       int* tok_assign,         // (A)
                       void* scratch,           // router_plan_scratch_bytes
                       const int* choice_expert,// (M)
                       const float* choice_gate,// (M)
                       const TopkRouterArgs& a, cudaStream_t stream) {
    const int N = a.N, E = a.E, k = a.k, M = N * k;
    int* list_offsets = (int*)scratch;                 // (E+1)
    int* list = list_offsets + E + 1;                  // (M)
    int* kept = list + M;                              // (E)
    int* assign = kept + E;                            // (M)
    int* tcount = assign + M;                          // (N)
    uint8_t* keep = (uint8_t*)(tcount + N);            // (M)
    router_expert_list_kernel<<<E, 256, 0, stream>>>(routed, nullptr, nullptr, choice_expert, M);
    cudaCheck(cudaGetLastError());
    exclusive_scan(list_offsets, routed, E, stream);
    router_expert_list_kernel<<<E, 256, 0, stream>>>(nullptr, list, list_offsets, choice_expert, M);
    cudaCheck(cudaGetLastError());
    router_capacity_kernel<<<E, 256, 0, stream>>>(keep, kept, list, list_offsets, choice_gate, a.capacity,
                                                  a.drop_by_probs);
    cudaCheck(cudaGetLastError());
    exclusive_scan(offsets, kept, E, stream);
    if (M > 0) cudaCheck(cudaMemsetAsync(assign, 0xff, (size_t)M * sizeof(int), stream));   // -1
    router_plan_fill_kernel<<<E, 256, 0, stream>>>(token, gate, choice, assign, offsets, list, list_offsets, keep,
                                                   choice_gate, k);
    cudaCheck(cudaGetLastError());
    if (N <= 0) {
        exclusive_scan(tok_offsets, tcount, 0, stream);
        return;
    }
    router_token_count_kernel<<<CEIL_DIV(N, 256), 256, 0, stream>>>(tcount, assign, N, k);
    cudaCheck(cudaGetLastError());
    exclusive_scan(tok_offsets, tcount, N, stream);
    router_token_fill_kernel<<<CEIL_DIV(N, 256), 256, 0, stream>>>(tok_assign, tok_offsets, assign, N, k);
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// balancing terms

// Aux loss segments: the micro-batch (nseg 1, len N) or its sequences (nseg B, len T).
struct AuxSegments {
    int nseg, len;
};
__host__ __device__ inline AuxSegments aux_segments(const TopkRouterArgs& a, const RouterLossArgs& l) {
    return l.aux_seq_len > 0 ? AuxSegments{a.N / l.aux_seq_len, l.aux_seq_len} : AuxSegments{1, a.N};
}
// the given global counts replace the micro-batch's (aux scope "global"); sequence scope counts its own
inline bool aux_uses_global_counts(const RouterLossArgs& l) { return l.aux_counts && l.aux_seq_len <= 0; }

// a thread per (segment b, expert i): f[b, i] (fraction of the segment's choices, or of the
// given global counts) and P[b, i] = mean s_i over the segment's tokens, in token order
__global__ void router_aux_columns_kernel(double* f, double* P, const float* s, const int* choice_expert,
                                          const double* global_counts, TopkRouterArgs a, AuxSegments seg) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= seg.nseg * a.E) return;
    const int b = idx / a.E, i = idx % a.E, n0 = b * seg.len;
    double p = 0.0;
    for (int n = n0; n < n0 + seg.len; n++) p += s[(size_t)n * a.E + i];
    P[idx] = p / seg.len;
    double cnt = 0.0, total = 0.0;
    if (global_counts) {
        cnt = global_counts[i];
        for (int e = 0; e < a.E; e++) total += global_counts[e];
    } else {
        for (size_t m = (size_t)n0 * a.k; m < (size_t)(n0 + seg.len) * a.k; m++) cnt += choice_expert[m] == i;
        total = (double)seg.len * a.k;
    }
    f[idx] = total > 0 ? cnt / total : 0.0;
}

// a thread per token: lse(z)^2 in double and its largest gate
__global__ void router_token_stats_kernel(double* lse2, double* top1, const float* z, const float* choice_gate,
                                          int N, int E, int k) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* zr = z + (size_t)n * E;
    float mx = -INFINITY;
    for (int e = 0; e < E; e++) mx = fmaxf(mx, zr[e]);
    double sum = 0.0;
    for (int e = 0; e < E; e++) sum += exp((double)zr[e] - mx);
    const double l = mx + log(sum);
    lse2[n] = l * l;
    float g = 0.0f;
    for (int j = 0; j < k; j++) g = fmaxf(g, choice_gate[(size_t)n * k + j]);
    top1[n] = g;
}

// one block: out[0] = aux, out[1] = sum lse^2, out[2] = sum of top-1 gates (fixed-order sums)
__global__ void router_balance_reduce_kernel(double* out, const double* f, const double* P, const double* lse2,
                                             const double* top1, int N, int E, AuxSegments seg, double alpha) {
    __shared__ double shared[kWarp];
    double zs = 0.0, ts = 0.0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) { zs += lse2[n]; ts += top1[n]; }
    zs = block_sum(zs, shared);
    ts = block_sum(ts, shared);
    if (threadIdx.x == 0) {
        double aux = 0.0;
        if (alpha > 0)
            for (int i = 0; i < seg.nseg * E; i++) aux += alpha * E * f[i] * P[i] / seg.nseg;
        out[0] = aux;
        out[1] = zs;
        out[2] = ts;
    }
}

// doubles of scratch for router_balance_forward
size_t router_balance_scratch_doubles(const TopkRouterArgs& a, const RouterLossArgs& l) {
    const AuxSegments seg = aux_segments(a, l);
    return 4 + 3 * (size_t)seg.nseg * a.E + 2 * (size_t)a.N + a.E;
}

// out (3) on the device: aux (coefficient included), sum lse^2, sum of top-1 gates
void router_balance_forward(double* out, double* scratch, const float* z /* (N, E) */, const float* s /* (N, E) */,
                            const int* choice_expert /* (M) */, const float* choice_gate /* (M) */,
                            const TopkRouterArgs& a, const RouterLossArgs& l, cudaStream_t stream) {
    const AuxSegments seg = aux_segments(a, l);
    const int F = seg.nseg * a.E;
    double* f = scratch;                       // (nseg, E)
    double* P = f + F;                         // (nseg, E)
    double* lse2 = P + F;                      // (N)
    double* top1 = lse2 + a.N;                 // (N)
    double* counts = top1 + a.N;               // (E) global counts
    if (l.aux_loss > 0 && F > 0) {   // F = 0: fewer tokens than one sequence, aux 0 as on the host
        const bool global = aux_uses_global_counts(l);
        if (global) cudaCheck(cudaMemcpyAsync(counts, l.aux_counts, a.E * sizeof(double), cudaMemcpyHostToDevice,
                                              stream));
        router_aux_columns_kernel<<<CEIL_DIV(F, 128), 128, 0, stream>>>(f, P, s, choice_expert,
                                                                         global ? counts : nullptr, a, seg);
        cudaCheck(cudaGetLastError());
    }
    if (a.N > 0) {
        router_token_stats_kernel<<<CEIL_DIV(a.N, 128), 128, 0, stream>>>(lse2, top1, z, choice_gate, a.N, a.E, a.k);
        cudaCheck(cudaGetLastError());
    }
    router_balance_reduce_kernel<<<1, 1024, 0, stream>>>(out, f, P, lse2, top1, a.N, a.E, seg, l.aux_loss);
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// backward

// a thread per (segment, expert): the aux loss gradient w.r.t. each score of the segment, as
// balance_backward computes it (double, then one rounding to float)
__global__ void router_aux_coef_kernel(float* coef, const double* f, TopkRouterArgs a, AuxSegments seg,
                                       double alpha, float dloss_scale, bool sequence) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= seg.nseg * a.E) return;
    const double c = (double)dloss_scale * alpha * a.E * f[idx];
    coef[idx] = (float)(sequence ? c / seg.len / seg.nseg : c / a.N);
}

// a thread per assignment: dchoice[choice[a]] = dgate[a] (each choice has at most one assignment)
__global__ void router_dchoice_kernel(float* dchoice, const float* dgate, const int* choice, int A) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < A) dchoice[choice[i]] = dgate[i];
}

// a warp per token: ds = aux coefficients + gate gradients (choice_gates_backward); dz = z-loss
// gradient + the softmax/sigmoid backward (router_scores_backward), in the host's order
__global__ void router_topk_backward_kernel(float* dz, const float* dchoice, const float* coef, const float* z,
                                            const float* s, const int* choice_expert, TopkRouterArgs a, int seg_len,
                                            int nseg, double zcoef) {
    __shared__ float ds_all[kRouterWarps][kRouterMaxE];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int n = blockIdx.x * kRouterWarps + warp, E = a.E, k = a.k;
    if (n >= a.N) return;
    float* ds = ds_all[warp];
    const float* sr = s + (size_t)n * E;
    const float* zr = z + (size_t)n * E;
    float* dzr = dz + (size_t)n * E;
    for (int e = lane; e < E; e += kWarp) ds[e] = 0.0f;
    __syncwarp();
    if (lane == 0) {                                   // the k gates of the token
        const size_t m0 = (size_t)n * k;
        if (a.normalize) {
            float S = 0.0f, dot = 0.0f;
            for (int j = 0; j < k; j++) {
                const float sj = sr[choice_expert[m0 + j]];
                S = __fadd_rn(S, sj);
                dot = __fadd_rn(dot, __fmul_rn(dchoice[m0 + j], sj));
            }
            for (int j = 0; j < k; j++) {
                const float d = __fsub_rn(__fdiv_rn(dchoice[m0 + j], S), __fdiv_rn(dot, __fmul_rn(S, S)));
                ds[choice_expert[m0 + j]] = __fmul_rn(a.scale, d);
            }
        } else {
            for (int j = 0; j < k; j++) ds[choice_expert[m0 + j]] = __fmul_rn(a.scale, dchoice[m0 + j]);
        }
    }
    __syncwarp();
    if (coef && n / seg_len < nseg) {                  // tokens past the last whole sequence: no term
        const float* c = coef + (size_t)(n / seg_len) * E;
        for (int e = lane; e < E; e += kWarp) ds[e] = __fadd_rn(ds[e], c[e]);
    }
    __syncwarp();
    double l = 0.0;                                    // logsumexp for the z-loss
    if (zcoef != 0.0) {
        float mx = -INFINITY;
        for (int e = lane; e < E; e += kWarp) mx = fmaxf(mx, zr[e]);
        mx = warp_max(mx);
        double sum = 0.0;
        for (int e = lane; e < E; e += kWarp) sum += exp((double)zr[e] - mx);
        l = mx + log(warp_sum(sum));
    }
    float dot = 0.0f;
    if (!a.sigmoid && lane == 0)
        for (int e = 0; e < E; e++) dot = __fadd_rn(dot, __fmul_rn(ds[e], sr[e]));
    dot = __shfl_sync(kFull, dot, 0);
    for (int e = lane; e < E; e += kWarp) {
        float d = zcoef != 0.0 ? (float)(zcoef * 2.0 * l * exp((double)zr[e] - l) / a.N) : 0.0f;
        const float back = a.sigmoid ? __fmul_rn(__fmul_rn(ds[e], sr[e]), __fsub_rn(1.0f, sr[e]))
                                     : __fmul_rn(sr[e], __fsub_rn(ds[e], dot));
        dzr[e] = __fadd_rn(d, back);
    }
}

// floats of scratch for router_topk_backward
size_t router_backward_scratch_floats(const TopkRouterArgs& a, const RouterLossArgs& l) {
    const AuxSegments seg = aux_segments(a, l);
    return (size_t)a.N * a.k + (size_t)seg.nseg * a.E;
}

void router_topk_backward(float* dz,                // (N, E), overwritten
                          float* scratch,           // router_backward_scratch_floats
                          double* balance_scratch,  // router_balance_scratch_doubles
                          const float* dgate,       // (A)
                          const int* choice,        // (A)
                          int A,
                          const float* z,           // (N, E)
                          const float* s,           // (N, E)
                          const int* choice_expert, // (M)
                          const TopkRouterArgs& a, const RouterLossArgs& l, float dloss_scale, cudaStream_t stream) {
    if (a.N <= 0) return;
    const AuxSegments seg = aux_segments(a, l);
    const size_t M = (size_t)a.N * a.k;
    float* dchoice = scratch;                  // (M)
    float* coef = scratch + M;                 // (nseg, E)
    cudaCheck(cudaMemsetAsync(dchoice, 0, M * sizeof(float), stream));
    if (A > 0) {
        router_dchoice_kernel<<<CEIL_DIV(A, 256), 256, 0, stream>>>(dchoice, dgate, choice, A);
        cudaCheck(cudaGetLastError());
    }
    const int F = seg.nseg * a.E;
    const bool aux = l.aux_loss > 0 && F > 0;   // F = 0: fewer tokens than one sequence, no aux term
    if (aux) {
        double* f = balance_scratch;
        double* P = f + F;
        double* counts = P + F + 2 * (size_t)a.N;
        const bool global = aux_uses_global_counts(l);
        if (global) cudaCheck(cudaMemcpyAsync(counts, l.aux_counts, a.E * sizeof(double), cudaMemcpyHostToDevice,
                                              stream));
        router_aux_columns_kernel<<<CEIL_DIV(F, 128), 128, 0, stream>>>(f, P, s, choice_expert,
                                                                         global ? counts : nullptr, a, seg);
        cudaCheck(cudaGetLastError());
        router_aux_coef_kernel<<<CEIL_DIV(F, 128), 128, 0, stream>>>(coef, f, a, seg, l.aux_loss, dloss_scale,
                                                                      l.aux_seq_len > 0);
        cudaCheck(cudaGetLastError());
    }
    const double zcoef = (double)dloss_scale * l.z_loss;
    router_topk_backward_kernel<<<CEIL_DIV(a.N, kRouterWarps), kRouterWarps * kWarp, 0, stream>>>(
        dz, dchoice, aux ? coef : nullptr, z, s, choice_expert, a, seg.len, seg.nseg, zcoef);
    cudaCheck(cudaGetLastError());
}

}  // namespace cuda
}  // namespace moe
