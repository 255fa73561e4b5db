/* NCCL transport of Dist for rows and gradients in GPU memory; see dist.h and docs/nccl.md.
   Compiled when the build has CUDA, MPI and nccl.h (MOE_NCCL). Bootstrapped over MPI as llm.c
   does: rank 0 makes a ncclUniqueId, MPI_Bcast hands it to every rank, ncclCommInitRank builds
   the world communicator on the GPU the backend runs on; the EP and DP communicators are split
   from it (ncclCommSplit, NCCL >= 2.18; older NCCL: one unique id per group, broadcast over the
   group's MPI communicator). Every call is checked: a failure prints one line
   `error: NCCL <call>: <reason> (file:line, rank r of w)` and MPI_Abort ends every rank, so that
   none waits forever in a collective. Every operation is blocking, as its MPI twin is: the
   backend's queued work is finished first (Backend::synchronize), the NCCL calls go on the
   backend's stream (Backend::stream, null = the default stream), and that stream is
   synchronized before returning. */
#ifdef MOE_NCCL
#include "dist.h"
#include "backend.h"
#include "common.h"

#include <cstdio>
#include <cuda_runtime.h>
#define OMPI_SKIP_MPICXX 1  // the C API is all this file uses
#include <mpi.h>
#include <nccl.h>

namespace moe {
namespace {

[[noreturn]] void abort_all(const std::string& msg) {
    int rank = 0, world = 1, up = 0;
    MPI_Initialized(&up);
    if (up) {
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
        MPI_Comm_size(MPI_COMM_WORLD, &world);
    }
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s, rank %d of %d)\n", msg.c_str(), rank, world);
    std::fflush(stderr);
    if (up) MPI_Abort(MPI_COMM_WORLD, 1);
    std::exit(1);
}

void nccl_check(ncclResult_t r, const char* call, const char* file, int line) {
    if (r == ncclSuccess) return;
    std::string why = ncclGetErrorString(r);
    const char* last = ncclGetLastError(nullptr);
    if (last && *last) why += std::string(": ") + last;
    abort_all(fmt::format("NCCL {}: {} ({}:{}", call, why, file, line));
}

void cuda_check_dist(cudaError_t e, const char* call, const char* file, int line) {
    if (e == cudaSuccess) return;
    abort_all(fmt::format("CUDA {}: {} ({}:{}", call, cudaGetErrorString(e), file, line));
}

#define ncclCheck(call) nccl_check((call), #call, __FILE__, __LINE__)
#define cudaCheckDist(call) cuda_check_dist((call), #call, __FILE__, __LINE__)

struct NcclState {
    ncclComm_t world = nullptr, ep = nullptr, dp = nullptr;
    int device = 0;
};

ncclComm_t comm_of(const NcclState& s, Dist::Group g) {
    return g == Dist::WORLD ? s.world : g == Dist::EP ? s.ep : s.dp;
}

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 18, 0)
// one unique id per group: its rank 0 makes it, the group's MPI communicator carries it
ncclComm_t init_group(MPI_Comm group, int size, int rank) {
    ncclUniqueId id;
    if (rank == 0) ncclCheck(ncclGetUniqueId(&id));
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, group);
    ncclComm_t c = nullptr;
    ncclCheck(ncclCommInitRank(&c, size, id, rank));
    return c;
}
#endif

}  // namespace

void Dist::nccl_init_() {
    if (!comm_ep_) fail("internal error: Dist::setup_groups must run before a backend is attached");
    int count = 0, device = 0;
    cudaCheckDist(cudaGetDeviceCount(&count));
    cudaCheckDist(cudaGetDevice(&device));
    const int want = device_for_rank(count);
    if (device != want)
        fail("rank {} runs its CUDA backend on GPU {}, but this rank's GPU is local rank {} mod {} visible GPUs "
             "= {} (make_backend must create it on Dist::device_for_rank)", rank, device, local_rank, count, want);
    auto* s = new NcclState;
    s->device = device;
    ncclUniqueId id;
    if (rank == 0) ncclCheck(ncclGetUniqueId(&id));
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
    ncclCheck(ncclCommInitRank(&s->world, world, id, rank));
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
    // same colours and keys as the MPI split of setup_groups: rank in EP = ep_rank, in DP = dp_rank
    ncclCheck(ncclCommSplit(s->world, dp_rank, ep_rank, &s->ep, nullptr));
    ncclCheck(ncclCommSplit(s->world, ep_rank, dp_rank, &s->dp, nullptr));
#else
    s->ep = init_group(*(MPI_Comm*)comm_ep_, ep, ep_rank);
    s->dp = init_group(*(MPI_Comm*)comm_dp_, dp, dp_rank);
#endif
    nccl_ = s;
    int version = 0;
    ncclCheck(ncclGetVersion(&version));
    if (rank == 0)
        fmt::print("nccl: NCCL {}.{}.{}, {} rank(s) = {} data-parallel x {} expert-parallel; rank 0 on GPU {} of {}\n",
                   version / 10000, version / 100 % 100, version % 100, world, dp, ep, device, count);
    std::fflush(stdout);
}

void Dist::nccl_free_(bool abort) {
    auto* s = (NcclState*)nccl_;
    nccl_ = nullptr;
    for (ncclComm_t c : {s->dp, s->ep, s->world}) {
        if (!c) continue;
        if (abort) ncclCommAbort(c);      // local; the error path must not wait on other ranks
        else ncclCheck(ncclCommDestroy(c));
    }
    delete s;
}

void Dist::nccl_alltoallv_(const float* send, const std::vector<size_t>& scount, const std::vector<size_t>& sdispl,
                           float* recv, const std::vector<size_t>& rcount, const std::vector<size_t>& rdispl) const {
    const auto* s = (const NcclState*)nccl_;
    cudaStream_t st = (cudaStream_t)be_->stream();
    be_->synchronize();  // the rows to send are written
    // counts came from alltoall_counts, so a send of n floats to r meets a receive of n from us
    // on r; empty pairs are skipped on both sides
    ncclCheck(ncclGroupStart());
    for (size_t r = 0; r < scount.size(); r++) {
        if (scount[r]) ncclCheck(ncclSend(send + sdispl[r], scount[r], ncclFloat, (int)r, s->ep, st));
        if (rcount[r]) ncclCheck(ncclRecv(recv + rdispl[r], rcount[r], ncclFloat, (int)r, s->ep, st));
    }
    ncclCheck(ncclGroupEnd());
    cudaCheckDist(cudaStreamSynchronize(st));
}

void Dist::nccl_allreduce_(float* base, const std::vector<Span>& spans) const {
    const auto* s = (const NcclState*)nccl_;
    cudaStream_t st = (cudaStream_t)be_->stream();
    be_->synchronize();
    // one group per communicator, in the same order on every rank (WORLD, EP, DP); every rank
    // has the same spans, so a group is skipped everywhere or nowhere
    for (Group g : {WORLD, EP, DP}) {
        bool any = false;
        for (const Span& sp : spans) any = any || (sp.g == g && sp.n > 0);
        if (!any) continue;
        ncclComm_t c = comm_of(*s, g);
        ncclCheck(ncclGroupStart());
        for (const Span& sp : spans)
            if (sp.g == g && sp.n > 0)
                ncclCheck(ncclAllReduce(base + sp.offset, base + sp.offset, sp.n, ncclFloat, ncclSum, c, st));
        ncclCheck(ncclGroupEnd());
    }
    cudaCheckDist(cudaStreamSynchronize(st));
}

}  // namespace moe
#endif  // MOE_NCCL
