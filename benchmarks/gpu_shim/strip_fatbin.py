"""Keep one GPU architecture's machine code in a CUDA library's fat binaries; zero every other entry's bytes.

Usage::

    python strip_fatbin.py LIBRARY.so [ARCH]      # ARCH as in sm_ARCH, default 90 (H100, H200)

For gpu_check.sh only: faiss' GPU wheel (faiss-gpu 1.15.1, 135 MB) holds its kernels for sm_70 to sm_90
and is too large to travel to the lent machine (64 MiB a call). The CUDA runtime loads the entry whose
architecture matches the GPU, so with the other entries' payloads zeroed (headers and sizes kept, so every
offset in the file is unchanged) the library runs the same on that GPU and compresses to about 20 MB.
"""

import os
import struct
import sys

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)  # start of each fat binary's header
SASS = 2  # entry kind: machine code (1 is PTX)


def strip(path: str, keep: int) -> tuple[int, int]:
    """Zero the payload of every fatbin entry that is not SASS for ``sm_<keep>``; return (kept, zeroed) bytes."""
    data = bytearray(open(path, "rb").read())
    kept = zeroed = 0
    position = data.find(FATBIN_MAGIC)
    while position >= 0:
        header_size, body_size = struct.unpack_from("<HQ", data, position + 6)
        entry, end = position + header_size, position + header_size + body_size
        while entry < end:
            # entry header: kind (u16), version (u16), header size (u32), payload size (u64), ..., arch (u32 at 28)
            kind, entry_header, payload = struct.unpack_from("<HxxIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if payload == 0:
                break
            start = entry + entry_header
            if kind == SASS and arch == keep:
                kept += payload
            else:
                data[start:start + payload] = bytes(payload)
                zeroed += payload
            entry = start + payload
        position = data.find(FATBIN_MAGIC, end)
    with open(path + ".partial", "wb") as handle:
        handle.write(data)
    os.replace(path + ".partial", path)
    return kept, zeroed


if __name__ == "__main__":
    kept, zeroed = strip(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 90)
    print(f"kept {kept / 1e6:.1f} MB of machine code, zeroed {zeroed / 1e6:.1f} MB")
