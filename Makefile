# moe — build, test, quickstart. `make` builds build/moe (CPU + CUDA where nvcc exists),
# `make test` runs every test that needs no GPU, `make quickstart` goes from a fresh machine
# to a trained model. See README.md.

CXX      ?= g++
# AVX2 + FMA, tuned for this CPU. Not -march=native: on AVX-512 machines Debian's GCC 12.2
# miscompiles a std::vector<double>{20, 20, 0, 0} into {20, 20, 20, 20} (a 256-bit broadcast
# store with the zero lanes never written; tests/test_eval.cpp "load stats" caught it).
OPT      ?= -O3 -march=x86-64-v3 -mtune=native
CXXFLAGS += -std=c++17 $(OPT) -g -fopenmp -Wall -Wextra -Wno-unused-parameter -MMD -MP -Isrc
LDLIBS   += -lyaml-cpp -lfmt -fopenmp
BUILD    ?= build
PYTHON   ?= /usr/bin/python3

# CUDA: compiled into the same binary whenever nvcc is found (NO_CUDA=1 turns it off).
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
ifeq ($(NO_CUDA),1)
  NVCC :=
endif
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
NVCCFLAGS ?= -std=c++17 -O3 -lineinfo -Isrc -Icuda \
             -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
             -Xcompiler -fopenmp
ifneq ($(NVCC),)
  CXXFLAGS += -DMOE_CUDA -I$(CUDA_HOME)/include
  LDLIBS   += -L$(CUDA_HOME)/lib64 -lcudart -Wl,-rpath,$(CUDA_HOME)/lib64
  CUDA_SRC := $(wildcard cuda/*.cu)
endif

ifeq ($(SANITIZE),1)
  CXXFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer
  LDLIBS   += -fsanitize=address,undefined
  BUILD    := build-san
endif

SRC      := $(wildcard src/*.cpp)
CMD      := $(wildcard cmd/*.cpp)
TESTS    := $(wildcard tests/*.cpp)
SRC_OBJ  := $(SRC:%.cpp=$(BUILD)/%.o) $(CUDA_SRC:%.cu=$(BUILD)/%.o)
CMD_OBJ  := $(CMD:%.cpp=$(BUILD)/%.o)
TEST_OBJ := $(TESTS:%.cpp=$(BUILD)/%.o)

.PHONY: all test test-gpu quickstart deps bench bench-gpu clean study
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
	@MOE_BIN=$(BUILD)/moe PYTHON=$(PYTHON) bash tests/run.sh $(BUILD)/test_moe

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
bench: all
	bash scripts/bench.sh

# Trains the same model once per balancing variant and writes docs/study.md + docs/study/*.svg.
study: all
	bash configs/study/run.sh

clean:
	rm -rf build build-san

-include $(SRC_OBJ:.o=.d) $(CMD_OBJ:.o=.d) $(TEST_OBJ:.o=.d)
