"""Compile every CUDA kernel source of the workspace with NVRTC, as the `cuda` build does at run
time, so that CI (which has no GPU and no CUDA toolkit) still catches kernels that do not compile.

NVRTC comes from PyPI's `nvidia-cuda-nvrtc` wheel (see requirements-ci.txt); no driver or GPU
is needed to compile. Usage:
    python3 -m venv .venv-ci && .venv-ci/bin/pip install -r tools/requirements-ci.txt
    .venv-ci/bin/python tools/check_kernels.py [--arch compute_90]
"""

import argparse
import ctypes
import glob
import os
import sys
import sysconfig


def load_nvrtc():
    site = sysconfig.get_paths()["purelib"]
    candidates = sorted(glob.glob(os.path.join(site, "nvidia", "**", "libnvrtc.so*"), recursive=True))
    candidates = [c for c in candidates if "builtins" not in c]
    if not candidates:
        sys.exit("libnvrtc not found: install tools/requirements-ci.txt into this Python")
    return ctypes.CDLL(candidates[0])


def compile_source(nvrtc, path, arch):
    source = open(path, "rb").read()
    program = ctypes.c_void_p()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, path.encode(), 0, None, None))
    # The same options the workers pass at run time.
    options = [f"--gpu-architecture={arch}".encode(), b"--fmad=false", b"--std=c++17"]
    argv = (ctypes.c_char_p * len(options))(*options)
    status = nvrtc.nvrtcCompileProgram(program, len(options), argv)
    log_size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(log_size))
    log = ctypes.create_string_buffer(log_size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    ptx_size = ctypes.c_size_t()
    if status == 0:
        check(nvrtc, nvrtc.nvrtcGetPTXSize(program, ctypes.byref(ptx_size)))
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return status, log.value.decode(errors="replace").strip(), ptx_size.value


def check(nvrtc, status):
    if status != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        sys.exit(f"NVRTC call failed: {nvrtc.nvrtcGetErrorString(status).decode()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="compute_90", help="virtual architecture (default: Hopper)")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    sources = sorted(glob.glob("*/kernels/*.cu"))
    if not sources:
        sys.exit("no kernel sources found under */kernels/")
    nvrtc = load_nvrtc()
    failed = 0
    for path in sources:
        status, log, ptx = compile_source(nvrtc, path, args.arch)
        if status == 0:
            print(f"ok      {path} ({ptx} bytes of PTX for {args.arch})")
        else:
            failed += 1
            print(f"FAILED  {path}\n{log}")
    print(f"{len(sources) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
