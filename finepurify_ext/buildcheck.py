"""Whether a built shared library carries its own copy of libstdc++.

torch runs on the shared libstdc++. A library that links libstdc++ statically brings a second copy
into the process, and the two crash (or cut short) the first error message that formats an integer:
a locale facet of one copy is called through the other. Some toolchains do this silently (a GCC
built or wrapped to pass ``-static-libstdc++``, as in some CUDA images), so the build asks for the
shared libstdc++ explicitly (``LIBSTDCXX_LINK_ARGS``) and checks its result with ``libstdcxx_problem``.

Pure Python without torch: setup.py loads this file by path before the extension exists.
"""
from __future__ import annotations

import mmap
import struct

# After the objects on the link line: std:: references resolve against libstdc++.so before the
# driver's implicit (possibly static) libstdc++ is reached, so nothing is pulled from the archive.
LIBSTDCXX_LINK_ARGS = ["-Wl,--push-state,-Bdynamic,-lstdc++,--pop-state"]

FIX = ("a compiler that links libstdc++ dynamically, e.g. "
       "`CXX=g++ CC=gcc pip install --no-build-isolation -e .`")

_SHT_SYMTAB, _SHT_DYNAMIC, _SHT_DYNSYM = 2, 6, 11
_DT_NEEDED = 1
_LOCALE = b"_ZNSt6locale"  # std::locale members: their definitions are the static copy's signature


def _c_string(table: bytes, offset: int) -> bytes:
    return table[offset : table.index(b"\0", offset)]


def elf_libraries_and_locale(path: str) -> tuple[list[str], bool] | None:
    """(the NEEDED entries, whether the file defines std::locale members) of a 64-bit little-endian
    ELF shared object; None for any other file (another platform: nothing to check)."""
    with open(path, "rb") as f:
        ident = f.read(6)
        if ident != b"\x7fELF\x02\x01":
            return None
        # Mapped, not read: a CUDA build is large and only a few sections are looked at.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
            try:
                return _needed_and_locale(raw)
            except (struct.error, ValueError, IndexError):  # a malformed file: it will not load either
                return None


def _needed_and_locale(raw) -> tuple[list[str], bool]:
    shoff, = struct.unpack_from("<Q", raw, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", raw, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", raw, shoff + i * shentsize) for i in range(shnum)]

    def body(section):
        offset, size = section[4], section[5]
        return raw[offset : offset + size]

    needed, defines_locale = [], False
    for section in sections:
        kind, link = section[1], section[6]
        if kind == _SHT_DYNAMIC:
            names = body(sections[link])
            for tag, value in struct.iter_unpack("<qQ", body(section)):
                if tag == _DT_NEEDED:
                    needed.append(_c_string(names, value).decode())
        elif kind in (_SHT_SYMTAB, _SHT_DYNSYM):
            names = body(sections[link])
            if _LOCALE not in names:
                continue
            for name, _info, _other, shndx, _value, _size in struct.iter_unpack("<IBBHQQ", body(section)):
                if shndx != 0 and _c_string(names, name).startswith(_LOCALE):
                    defines_locale = True
                    break
    return needed, defines_locale


def libstdcxx_problem(path: str) -> str | None:
    """Why the library at ``path`` would run with a second libstdc++, or None when it would not."""
    info = elf_libraries_and_locale(path)
    if info is None:
        return None
    needed, defines_locale = info
    if defines_locale:
        return "it holds a static copy of libstdc++ (it defines std::locale)"
    if not any(n.startswith("libstdc++.so") for n in needed):
        return "it does not load the shared libstdc++ (no libstdc++.so among its NEEDED entries)"
    return None


if __name__ == "__main__":  # python buildcheck.py [--remove] LIBRARY...: the CMake build's check
    import os
    import sys

    remove = "--remove" in sys.argv[1:]
    failed = False
    for path in (a for a in sys.argv[1:] if a != "--remove"):
        problem = libstdcxx_problem(path)
        if problem:
            failed = True
            if remove:
                os.remove(path)
            print(f"{path}: {problem}{' (removed)' if remove else ''}; torch uses the shared libstdc++ and a "
                  "second copy crashes on the first error message: configure with a compiler that links libstdc++ "
                  "dynamically, e.g. -DCMAKE_CXX_COMPILER=g++", file=sys.stderr)
    sys.exit(1 if failed else 0)
