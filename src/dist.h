/* Processes of a distributed run (OpenMPI): world = DP x EP ranks, rank = dp * EP + ep.
   The EP group (same dp index, consecutive ranks) shares one data-parallel replica whose experts
   are split E/EP per rank; the DP group (same ep index) holds the same experts. A build without
   MPI, or a run without mpirun, is one process (world 1) and every collective is the identity. */
#pragma once
#include <cstddef>
#include <string>
#include <vector>

namespace moe {

class Dist {
public:
    static Dist& get();                        // process-wide; init() must have run
    void init(int* argc, char*** argv);        // MPI_Init when launched by mpirun
    void finalize();
    void setup_groups(int expert_parallel);    // splits EP / DP communicators; validates sizes
    [[noreturn]] void abort(int code);         // every rank exits (no hang on a failed rank)

    int rank = 0, world = 1, ep = 1, ep_rank = 0, dp = 1, dp_rank = 0;
    bool active() const { return world > 1; }

    // collectives (in place, sums); comm: 0 = world, 1 = EP group, 2 = DP group
    enum Group { WORLD = 0, EP = 1, DP = 2 };
    void allreduce(float* x, size_t n, Group g) const;
    void allreduce(double* x, size_t n, Group g) const;
    // all-to-all in the EP group: send_counts[r] items of `width` floats to EP rank r (in rank
    // order, contiguous), receives recv_counts[r] from each; counts exchanged by alltoall_counts
    // (`per` ints to each EP rank, send.size() == ep * per).
    void alltoall_counts(const std::vector<int>& send, std::vector<int>& recv, int per) const;
    void alltoallv(const float* send, const std::vector<int>& send_counts, float* recv,
                   const std::vector<int>& recv_counts, int width) const;
    void broadcast(void* data, size_t bytes, int root) const;   // over the world
    double comm_seconds = 0, comm_bytes = 0;   // all-to-all totals, for the step line
private:
    void* comm_ep_ = nullptr;
    void* comm_dp_ = nullptr;
    bool mpi_ = false;
};

}  // namespace moe
