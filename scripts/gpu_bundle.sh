#!/usr/bin/env bash
# Builds, here, what `make test-gpu` and `make bench-gpu` need on a GPU machine that has the CUDA
# driver but none of our Debian build dependencies (a bare CUDA image with no package registry,
# like the workplace's lent GPU machines: docs/gpu-testing.md): build/moe, build/test_gpu and
# build/bench_kernels built into build-gpu/ (sm_80 + sm_90 as always; AVX2 so that any x86-64 host
# CPU of the last decade runs the CPU twins; no OpenMPI, whose runtime would not be there), stripped,
# with the shared libraries they load that such an image may lack (yaml-cpp, fmt, the GCC runtime,
# the CUDA runtime), in gpu-bundle/ (ignored by git, ~25 MB). scripts/gpu_run.sh runs them there.
# Each binary is started through a small wrapper that puts gpu-bundle/lib first on its library
# path only, so the GPU machine's own Python and PyTorch keep their libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || { echo "gpu_bundle: nvcc not found" >&2; exit 1; }
B=build-gpu
make -j"$(nproc)" BUILD=$B ARCH=x86-64-v3 NO_MPI=1 $B/moe $B/test_gpu $B/bench_kernels
rm -rf gpu-bundle
mkdir -p gpu-bundle/bin gpu-bundle/lib
for b in moe test_gpu bench_kernels; do
  strip -o gpu-bundle/bin/$b $B/$b
  cat > gpu-bundle/$b <<'EOF'
#!/usr/bin/env bash
d=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/bin/$(basename "${BASH_SOURCE[0]}")" "$@"
EOF
  chmod +x gpu-bundle/$b
done
# every library the binaries load except glibc's own (libc, libm, libdl, libpthread, librt and the
# loader, which must be the machine's) and the driver's libcuda; cuBLAS (bench_kernels' reference
# only, ~0.5 GB) is taken from the GPU machine's CUDA toolkit
for b in gpu-bundle/bin/*; do ldd "$b"; done | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u |
  while read -r name path; do
    case $name in
      libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libcuda.so*|libcublas*) ;;
      *) cp -L "$path" gpu-bundle/lib/ ;;
    esac
  done
du -sh gpu-bundle
ls gpu-bundle/lib
