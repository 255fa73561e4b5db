/* Processes of a distributed run (OpenMPI): world = DP x EP ranks, rank = dp * EP + ep.
   The EP group (same dp index, consecutive ranks) shares one data-parallel replica whose experts
   are split E/EP per rank; the DP group (same ep index) holds the same experts. A build without
   MPI, or a run without mpirun, is one process (world 1) and every collective is the identity.

   Transport by where the buffers live (docs/nccl.md): host memory (the CPU backend, and every
   host-side array: counts, losses, checkpoint gathers) goes through MPI. Backend memory on a GPU
   (Backend::device_memory) goes through NCCL when the build has it (MOE_NCCL) and the run was
   started by mpirun: communicators for the world, EP and DP groups are bootstrapped over MPI when
   the backend is attached. Without NCCL, device buffers are staged through host memory and MPI. */
#pragma once
#include <cstddef>
#include <exception>
#include <string>
#include <vector>

namespace moe {

struct Backend;

class Dist {
public:
    static Dist& get();                        // process-wide; init() must have run
    void init(int* argc, char*** argv);        // MPI_Init when launched by mpirun
    void finalize();
    void setup_groups(int expert_parallel);    // splits EP / DP communicators; validates sizes
    [[noreturn]] void abort(int code);         // every rank exits (no hang on a failed rank)

    int rank = 0, world = 1, ep = 1, ep_rank = 0, dp = 1, dp_rank = 0;
    int local_rank = 0;                        // rank among those on this node
    bool active() const { return world > 1; }
    // GPU of this rank among `device_count` visible ones: local rank mod count (as llm.c).
    // make_backend creates the CUDA backend on it; attach() checks that it did.
    int device_for_rank(int device_count) const { return device_count > 0 ? local_rank % device_count : 0; }

    // The backend whose memory alltoallv and allreduce_device move (DistAttach scopes it). With
    // device memory, an MPI launch and a NCCL build, creates the NCCL communicators (also for a
    // world of one rank, so that a one-rank run exercises them). detach(error) frees them
    // (ncclCommAbort when unwinding from an error, so that no rank waits on the others).
    void attach(Backend& be);
    void detach(bool error = false);
    bool nccl() const { return nccl_ != nullptr; }   // device buffers go through NCCL
    std::string transport() const;                   // "MPI", "NCCL", "MPI, host-staged"

    // MoE layers send rows by all-to-all: with EP > 1, or with the test hook MOE_FORCE_EXCHANGE=1
    // (read by setup_groups) also with EP = 1, a self-exchange, so that a one-rank run goes
    // through the same dispatch/combine transport.
    bool exchange() const { return ep > 1 || force_exchange_; }

    // collectives (in place, sums); comm: 0 = world, 1 = EP group, 2 = DP group
    enum Group { WORLD = 0, EP = 1, DP = 2 };
    // host memory, MPI
    void allreduce(float* x, size_t n, Group g) const;
    void allreduce(double* x, size_t n, Group g) const;
    // Backend (device) memory, NCCL (only when nccl()): each span [offset, offset + n) of base
    // summed in place over its group; one grouped call per communicator. NCCL's reduction order
    // is its own: results match MPI's and one process's within rounding, not bit for bit.
    struct Span { size_t offset, n; Group g; };
    void allreduce_device(float* base, const std::vector<Span>& spans) const;
    // all-to-all in the EP group: send_counts[r] items of `width` floats to EP rank r (in rank
    // order, contiguous), receives recv_counts[r] from each; counts exchanged by alltoall_counts
    // (`per` ints to each EP rank, send.size() == ep * per), host data over MPI. The rows are in
    // the attached backend's memory: MPI_Alltoallv for host memory, grouped ncclSend/ncclRecv for
    // device memory (host-staged MPI without NCCL); blocking either way.
    void alltoall_counts(const std::vector<int>& send, std::vector<int>& recv, int per) const;
    void alltoallv(const float* send, const std::vector<int>& send_counts, float* recv,
                   const std::vector<int>& recv_counts, int width) const;
    void broadcast(void* data, size_t bytes, int root) const;   // over the world, host memory
    double comm_seconds = 0, comm_bytes = 0;   // all-to-all totals, for the step line
private:
    // dist_nccl.cpp (MOE_NCCL)
    void nccl_init_();
    void nccl_free_(bool abort);
    void nccl_alltoallv_(const float* send, const std::vector<size_t>& scount, const std::vector<size_t>& sdispl,
                         float* recv, const std::vector<size_t>& rcount, const std::vector<size_t>& rdispl) const;
    void nccl_allreduce_(float* base, const std::vector<Span>& spans) const;

    void* comm_ep_ = nullptr;
    void* comm_dp_ = nullptr;
    bool mpi_ = false;
    bool force_exchange_ = false;
    Backend* be_ = nullptr;     // attached backend
    bool device_ = false;       // its memory is on a GPU
    void* nccl_ = nullptr;      // NcclState (dist_nccl.cpp) while attached with NCCL
};

// Attaches a backend to Dist for a scope (run_training); detaches before the backend goes, with
// ncclCommAbort instead of a collective clean-up when the scope ends by an exception.
struct DistAttach {
    explicit DistAttach(Backend& be) { Dist::get().attach(be); }
    ~DistAttach() { Dist::get().detach(std::uncaught_exceptions() > 0); }
    DistAttach(const DistAttach&) = delete;
    DistAttach& operator=(const DistAttach&) = delete;
};

}  // namespace moe
