"""Keep a real GPU busy for a while, with nothing but the driver: the real-GPU check's workload.

The machines the exporter is checked on have a driver and no CUDA toolkit or framework, so this
loads ``libcuda.so.1`` through ctypes, JIT-compiles a small PTX kernel that spins on FMAs until a
clock-cycle budget is spent, and launches it back to back on every SM. It also holds a chunk of
device memory, so the process shows in NVML's process list with memory attributed to it.

    python3 bench/gpu_load.py --seconds 20 --memory-gib 4 [--device 0]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time

# One thread per lane, each spinning on dependent FMAs until `cycles` SM clocks have passed; the
# result is stored so the JIT cannot drop the loop. PTX is forward compatible: sm_80 code is
# compiled by the driver for whatever the GPU is (an H100/H200 is sm_90).
SPIN_PTX = b"""
.version 7.0
.target sm_80
.address_size 64

.visible .entry spin(.param .u64 out, .param .u64 cycles)
{
    .reg .u64 %rd<6>;
    .reg .f32 %f<3>;
    .reg .pred %p1;
    ld.param.u64 %rd1, [out];
    ld.param.u64 %rd2, [cycles];
    mov.u64 %rd3, %clock64;
    mov.f32 %f1, 0f3F800000;
    mov.f32 %f2, 0f3F7FFFFF;
LOOP:
    fma.rn.f32 %f1, %f1, %f2, %f2;
    mov.u64 %rd4, %clock64;
    sub.u64 %rd5, %rd4, %rd3;
    setp.lt.u64 %p1, %rd5, %rd2;
    @%p1 bra LOOP;
    cvta.to.global.u64 %rd1, %rd1;
    st.global.f32 [%rd1], %f1;
    ret;
}
"""

CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
CU_JIT_ERROR_LOG_BUFFER = 5
CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 6
THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 8
CYCLES_PER_LAUNCH = 500_000_000  # about a third of a second at the clocks of a datacenter GPU


class CudaError(RuntimeError):
    pass


def _check(cuda: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        message = ctypes.c_char_p()
        cuda.cuGetErrorString(status, ctypes.byref(message))
        raise CudaError(f"{what}: CUDA error {status} ({(message.value or b'?').decode()})")


def run(seconds: float, memory_gib: float, device: int) -> int:
    cuda = ctypes.CDLL("libcuda.so.1")
    _check(cuda, cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(cuda, cuda.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    _check(cuda, cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev), "cuCtxCreate")
    sms = ctypes.c_int()
    _check(cuda, cuda.cuDeviceGetAttribute(ctypes.byref(sms), CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
           "cuDeviceGetAttribute")
    held = ctypes.c_uint64()
    if memory_gib > 0:
        _check(cuda, cuda.cuMemAlloc_v2(ctypes.byref(held), ctypes.c_size_t(int(memory_gib * 2**30))), "cuMemAlloc")
    out = ctypes.c_uint64()
    _check(cuda, cuda.cuMemAlloc_v2(ctypes.byref(out), ctypes.c_size_t(4)), "cuMemAlloc")
    module = ctypes.c_void_p()
    jit_log = ctypes.create_string_buffer(8192)
    options = (ctypes.c_int * 2)(CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES)
    values = (ctypes.c_void_p * 2)(ctypes.cast(jit_log, ctypes.c_void_p), ctypes.c_void_p(len(jit_log)))
    status = cuda.cuModuleLoadDataEx(ctypes.byref(module), ctypes.c_char_p(SPIN_PTX), 2, options, values)
    if status != 0:
        # The memory is still held, so the process keeps showing in NVML's process list.
        print(f"gpu_load: the kernel did not compile (CUDA error {status}): {jit_log.value.decode(errors='replace')}",
              flush=True)
        time.sleep(seconds)
        return 1
    kernel = ctypes.c_void_p()
    _check(cuda, cuda.cuModuleGetFunction(ctypes.byref(kernel), module, b"spin"), "cuModuleGetFunction")
    cycles = ctypes.c_uint64(CYCLES_PER_LAUNCH)
    params = (ctypes.c_void_p * 2)(ctypes.cast(ctypes.byref(out), ctypes.c_void_p),
                                   ctypes.cast(ctypes.byref(cycles), ctypes.c_void_p))
    print(f"gpu_load: device {device}, {sms.value} SMs, holding {memory_gib:g} GiB, spinning for {seconds:g} s",
          flush=True)
    launches = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _check(cuda, cuda.cuLaunchKernel(kernel, sms.value * BLOCKS_PER_SM, 1, 1, THREADS_PER_BLOCK, 1, 1,
                                         0, None, params, None), "cuLaunchKernel")
        _check(cuda, cuda.cuCtxSynchronize(), "cuCtxSynchronize")
        launches += 1
    print(f"gpu_load: {launches} launches done", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--memory-gib", type=float, default=4.0)
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return run(args.seconds, args.memory_gib, args.device)
    except (OSError, CudaError) as error:
        print(f"gpu_load: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
