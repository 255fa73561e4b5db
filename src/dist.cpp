/* OpenMPI collectives behind Dist; see dist.h. Compiled with MPI when the Makefile finds mpicxx
   (MOE_MPI); otherwise one process, collectives are the identity. The NCCL side (MOE_NCCL) is in
   dist_nccl.cpp. */
#include "dist.h"
#include "backend.h"
#include "common.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#ifdef MOE_MPI
#include <mpi.h>
#endif

namespace moe {

Dist& Dist::get() {
    static Dist d;
    return d;
}

#if defined(MOE_NCCL) && !defined(MOE_MPI)
#error "MOE_NCCL needs MOE_MPI: NCCL communicators are bootstrapped over MPI"
#endif

void Dist::attach(Backend& be) {
    be_ = &be;
    device_ = be.device_memory();
#ifdef MOE_NCCL
    if (device_ && mpi_ && !nccl_) nccl_init_();
#endif
}

void Dist::detach(bool error) {
#ifdef MOE_NCCL
    if (nccl_) nccl_free_(error);
#endif
    be_ = nullptr;
    device_ = false;
}

std::string Dist::transport() const { return nccl_ ? "NCCL" : device_ ? "MPI, host-staged" : "MPI"; }

void Dist::allreduce_device(float* base, const std::vector<Span>& spans) const {
#ifdef MOE_NCCL
    if (nccl_) { nccl_allreduce_(base, spans); return; }
#endif
    fail("Dist::allreduce_device without NCCL communicators (internal error: callers check nccl())");
}

static bool env_flag(const char* name) {
    const char* v = std::getenv(name);
    return v && *v && std::string(v) != "0";
}

#ifdef MOE_MPI

static MPI_Comm comm_of(const void* c) { return *(const MPI_Comm*)c; }

void Dist::init(int* argc, char*** argv) {
    // only when started by mpirun/srun: a plain `moe` run stays a single process without MPI_Init
    if (!std::getenv("OMPI_COMM_WORLD_SIZE") && !std::getenv("PMI_SIZE")) return;
    MPI_Init(argc, argv);
    mpi_ = true;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    if (const char* l = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) {
        local_rank = std::atoi(l);
    } else {  // another launcher: the rank among the processes sharing this node's memory
        MPI_Comm node;
        MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
        MPI_Comm_rank(node, &local_rank);
        MPI_Comm_free(&node);
    }
}

void Dist::finalize() {
    if (!mpi_) return;
#ifdef MOE_NCCL
    if (nccl_) nccl_free_(false);   // before MPI goes (normally DistAttach has done it)
#endif
    if (comm_ep_) { MPI_Comm_free((MPI_Comm*)comm_ep_); delete (MPI_Comm*)comm_ep_; comm_ep_ = nullptr; }
    if (comm_dp_) { MPI_Comm_free((MPI_Comm*)comm_dp_); delete (MPI_Comm*)comm_dp_; comm_dp_ = nullptr; }
    MPI_Finalize();
    mpi_ = false;
}

void Dist::abort(int code) {
    if (mpi_ && world > 1) MPI_Abort(MPI_COMM_WORLD, code);
    std::exit(code);
}

void Dist::setup_groups(int expert_parallel) {
    if (world % expert_parallel != 0)
        fail("world size {} is not divisible by dist.expert_parallel = {} (mpirun -np)", world, expert_parallel);
    ep = expert_parallel;
    dp = world / ep;
    ep_rank = rank % ep;
    dp_rank = rank / ep;
    force_exchange_ = env_flag("MOE_FORCE_EXCHANGE");
    if (!mpi_) return;
    if (comm_ep_) return;
    auto* e = new MPI_Comm;
    auto* d = new MPI_Comm;
    MPI_Comm_split(MPI_COMM_WORLD, dp_rank, ep_rank, e);
    MPI_Comm_split(MPI_COMM_WORLD, ep_rank, dp_rank, d);
    comm_ep_ = e;
    comm_dp_ = d;
}

static MPI_Comm pick(Dist::Group g, void* ep, void* dp) {
    return g == Dist::WORLD ? MPI_COMM_WORLD : comm_of(g == Dist::EP ? ep : dp);
}

void Dist::allreduce(float* x, size_t n, Group g) const {
    if (!mpi_ || n == 0) return;
    MPI_Allreduce(MPI_IN_PLACE, x, (int)n, MPI_FLOAT, MPI_SUM, pick(g, comm_ep_, comm_dp_));
}

void Dist::allreduce(double* x, size_t n, Group g) const {
    if (!mpi_ || n == 0) return;
    MPI_Allreduce(MPI_IN_PLACE, x, (int)n, MPI_DOUBLE, MPI_SUM, pick(g, comm_ep_, comm_dp_));
}

void Dist::alltoall_counts(const std::vector<int>& send, std::vector<int>& recv, int per) const {
    recv.assign(send.size(), 0);
    if (!mpi_ || ep == 1) { recv = send; return; }
    MPI_Alltoall(send.data(), per, MPI_INT, recv.data(), per, MPI_INT, comm_of(comm_ep_));
}

void Dist::alltoallv(const float* send, const std::vector<int>& sc, float* recv, const std::vector<int>& rc,
                     int width) const {
    const int n = (int)sc.size();
    std::vector<int> scount(n), sdispl(n), rcount(n), rdispl(n);
    int so = 0, ro = 0;
    for (int r = 0; r < n; r++) {
        scount[r] = sc[r] * width; sdispl[r] = so; so += scount[r];
        rcount[r] = rc[r] * width; rdispl[r] = ro; ro += rcount[r];
    }
#ifdef MOE_NCCL
    if (nccl_) {  // device rows: grouped ncclSend/ncclRecv (also the self-exchange of EP = 1)
        std::vector<size_t> sc64(n), sd64(n), rc64(n), rd64(n);
        size_t so64 = 0, ro64 = 0;
        for (int r = 0; r < n; r++) {
            sc64[r] = (size_t)sc[r] * width; sd64[r] = so64; so64 += sc64[r];
            rc64[r] = (size_t)rc[r] * width; rd64[r] = ro64; ro64 += rc64[r];
        }
        auto t0 = std::chrono::steady_clock::now();
        nccl_alltoallv_(send, sc64, sd64, recv, rc64, rd64);
        auto* self = const_cast<Dist*>(this);
        self->comm_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        self->comm_bytes += (double)(so64 - sc64[ep_rank]) * sizeof(float);
        return;
    }
#endif
    if (!mpi_ || ep == 1) {
        if (device_) be_->copy(recv, send, (size_t)so * sizeof(float));
        else std::memcpy(recv, send, (size_t)so * sizeof(float));
        return;
    }
    auto t0 = std::chrono::steady_clock::now();
    if (device_) {  // device rows without NCCL: through host memory
        std::vector<float> hs((size_t)so), hr((size_t)ro);
        be_->download(hs.data(), send, hs.size() * sizeof(float));
        MPI_Alltoallv(hs.data(), scount.data(), sdispl.data(), MPI_FLOAT, hr.data(), rcount.data(), rdispl.data(),
                      MPI_FLOAT, comm_of(comm_ep_));
        be_->upload(recv, hr.data(), hr.size() * sizeof(float));
    } else {
        MPI_Alltoallv(send, scount.data(), sdispl.data(), MPI_FLOAT, recv, rcount.data(), rdispl.data(), MPI_FLOAT,
                      comm_of(comm_ep_));
    }
    auto* self = const_cast<Dist*>(this);
    self->comm_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    self->comm_bytes += (double)(so - scount[ep_rank]) * sizeof(float);
}

void Dist::broadcast(void* data, size_t bytes, int root) const {
    if (!mpi_) return;
    MPI_Bcast(data, (int)bytes, MPI_BYTE, root, MPI_COMM_WORLD);
}

#else  // one process

void Dist::init(int*, char***) {}
void Dist::finalize() {}
void Dist::abort(int code) { std::exit(code); }
void Dist::setup_groups(int expert_parallel) {
    if (expert_parallel != 1)
        fail("dist.expert_parallel = {} needs an MPI build and mpirun (this build has no MPI)", expert_parallel);
    force_exchange_ = env_flag("MOE_FORCE_EXCHANGE");
}
void Dist::allreduce(float*, size_t, Group) const {}
void Dist::allreduce(double*, size_t, Group) const {}
void Dist::alltoall_counts(const std::vector<int>& send, std::vector<int>& recv, int) const { recv = send; }
void Dist::alltoallv(const float* send, const std::vector<int>& sc, float* recv, const std::vector<int>&, int width) const {
    size_t n = 0;
    for (int c : sc) n += (size_t)c * width;
    if (device_) be_->copy(recv, send, n * sizeof(float));
    else std::memcpy(recv, send, n * sizeof(float));
}
void Dist::broadcast(void*, size_t, int) const {}

#endif

}  // namespace moe
