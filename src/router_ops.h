/* CPU twins of the Backend routing ops (backend.h: router_topk_forward, router_plan_build,
   router_balance_forward, router_topk_backward), on the backend's arrays in place: the per-token
   ops fused over tokens with the per-token pieces of moe_router.h, the plan build and the
   statistics through the host routing functions. So the CPU backend's routing bits are those
   functions' bits (tests/test_router_ops.cpp); they are also the oracle of the CUDA router
   kernels (tests/gpu/test_gpu_router.cpp). Pointers are host memory. */
#pragma once
#include "backend.h"

namespace moe {

void router_topk_forward_cpu(float* s, int* choice_expert, float* choice_gate, const float* z, const float* bias,
                             const TopkRouterArgs& a);
void router_plan_build_cpu(int* offsets, int* routed, int* token, float* gate, int* choice, int* tok_offsets,
                           int* tok_assign, const int* choice_expert, const float* choice_gate,
                           const TopkRouterArgs& a);
RouterLosses router_balance_forward_cpu(const float* z, const float* s, const int* choice_expert,
                                        const float* choice_gate, const TopkRouterArgs& a, const RouterLossArgs& l);
void router_topk_backward_cpu(float* dz, const float* dgate, const int* choice, int A, const float* z,
                              const float* s, const int* choice_expert, const TopkRouterArgs& a,
                              const RouterLossArgs& l, float dloss_scale);

}  // namespace moe
