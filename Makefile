# moe — build, test, quickstart. `make` builds build/moe (CPU + CUDA where nvcc exists),
# `make test` runs every test that needs no GPU, `make quickstart` goes from a fresh machine
# to a trained model. See README.md.

CXX      ?= g++
# AVX2 + FMA with generic tuning, and no SLP vectorizer: Debian's GCC 12.2 miscompiles
# std::vector<double>{20, 20, 0, 0} into {20, 20, 20, 20} (one broadcast store, the zero lanes
# never written) under -march=native or -mtune=native on this CPU. tests/test_eval.cpp
# "load stats" is the canary. The hot loops (GEMM, exp) are written with vector types and
# do not depend on the SLP vectorizer.
# AVX-512 (x86-64-v4) where the build machine has it: the GEMM micro-kernel and the vector exp
# double their width (measured: quickstart steps 1.4x faster on the CI machine). The binary is
# then for machines with AVX-512; ARCH=x86-64-v3 builds one for any AVX2 machine.
ifeq ($(origin ARCH),undefined)
  ARCH   := $(if $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo y),x86-64-v4 -mprefer-vector-width=512,x86-64-v3)
endif
OPT      ?= -O3 -march=$(ARCH) -fno-tree-slp-vectorize
CXXFLAGS += -std=c++17 $(OPT) -fno-math-errno -g -fopenmp -Wall -Wextra -Wno-unused-parameter -MMD -MP -Isrc
LDLIBS   += -lyaml-cpp -lfmt -fopenmp
BUILD    ?= build
PYTHON   ?= /usr/bin/python3

# CUDA: compiled into the same binary whenever nvcc is found (NO_CUDA=1 turns it off; so does
# SANITIZE=1: nvcc code is not instrumented, and the CUDA runtime under ASan needs its own
# settings (protect_shadow_gap=0) for nothing the CPU tests use).
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
ifneq ($(filter 1,$(NO_CUDA) $(SANITIZE)),)
  NVCC :=
endif
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
NVCCFLAGS ?= -std=c++17 -O3 -lineinfo -Isrc -Icuda \
             -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
             -Xcompiler -fopenmp
# warnings are errors in CUDA code (the device compiler's and the host compiler's, -Wall)
NVCCFLAGS += -Werror all-warnings -Xcompiler -Wall,-Werror
ifneq ($(NVCC),)
  CXXFLAGS += -DMOE_CUDA -I$(CUDA_HOME)/include
  LDLIBS   += -L$(CUDA_HOME)/lib64 -lcudart -Wl,-rpath,$(CUDA_HOME)/lib64
  CUDA_SRC := $(wildcard cuda/*.cu)
endif

# OpenMPI: distributed training (`mpirun -np N build/moe train ...`) whenever mpicxx is found
# (NO_MPI=1 turns it off); the same binary runs as one process without mpirun.
MPICXX ?= $(shell command -v mpicxx 2>/dev/null)
ifeq ($(NO_MPI),1)
  MPICXX :=
endif
ifneq ($(MPICXX),)
  CXXFLAGS += -DMOE_MPI $(shell $(MPICXX) --showme:compile)
  LDLIBS   += $(shell $(MPICXX) --showme:link)
endif

# NCCL: the GPU transport of distributed runs (docs/nccl.md), built in when CUDA and MPI (its
# bootstrap) are and $(NCCL_HOME)/include/nccl.h exists (NCCL_HOME defaults to CUDA_HOME;
# NO_NCCL=1 turns it off). Without it, GPU runs under mpirun stage their buffers through MPI.
NCCL_HOME ?= $(CUDA_HOME)
ifneq ($(and $(NVCC),$(MPICXX),$(wildcard $(NCCL_HOME)/include/nccl.h)),)
  ifneq ($(NO_NCCL),1)
    CXXFLAGS += -DMOE_NCCL -I$(NCCL_HOME)/include
    LDLIBS   += -L$(NCCL_HOME)/lib64 -lnccl -Wl,-rpath,$(NCCL_HOME)/lib64
  endif
endif

# Sanitizers: `make test SANITIZE=1` builds everything with ASan + UBSan (-O1, CPU only) into
# build-san/ and runs the suite there, the moe binary included (docs/hardening.md). UBSan aborts
# on its first report instead of printing and going on; any sanitizer report exits 86, so no
# test mistakes it for a user error (exit 1). Leaks inside OpenMPI (the mpirun ranks of
# test_dist.cpp) are suppressed by tests/lsan.supp, which needs full malloc stacks
# (fast_unwind_on_malloc=0). These defaults apply unless ASAN_OPTIONS etc. are set.
ifeq ($(SANITIZE),1)
  OPT      := -O1 -march=$(ARCH)
  CXXFLAGS += -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g1
  LDLIBS   += -fsanitize=address,undefined
  BUILD    := build-san
  # build time is most of the sanitizer stage on a 2-core CI machine: line tables only (-g1,
  # all a report needs), and the test files, whose time goes into the library, at -O0
  $(BUILD)/tests/%.o: OPT := -O0 -march=$(ARCH)
  ASAN_OPTIONS  ?= detect_leaks=1:exitcode=86:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:fast_unwind_on_malloc=0
  UBSAN_OPTIONS ?= print_stacktrace=1:halt_on_error=1:exitcode=86
  LSAN_OPTIONS  ?= exitcode=86:suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0
  export ASAN_OPTIONS UBSAN_OPTIONS LSAN_OPTIONS
endif
# Extra arguments for the doctest runner, e.g. TEST_ARGS='-tce=*oracle*' (skip test cases whose
# name matches) or TEST_ARGS='-tc=cli:*' (only those). CI (.ci/run) runs the sanitizer suite
# with -tce=*oracle*: the PyTorch oracle cases are half of the plain suite's time, almost all of
# it in Python, and the C++ paths they compare are already driven by the finite-difference,
# exact-behaviour, training and CLI tests; skipping them keeps build + test under sanitizers
# near 8 minutes on a 2-core machine (about 4 + 4) instead of well over 10.
TEST_ARGS ?=

SRC      := $(wildcard src/*.cpp)
CMD      := $(wildcard cmd/*.cpp)
TESTS    := $(wildcard tests/*.cpp)
SRC_OBJ  := $(SRC:%.cpp=$(BUILD)/%.o) $(CUDA_SRC:%.cu=$(BUILD)/%.o)
CMD_OBJ  := $(CMD:%.cpp=$(BUILD)/%.o)
TEST_OBJ := $(TESTS:%.cpp=$(BUILD)/%.o)

.PHONY: all test test-gpu quickstart deps bench bench-gpu clean study fuzz fuzz-build
all: $(BUILD)/moe

$(BUILD)/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(BUILD)/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/moe: $(SRC_OBJ) $(CMD_OBJ)
	$(CXX) $^ -o $@ $(LDLIBS)

$(BUILD)/test_moe: $(SRC_OBJ) $(TEST_OBJ)
	$(CXX) $^ -o $@ $(LDLIBS)

# Every CPU test: unit, finite differences, PyTorch oracle, CLI behaviour. The last line is
# the runner's summary ("test: N passed, N failed").
test: $(BUILD)/moe $(BUILD)/test_moe
	@MOE_BIN=$(BUILD)/moe PYTHON=$(PYTHON) bash tests/run.sh $(BUILD)/test_moe $(TEST_ARGS)

# Installs what is missing (Debian packages), builds, makes the synthetic corpus, trains the
# quickstart model and evaluates it.
quickstart: deps
	$(MAKE) all
	@test -f data/synth/train_000.bin || $(BUILD)/moe data synth --out data/synth
	$(BUILD)/moe train configs/quickstart.yaml
	$(BUILD)/moe eval --ckpt runs/quickstart

deps:
	@bash scripts/install_deps.sh

# Our trainer vs the PyTorch reference model on the same configs, in one run (CPU).
bench: all $(BUILD)/bench_gemm_cpu
	bash scripts/bench.sh
	@echo; echo "CPU GEMM engine, one thread (tests/bench/gemm_cpu.cpp):"; echo
	@$(BUILD)/bench_gemm_cpu

$(BUILD)/bench_gemm_cpu: $(BUILD)/tests/bench/gemm_cpu.o $(SRC_OBJ)
	$(CXX) $^ -o $@ $(LDLIBS)

# ---- GPU tests and benchmarks (docs/gpu-testing.md) -------------------------------------------
# `make test-gpu`: build/test_gpu (tests/gpu/*.cpp, its own doctest main) checks every CUDA op
# against its CPU twin and whole training runs against the CPU trainer. Not part of `make test`.
# Skips (exit 0, one line) when the build has no CUDA or no GPU is visible (test_gpu --probe).
# First the NCCL smoke test (tests/gpu/nccl_smoke.sh: one rank over NCCL == one process; 2 ranks
# x EP 2 where 2 GPUs are visible; it skips itself without mpirun or NCCL), then the doctest
# runner, whose summary line comes last; either failing fails the target.
# `make bench-gpu`: scripts/bench_gpu.sh, full training steps of configs/bench/gpu_*.yaml beside
# the PyTorch reference (eager, torch.compile) and build/bench_kernels (tests/gpu/bench_kernels.cu:
# grouped expert GEMM vs cuBLAS, dispatch/combine vs cudaMemcpy bandwidth).
GPU_TEST_SRC := $(wildcard tests/gpu/*.cpp)
GPU_TEST_OBJ := $(GPU_TEST_SRC:%.cpp=$(BUILD)/%.o)

$(BUILD)/test_gpu: $(SRC_OBJ) $(GPU_TEST_OBJ)
	$(CXX) $^ -o $@ $(LDLIBS)

$(BUILD)/bench_kernels: $(BUILD)/tests/gpu/bench_kernels.o $(BUILD)/tests/gpu/gpu_common.o $(SRC_OBJ)
	$(CXX) $^ -o $@ $(LDLIBS) -lcublas

test-gpu:
ifeq ($(NVCC),)
	@echo "test-gpu: skipped (this build has no CUDA: nvcc not found)"
else
	@$(MAKE) --no-print-directory $(BUILD)/moe $(BUILD)/test_gpu
	@why=$$($(BUILD)/test_gpu --probe); rc=$$?; \
	if [ $$rc -eq 3 ]; then echo "test-gpu: skipped ($$why)"; exit 0; fi; \
	if [ $$rc -ne 0 ]; then echo "test-gpu: $(BUILD)/test_gpu --probe failed (exit $$rc): $$why"; exit 1; fi; \
	echo "test-gpu: $$why"; \
	bash tests/gpu/nccl_smoke.sh $(BUILD)/moe; smoke=$$?; \
	MOE_BIN=$(BUILD)/moe PYTHON=$(PYTHON) bash tests/run.sh $(BUILD)/test_gpu $(TEST_ARGS); rc=$$?; \
	[ $$smoke -eq 0 ] || echo "test-gpu: the NCCL smoke test failed (output above)"; \
	[ $$smoke -eq 0 ] && [ $$rc -eq 0 ]
endif

bench-gpu:
ifeq ($(NVCC),)
	@echo "bench-gpu: skipped (this build has no CUDA: nvcc not found)"
else
	@$(MAKE) --no-print-directory $(BUILD)/moe $(BUILD)/bench_kernels
	@MOE=$(BUILD)/moe BENCH_KERNELS=$(BUILD)/bench_kernels PYTHON=$(PYTHON) bash scripts/bench_gpu.sh
endif

-include $(GPU_TEST_OBJ:.o=.d) $(BUILD)/tests/gpu/bench_kernels.d

# Trains the same model once per balancing variant and writes docs/study.md + docs/study/*.svg.
study: all
	bash configs/study/run.sh

# Fuzzing with libFuzzer (clang): tests/fuzz/fuzz_<target>.cpp, each linked against the parser
# it targets (built with -fsanitize=fuzzer-no-link,address,undefined into build-fuzz/), runs for
# FUZZ_SECONDS from its seeds in tests/fuzz/corpus/<target>/. A crash, leak, uncaught exception
# other than moe::Error, or allocation over 1 GB fails the target; tests/fuzz/run.sh says where
# the input went. `make fuzz FUZZ_TARGETS=config FUZZ_SECONDS=600` runs one target longer.
FUZZ_CXX     ?= clang++
FUZZ_BUILD   ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= safetensors shard config set llmc
FUZZ_FLAGS   := -std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
                -fno-sanitize-recover=undefined -Isrc -Itests/fuzz -MMD -MP
FUZZ_LIB_OBJ := $(patsubst %.cpp,$(FUZZ_BUILD)/%.o,src/checkpoint.cpp src/data.cpp src/config.cpp \
                src/fileio.cpp src/llmc_import.cpp)

$(FUZZ_BUILD)/src/%.o: src/%.cpp
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FUZZ_BUILD)/fuzz_%: tests/fuzz/fuzz_%.cpp $(FUZZ_LIB_OBJ)
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_FLAGS) -fsanitize=fuzzer $< $(FUZZ_LIB_OBJ) -o $@ -lyaml-cpp -lfmt

fuzz-build: $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/fuzz_%)
.SECONDARY: $(FUZZ_LIB_OBJ)

fuzz: fuzz-build
	@FUZZ_BUILD=$(FUZZ_BUILD) FUZZ_SECONDS=$(FUZZ_SECONDS) bash tests/fuzz/run.sh $(FUZZ_TARGETS)

clean:
	rm -rf build build-san build-fuzz

-include $(SRC_OBJ:.o=.d) $(CMD_OBJ:.o=.d) $(TEST_OBJ:.o=.d) $(wildcard $(FUZZ_BUILD)/*.d $(FUZZ_BUILD)/src/*.d)
