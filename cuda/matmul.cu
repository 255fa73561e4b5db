/* GEMMs of the model: matmul (weights (OC, C) as PyTorch) and the grouped expert GEMM, forward
   and backward, plus the deterministic column sums behind dbias. Everything is one strided GEMM
   C(m, n) (+)= bias[n] + sum_k A(m, k) B(k, n), with A(m, k) = A[m*sam + k*sak] and
   B(k, n) = B[k*sbk + n*sbn], so the three products need no transposes:
     out  (N, OC)  = inp (N, C) . W^T        A = inp, B(c, o) = W[o*C + c]
     dinp (N, C)  += dout (N, OC) . W        A = dout, B(o, c) = W[o*C + c]
     dW   (OC, C) += dout^T . inp            A(o, n) = dout[n*OC + o], B(n, c) = inp[n*C + c]
   Two kernels compute one output tile per thread block, each output element by one thread in a
   fixed k order (no split-K, no atomics: bit-reproducible run to run):
   - fp32 (testing mode): 64x64x16 shared-memory tiles, 256 threads, 4x4 register block, FMA;
   - bf16 (train.dtype bf16): 128x128x32 tiles, 8 warps of 64x32, mma.sync m16n8k16 bf16 with
     fp32 accumulate, operands converted fp32 -> bf16 while staging tiles in shared memory and
     read with ldmatrix. Inputs, outputs and master weights stay fp32 in memory.
   A grouped call is one launch: the host builds a flat list of (problem, m0, n0) tiles over
   all blocks (a problem = one block's rows, or for dW one expert with its blocks as K segments
   added in block order) and uploads it with the problem table in one copy. */
#include "kernels.cuh"

#include <cstring>
#include <vector>

namespace moe {
namespace cuda {

struct KSeg { int k0, len; };   // a range of the K dimension (rows of a grouped array)

struct GemmProblem {
    const float* A; long long sam, sak;   // A(m, k) = A[m*sam + k*sak]
    const float* B; long long sbk, sbn;   // B(k, n) = B[k*sbk + n*sbn]
    float* C; long long ldc;              // C(m, n) = C[m*ldc + n]
    const float* bias;                    // (N) or null
    int M, N, K;                          // K: one segment [0, K) when nseg == 0
    int seg0, nseg;                       // else K segments segs[seg0 .. seg0 + nseg)
    int accumulate;                       // C += ... instead of C = ...
};
struct GemmTile { int problem, m0, n0; };

// The tile this block computes: from the tile list (grouped) or from blockIdx (one problem).
__device__ __forceinline__ void tile_of(const GemmProblem& one, const GemmProblem* probs, const GemmTile* tiles,
                                        int BM, int BN, GemmProblem& p, int& m0, int& n0) {
    if (tiles) {
        const GemmTile t = tiles[blockIdx.x];
        p = probs[t.problem];
        m0 = t.m0;
        n0 = t.n0;
    } else {
        p = one;
        m0 = blockIdx.y * BM;
        n0 = blockIdx.x * BN;
    }
}
__device__ __forceinline__ KSeg seg_of(const GemmProblem& p, const KSeg* segs, int s) {
    return p.nseg == 0 ? KSeg{0, p.K} : segs[p.seg0 + s];
}

// ---------------------------------------------------------------------------------------------
// fp32 SIMT kernel

constexpr int F_BM = 64, F_BN = 64, F_BK = 16, F_THREADS = 256;

__global__ void __launch_bounds__(F_THREADS)
gemm_fp32_kernel(GemmProblem one, const GemmProblem* probs, const GemmTile* tiles, const KSeg* segs) {
    __shared__ __align__(16) float As[F_BK][F_BM + 4];   // A tile, k-major
    __shared__ __align__(16) float Bs[F_BK][F_BN + 4];   // B tile, k-major
    GemmProblem p;
    int m0, n0;
    tile_of(one, probs, tiles, F_BM, F_BN, p, m0, n0);
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    float acc[4][4] = {};
    const int nseg = p.nseg == 0 ? 1 : p.nseg;
    for (int s = 0; s < nseg; s++) {
        const KSeg sg = seg_of(p, segs, s);
        const int kend = sg.k0 + sg.len;
        for (int kb = sg.k0; kb < kend; kb += F_BK) {
            for (int i = 0; i < F_BM * F_BK / F_THREADS; i++) {   // stage A, coalesced along its contiguous dim
                const int idx = tid + i * F_THREADS;
                const int m = p.sak == 1 ? idx / F_BK : idx % F_BM, k = p.sak == 1 ? idx % F_BK : idx / F_BM;
                const int gm = m0 + m, gk = kb + k;
                As[k][m] = gm < p.M && gk < kend ? p.A[gm * p.sam + gk * p.sak] : 0.0f;
            }
            for (int i = 0; i < F_BN * F_BK / F_THREADS; i++) {   // stage B
                const int idx = tid + i * F_THREADS;
                const int n = p.sbn == 1 ? idx % F_BN : idx / F_BK, k = p.sbn == 1 ? idx / F_BN : idx % F_BK;
                const int gn = n0 + n, gk = kb + k;
                Bs[k][n] = gn < p.N && gk < kend ? p.B[gk * p.sbk + gn * p.sbn] : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int k = 0; k < F_BK; k++) {
                const float4 a = *reinterpret_cast<const float4*>(&As[k][ty * 4]);
                const float4 b = *reinterpret_cast<const float4*>(&Bs[k][tx * 4]);
                const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
            }
            __syncthreads();
        }
    }
    for (int i = 0; i < 4; i++) {
        const int m = m0 + ty * 4 + i;
        if (m >= p.M) break;
        for (int j = 0; j < 4; j++) {
            const int n = n0 + tx * 4 + j;
            if (n >= p.N) break;
            float* c = p.C + m * p.ldc + n;
            *c = (p.accumulate ? *c : 0.0f) + ((p.bias ? p.bias[n] : 0.0f) + acc[i][j]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// bf16 tensor-core kernel

constexpr int H_BM = 128, H_BN = 128, H_BK = 32, H_PAD = 8, H_THREADS = 256;

__global__ void __launch_bounds__(H_THREADS)
gemm_bf16_kernel(GemmProblem one, const GemmProblem* probs, const GemmTile* tiles, const KSeg* segs) {
    __shared__ __align__(16) __nv_bfloat16 As[H_BM][H_BK + H_PAD];   // A tile (m, k): k contiguous
    __shared__ __align__(16) __nv_bfloat16 Bs[H_BN][H_BK + H_PAD];   // B tile (n, k): k contiguous
    GemmProblem p;
    int m0, n0;
    tile_of(one, probs, tiles, H_BM, H_BN, p, m0, n0);
    const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
    const int wm = warp / 4, wn = warp % 4;   // warp tile: rows wm*64 .. +64, cols wn*32 .. +32
    float acc[4][4][4] = {};
    const int nseg = p.nseg == 0 ? 1 : p.nseg;
    for (int s = 0; s < nseg; s++) {
        const KSeg sg = seg_of(p, segs, s);
        const int kend = sg.k0 + sg.len;
        for (int kb = sg.k0; kb < kend; kb += H_BK) {
            for (int i = 0; i < H_BM * H_BK / H_THREADS; i++) {
                const int idx = tid + i * H_THREADS;
                const int m = p.sak == 1 ? idx / H_BK : idx % H_BM, k = p.sak == 1 ? idx % H_BK : idx / H_BM;
                const int gm = m0 + m, gk = kb + k;
                As[m][k] = to_bf16(gm < p.M && gk < kend ? p.A[gm * p.sam + gk * p.sak] : 0.0f);
            }
            for (int i = 0; i < H_BN * H_BK / H_THREADS; i++) {
                const int idx = tid + i * H_THREADS;
                const int n = p.sbk == 1 ? idx / H_BK : idx % H_BN, k = p.sbk == 1 ? idx % H_BK : idx / H_BN;
                const int gn = n0 + n, gk = kb + k;
                Bs[n][k] = to_bf16(gn < p.N && gk < kend ? p.B[gk * p.sbk + gn * p.sbn] : 0.0f);
            }
            __syncthreads();
#pragma unroll
            for (int ks = 0; ks < H_BK; ks += 16) {
                uint32_t a[4][4], b[4][2];
#pragma unroll
                for (int mt = 0; mt < 4; mt++)   // lanes 0-15: rows at k, 16-31: rows at k + 8
                    ldmatrix_x4(a[mt], &As[wm * 64 + mt * 16 + lane % 16][ks + (lane / 16) * 8]);
#pragma unroll
                for (int np = 0; np < 2; np++) {  // two n8 tiles per ldmatrix: (n 0-7 | 8-15) x (k | k + 8)
                    uint32_t r[4];
                    ldmatrix_x4(r, &Bs[wn * 32 + np * 16 + lane % 8 + (lane / 16) * 8][ks + ((lane / 8) % 2) * 8]);
                    b[2 * np][0] = r[0]; b[2 * np][1] = r[1];
                    b[2 * np + 1][0] = r[2]; b[2 * np + 1][1] = r[3];
                }
#pragma unroll
                for (int mt = 0; mt < 4; mt++)
#pragma unroll
                    for (int nt = 0; nt < 4; nt++) mma_bf16_16816(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
            }
            __syncthreads();
        }
    }
    // accumulator layout of m16n8: c0, c1 at (row lane/4, cols 2*(lane%4) + 0/1), c2, c3 at row + 8.
    // Unrolled, so that acc is indexed by constants and stays in registers (rolled loops put the
    // whole array in local memory: a 256-byte stack frame in `-Xptxas -v`)
#pragma unroll
    for (int mt = 0; mt < 4; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int m = m0 + wm * 64 + mt * 16 + lane / 4 + (r / 2) * 8;
                const int n = n0 + wn * 32 + nt * 8 + (lane % 4) * 2 + r % 2;
                if (m >= p.M || n >= p.N) continue;
                float* c = p.C + m * p.ldc + n;
                *c = (p.accumulate ? *c : 0.0f) + ((p.bias ? p.bias[n] : 0.0f) + acc[mt][nt][r]);
            }
}

// ---------------------------------------------------------------------------------------------
// column sums (dbias): block (32, 8) per 32 columns of one group; the 8 row lanes stride the
// group's rows, then add up in lane order

__device__ float column_rows_sum(const float* dout, int OC, int c, int r0, int r1) {
    float acc = 0.0f;
    for (int r = r0 + threadIdx.y; r < r1; r += blockDim.y) acc += dout[(size_t)r * OC + c];
    return acc;
}
__device__ void column_sum_store(float* out, float acc, int c, int OC, bool accumulate) {
    __shared__ float part[8][kWarp + 1];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < OC) {
        for (int j = 1; j < (int)blockDim.y; j++) acc += part[j][threadIdx.x];
        out[c] = accumulate ? out[c] + acc : acc;
    }
}

// group g = rows [g*rows_per_chunk, ...) of one (N, OC) array; partial[g][c] = the chunk's sum
__global__ void column_sum_chunks_kernel(float* partial, const float* dout, int N, int OC, int rows_per_chunk) {
    const int c = blockIdx.x * kWarp + threadIdx.x, g = blockIdx.y;
    const int r0 = g * rows_per_chunk, r1 = min(N, r0 + rows_per_chunk);
    const float acc = c < OC ? column_rows_sum(dout, OC, c, r0, r1) : 0.0f;
    column_sum_store(partial + (size_t)g * OC, acc, c, OC, false);
}

// group g = expert experts[g] with K segments segs[seg_off[g] .. seg_off[g+1]): dbias[e] += sum
__global__ void column_sum_groups_kernel(float* dbias, const float* dout, const int* experts, const int* seg_off,
                                         const KSeg* segs, int OC) {
    const int c = blockIdx.x * kWarp + threadIdx.x, g = blockIdx.y;
    float acc = 0.0f;
    if (c < OC)
        for (int s = seg_off[g]; s < seg_off[g + 1]; s++) acc += column_rows_sum(dout, OC, c, segs[s].k0, segs[s].k0 + segs[s].len);
    column_sum_store(dbias + (size_t)experts[g] * OC, acc, c, OC, true);
}

// out[c] += partial[0][c] + partial[1][c] + ... in chunk order
__global__ void add_chunk_sums_kernel(float* out, const float* partial, int chunks, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.0f;
    for (int j = 0; j < chunks; j++) acc += partial[(size_t)j * C + c];
    out[c] += acc;
}

void add_chunk_sums(float* out, const float* partial, int chunks, int C, cudaStream_t stream) {
    add_chunk_sums_kernel<<<CEIL_DIV(C, kBlock), kBlock, 0, stream>>>(out, partial, chunks, C);
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// launchers

namespace {

void launch_one(const GemmProblem& p, bool bf16, cudaStream_t stream) {
    if (p.M <= 0 || p.N <= 0) return;
    if (bf16) {
        gemm_bf16_kernel<<<dim3(CEIL_DIV(p.N, H_BN), CEIL_DIV(p.M, H_BM)), H_THREADS, 0, stream>>>(p, nullptr, nullptr,
                                                                                                     nullptr);
    } else {
        gemm_fp32_kernel<<<dim3(CEIL_DIV(p.N, F_BN), CEIL_DIV(p.M, F_BM)), F_THREADS, 0, stream>>>(p, nullptr, nullptr,
                                                                                                     nullptr);
    }
    cudaCheck(cudaGetLastError());
}

GemmProblem problem(const float* A, long long sam, long long sak, const float* B, long long sbk, long long sbn,
                    float* C, long long ldc, const float* bias, int M, int N, int K, bool accumulate) {
    GemmProblem p;
    p.A = A; p.sam = sam; p.sak = sak;
    p.B = B; p.sbk = sbk; p.sbn = sbn;
    p.C = C; p.ldc = ldc; p.bias = bias;
    p.M = M; p.N = N; p.K = K;
    p.seg0 = 0; p.nseg = 0;
    p.accumulate = accumulate ? 1 : 0;
    return p;
}

// Host tables of one grouped launch, packed into one blob and uploaded with one copy: the GEMM
// problems and tiles, the K segments, and for dbias one column-sum group per expert.
struct GroupedLaunch {
    std::vector<GemmProblem> probs;
    std::vector<GemmTile> tiles;
    std::vector<KSeg> segs;
    std::vector<int> bias_experts, bias_seg_off;   // (groups), (groups + 1) into segs
    float* dbias = nullptr;                        // (E, OC) column sums of bias_dout, +=
    const float* bias_dout = nullptr;              // (rows, OC)
    int OC = 0;
    void add(const GemmProblem& p, bool bf16) {
        if (p.M <= 0 || p.N <= 0) return;
        const int BM = bf16 ? H_BM : F_BM, BN = bf16 ? H_BN : F_BN;
        for (int m0 = 0; m0 < p.M; m0 += BM)
            for (int n0 = 0; n0 < p.N; n0 += BN) tiles.push_back({(int)probs.size(), m0, n0});
        probs.push_back(p);
    }
    void run(DeviceScratch& table, bool bf16, cudaStream_t stream) {
        const bool sums = dbias && !bias_experts.empty();
        if (tiles.empty() && !sums) return;
        size_t total = 0;
        auto place = [&total](size_t bytes) { size_t at = total; total += (bytes + 15) / 16 * 16; return at; };
        const size_t o_probs = place(probs.size() * sizeof(GemmProblem)), o_tiles = place(tiles.size() * sizeof(GemmTile));
        const size_t o_segs = place(segs.size() * sizeof(KSeg)), o_exp = place(bias_experts.size() * sizeof(int));
        const size_t o_off = place(bias_seg_off.size() * sizeof(int));
        std::vector<char> blob(total, 0);
        auto put = [&blob](size_t at, const void* src, size_t bytes) { if (bytes) std::memcpy(blob.data() + at, src, bytes); };
        put(o_probs, probs.data(), probs.size() * sizeof(GemmProblem));
        put(o_tiles, tiles.data(), tiles.size() * sizeof(GemmTile));
        put(o_segs, segs.data(), segs.size() * sizeof(KSeg));
        put(o_exp, bias_experts.data(), bias_experts.size() * sizeof(int));
        put(o_off, bias_seg_off.data(), bias_seg_off.size() * sizeof(int));
        char* d = (char*)table.ensure(total);
        // pageable source: staged before cudaMemcpyAsync returns; stream order protects `d`
        // from the previous launch that read it
        cudaCheck(cudaMemcpyAsync(d, blob.data(), total, cudaMemcpyHostToDevice, stream));
        const KSeg* dsegs = (const KSeg*)(d + o_segs);
        if (!tiles.empty()) {
            const GemmProblem* dp = (const GemmProblem*)(d + o_probs);
            const GemmTile* dt = (const GemmTile*)(d + o_tiles);
            if (bf16) gemm_bf16_kernel<<<(unsigned)tiles.size(), H_THREADS, 0, stream>>>(probs[0], dp, dt, dsegs);
            else gemm_fp32_kernel<<<(unsigned)tiles.size(), F_THREADS, 0, stream>>>(probs[0], dp, dt, dsegs);
            cudaCheck(cudaGetLastError());
        }
        if (sums) {
            dim3 grid(CEIL_DIV(OC, kWarp), (unsigned)bias_experts.size());
            column_sum_groups_kernel<<<grid, dim3(kWarp, 8), 0, stream>>>(dbias, bias_dout, (const int*)(d + o_exp),
                                                                          (const int*)(d + o_off), dsegs, OC);
            cudaCheck(cudaGetLastError());
        }
    }
};

}  // namespace

void matmul_forward(float* out,          // (N, OC)
                    const float* inp,    // (N, C)
                    const float* weight, // (OC, C)
                    const float* bias,   // (OC) or null
                    int N, int C, int OC, bool bf16, cudaStream_t stream) {
    launch_one(problem(inp, C, 1, weight, 1, C, out, OC, bias, N, OC, C, false), bf16, stream);
}

int matmul_backward_scratch(int N, int OC) { return kColumnChunks * OC; }

void matmul_backward(float* dinp,         // (N, C) or null, +=
                     float* dweight,      // (OC, C) or null, +=
                     float* dbias,        // (OC) or null, +=
                     float* scratch,      // (matmul_backward_scratch(N, OC)) for dbias
                     const float* dout,   // (N, OC)
                     const float* inp,    // (N, C)
                     const float* weight, // (OC, C)
                     int N, int C, int OC, bool bf16, cudaStream_t stream) {
    if (dinp) launch_one(problem(dout, OC, 1, weight, C, 1, dinp, C, nullptr, N, C, OC, true), bf16, stream);
    if (dweight) launch_one(problem(dout, 1, OC, inp, C, 1, dweight, C, nullptr, OC, C, N, true), bf16, stream);
    if (dbias && N > 0) {
        const int rows_per_chunk = CEIL_DIV(N, kColumnChunks), chunks = CEIL_DIV(N, rows_per_chunk);
        column_sum_chunks_kernel<<<dim3(CEIL_DIV(OC, kWarp), chunks), dim3(kWarp, 8), 0, stream>>>(scratch, dout, N, OC,
                                                                                                  rows_per_chunk);
        cudaCheck(cudaGetLastError());
        add_chunk_sums(dbias, scratch, chunks, OC, stream);
    }
}

void grouped_matmul_forward(float* out,               // (rows, OC)
                            const float* inp,         // (rows, C)
                            const float* weight,      // (E, OC, C)
                            const float* bias,        // (E, OC) or null
                            const GroupBlock* blocks, int nblocks, int C, int OC, bool bf16, DeviceScratch& table,
                            cudaStream_t stream) {
    GroupedLaunch g;
    for (int i = 0; i < nblocks; i++) {
        const GroupBlock& b = blocks[i];
        const size_t r0 = b.row0, e = b.expert;
        g.add(problem(inp + r0 * C, C, 1, weight + e * OC * C, 1, C, out + r0 * OC, OC, bias ? bias + e * OC : nullptr,
                      b.rows, OC, C, false), bf16);
    }
    g.run(table, bf16, stream);
}

void grouped_matmul_backward(float* dinp,             // (rows, C) or null, +=
                             float* dweight,          // (E, OC, C) or null, +=
                             float* dbias,            // (E, OC) or null, +=
                             const float* dout,       // (rows, OC)
                             const float* inp,        // (rows, C)
                             const float* weight,     // (E, OC, C)
                             const GroupBlock* blocks, int nblocks, int C, int OC, bool bf16, DeviceScratch& table,
                             cudaStream_t stream) {
    // experts in order of first appearance, each with its blocks (K segments) in block order
    std::vector<int> experts;
    std::vector<std::vector<KSeg>> expert_segs;
    for (int i = 0; i < nblocks; i++) {
        const GroupBlock& b = blocks[i];
        if (b.rows <= 0) continue;
        size_t j = 0;
        while (j < experts.size() && experts[j] != b.expert) j++;
        if (j == experts.size()) { experts.push_back(b.expert); expert_segs.emplace_back(); }
        expert_segs[j].push_back({b.row0, b.rows});
    }
    GroupedLaunch g;
    if (dinp)
        for (int i = 0; i < nblocks; i++) {
            const GroupBlock& b = blocks[i];
            const size_t r0 = b.row0, e = b.expert;
            g.add(problem(dout + r0 * OC, OC, 1, weight + e * OC * C, C, 1, dinp + r0 * C, C, nullptr, b.rows, C, OC,
                          true), bf16);
        }
    std::vector<int> seg_off{0};
    for (size_t j = 0; j < experts.size(); j++) {
        float* dw = dweight ? dweight + (size_t)experts[j] * OC * C : nullptr;
        GemmProblem p = problem(dout, 1, OC, inp, C, 1, dw, C, nullptr, OC, C, 0, true);
        p.seg0 = (int)g.segs.size();
        p.nseg = (int)expert_segs[j].size();
        g.segs.insert(g.segs.end(), expert_segs[j].begin(), expert_segs[j].end());
        seg_off.push_back((int)g.segs.size());
        if (dweight) g.add(p, bf16);
    }
    if (dbias) {
        g.bias_experts = experts;
        g.bias_seg_off = seg_off;
        g.dbias = dbias;
        g.bias_dout = dout;
        g.OC = OC;
    }
    g.run(table, bf16, stream);
}

}  // namespace cuda
}  // namespace moe
