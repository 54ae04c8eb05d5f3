"""Shrink an unpacked fbgemm-gpu CUDA wheel to fit a 64 MiB transfer to an offline GPU host.

How the stack of ../REPORT.md was carried to the H200: PyPI's fbgemm-gpu 1.6.0 wheel is
443 MiB; its shared libraries hold cubins for sm_80, sm_90 and sm_100. This zeroes, in place,
the payload of every cubin in each library's ``.nv_fatbin`` section that is not for the kept
architecture, the backward kernels of optimizers a job never uses, and the kernels of three
libraries CiUBM's training never calls. The section keeps its
size and layout, so the libraries load unchanged; zeroed bytes compress to almost nothing.
With CUDA's lazy module loading (``CUDA_MODULE_LOADING=LAZY``) a zeroed cubin is never read.

    python prune_fbgemm.py UNPACKED_WHEEL_DIR --arch 90
    tar cf - fbgemm_gpu fbgemm_gpu-*.dist-info | xz -9e -T2 > fbgemm_sm90.tar.xz   # 42 MiB

Fatbin layout (as read here): containers of a 16-byte header (magic 0xBA55ED50, version,
header size, payload size), each holding entries of a header (kind, version, header size,
payload size, ..., architecture at byte 28) followed by the payload.
"""

from __future__ import annotations

import argparse
import re
import struct
import subprocess
from collections import Counter
from pathlib import Path
from typing import Iterator, Tuple

FATBIN_MAGIC = 0xBA55ED50
# kernels named split_embedding_backward_codegen_<optimizer>_{unweighted,weighted,dense,ssd}...
OPTIMIZER_IN_KERNEL = re.compile(rb"codegen_([a-z_]+?)_(?:unweighted|weighted|dense|ssd)")
UNUSED_OPTIMIZERS = {"adagrad", "partial_rowwise_lamb", "rowwise_adagrad_with_counter", "lars_sgd", "lamb",
                     "partial_rowwise_adam", "none"}  # CiUBM uses adam (CUDA), rowwise_adagrad and sgd
# libraries whose kernels CiUBM's training never launches (quantized inference, global weight
# decay, variable batch sizes): all their cubins go; the libraries still load and register ops
NEVER_LAUNCHED = {"fbgemm_gpu_tbe_inference", "fbgemm_gpu_tbe_training_backward_gwd",
                  "fbgemm_gpu_tbe_training_backward_vbe"}


def fatbin_section(library: Path) -> Tuple[int, int]:
    """``(file offset, size)`` of the library's ``.nv_fatbin`` section."""
    for line in subprocess.check_output(["readelf", "-S", "-W", str(library)], text=True).splitlines():
        fields = line.replace("[ ", "[").split()
        if ".nv_fatbin" in fields:
            at = fields.index(".nv_fatbin")
            return int(fields[at + 3], 16), int(fields[at + 4], 16)
    raise LookupError(f"{library}: no .nv_fatbin section")


def cubins(data: bytes, start: int, end: int) -> Iterator[Tuple[int, int, int]]:
    """``(payload offset, payload size, architecture)`` of every entry between start and end."""
    position = start
    while position < end:
        magic, _, header_size, container_size = struct.unpack_from("<IHHQ", data, position)
        if magic != FATBIN_MAGIC:  # alignment padding between containers
            position += 8
            continue
        entry, container_end = position + header_size, position + header_size + container_size
        while entry < container_end:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            if entry_header == 0:
                break
            yield entry + entry_header, payload, struct.unpack_from("<I", data, entry + 28)[0]
            entry += entry_header + payload
        position = container_end


def prune(library: Path, arch: int) -> int:
    """Zero the unneeded cubins of one library in place; the bytes zeroed."""
    try:
        start, size = fatbin_section(library)
    except LookupError:
        return 0
    data = bytearray(library.read_bytes())
    zeroed = 0
    for offset, payload, cubin_arch in list(cubins(data, start, start + size)):
        body = bytes(data[offset:offset + payload])
        optimizers = Counter(m.group(1).decode() for m in OPTIMIZER_IN_KERNEL.finditer(body))
        unused = bool(optimizers) and optimizers.most_common(1)[0][0] in UNUSED_OPTIMIZERS
        if cubin_arch != arch or unused or library.stem in NEVER_LAUNCHED:
            data[offset:offset + payload] = bytes(payload)
            zeroed += payload
    library.write_bytes(data)
    return zeroed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel_dir", type=Path, help="the unpacked wheel (holding fbgemm_gpu/)")
    parser.add_argument("--arch", type=int, default=90, help="the SM architecture to keep (90: Hopper)")
    args = parser.parse_args()
    for library in sorted((args.wheel_dir / "fbgemm_gpu").rglob("*.so")):
        print(f"{library.name}: {prune(library, args.arch) / 2**20:.0f} MiB zeroed")


if __name__ == "__main__":
    main()
