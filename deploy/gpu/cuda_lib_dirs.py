#!/usr/bin/env python3
"""Prints the library directories of the NVIDIA CUDA wheels installed for this Python.

The CUDA wheels (nvidia-cublas, nvidia-cuda-runtime, ...; PyTorch depends on them) put
each component's shared libraries under site-packages/nvidia/<component>/lib, or
site-packages/nvidia/cu13/lib for the CUDA 13 bundles. deploy/gpu-check.sh searches these
directories, one per line of this program's output, for the libraries its binaries load.

    python3 deploy/gpu/cuda_lib_dirs.py
"""

from __future__ import annotations

import argparse
import glob
import site


def wheel_lib_dirs() -> list[str]:
    dirs = []
    for packages in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(packages + "/nvidia/*/lib"))
        dirs += sorted(glob.glob(packages + "/nvidia/cu13/lib"))
    return dirs


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    for d in wheel_lib_dirs():
        print(d)


if __name__ == "__main__":
    main()
