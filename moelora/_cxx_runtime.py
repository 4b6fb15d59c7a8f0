"""How ``moelora._C`` links the C++ runtime, checked from its ELF file.

torch throws its errors (``TORCH_CHECK``) through the C++ runtime it was linked with: the
shared ``libstdc++.so.6`` on Linux (``libc++`` for some builds). An extension that carries
its own static copy of that runtime (a toolchain whose ``g++ -shared`` links
``libstdc++.a``: a lib dir with only the static library, or specs that add
``-static-libstdc++``) formats the error message with a second, never initialised copy
of the iostream/locale machinery, and every argument error then kills the process
instead of raising. So the extension must

- list torch's C++ runtime as a ``NEEDED`` library, and
- define none of the runtime's ``std::basic_ostream`` symbols itself.

:func:`link_problem` checks a built file; :func:`runtime_link_args` probes the compiler a
build will use (``setup.py``) and returns the extra link arguments that make it link the
runtime dynamically, or raises with what to set. Standalone: ``setup.py`` loads this file
by path, without importing the package (so no relative imports, and torch only lazily).
"""

from __future__ import annotations

import os
import struct
import tempfile
from typing import List, NamedTuple, Optional, Set

# Mangled-name prefixes of std::basic_ostream members, vtables and typeinfo: std::ostream
# is "So" in the Itanium ABI; wostream and other instantiations spell the template out.
OSTREAM_SYMBOL_PREFIXES = ("_ZNSo", "_ZNKSo", "_ZTVSo", "_ZTISo", "_ZNSt13basic_ostream", "_ZNKSt13basic_ostream",
                           "_ZTVSt13basic_ostream", "_ZTISt13basic_ostream")
CXX_RUNTIMES = ("libstdc++.so", "libc++.so")
DEFAULT_RUNTIME = "libstdc++.so.6"

_SHT_SYMTAB, _SHT_DYNAMIC, _SHT_DYNSYM = 2, 6, 11
_DT_NULL, _DT_NEEDED = 0, 1
_SHN_UNDEF = 0


class ElfInfo(NamedTuple):
    needed: List[str]  # DT_NEEDED entries of the dynamic section, in order
    defined: Set[str]  # names of the symbols defined in the file (.dynsym and .symtab)


class NotElfError(ValueError):
    """The file is not an ELF shared object (another platform's format, or garbage)."""


def read_elf(path: str, symbols: bool = True) -> ElfInfo:
    """NEEDED libraries and (if ``symbols``) defined symbol names of the ELF file ``path``
    (32/64-bit, either byte order); raises NotElfError for other files."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise NotElfError(f"{path} is not an ELF file")
    is64, endian = data[4] == 2, "<" if data[5] == 1 else ">"
    try:
        return _parse_elf(data, is64, endian, symbols)
    except (struct.error, IndexError, ValueError, OverflowError) as exc:  # offsets, links or strings outside the file
        raise NotElfError(f"{path} is a truncated or malformed ELF file ({exc})") from exc


def _parse_elf(data: bytes, is64: bool, e: str, symbols: bool) -> ElfInfo:
    if is64:
        shoff, = struct.unpack_from(e + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(e + "HH", data, 0x3A)
        sh_fmt, dyn_fmt, sym_fmt = e + "IIQQQQIIQQ", e + "qQ", e + "IBBHQQ"
    else:
        shoff, = struct.unpack_from(e + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(e + "HH", data, 0x2E)
        sh_fmt, dyn_fmt, sym_fmt = e + "IIIIIIIIII", e + "iI", e + "IIIBBH"
    # (type, offset, size, link, entsize) of every section
    sections = []
    for i in range(shnum):
        f = struct.unpack_from(sh_fmt, data, shoff + i * shentsize)
        sections.append((f[1], f[4], f[5], f[6], f[9]))

    def string(table: int, offset: int) -> str:
        start = sections[table][1] + offset
        return data[start:data.index(b"\0", start)].decode("utf-8", "replace")

    needed, defined = [], set()
    for sh_type, off, size, link, entsize in sections:
        if sh_type == _SHT_DYNAMIC:
            for tag, value in struct.iter_unpack(dyn_fmt, data[off:off + size - size % struct.calcsize(dyn_fmt)]):
                if tag == _DT_NULL:
                    break
                if tag == _DT_NEEDED:
                    needed.append(string(link, value))
        elif symbols and sh_type in (_SHT_SYMTAB, _SHT_DYNSYM) and entsize:
            for sym in struct.iter_unpack(sym_fmt, data[off:off + size - size % entsize]):
                name, shndx = sym[0], (sym[3] if is64 else sym[5])
                if name and shndx != _SHN_UNDEF:
                    defined.add(string(link, name))
    return ElfInfo(needed, defined)


def link_problem(path: str, runtime: Optional[str] = None) -> Optional[str]:
    """Why the shared object ``path`` would crash torch's error path, or None if it links the
    C++ runtime ``runtime`` (default: torch's, see :func:`torch_cxx_runtime`) dynamically."""
    runtime = runtime or torch_cxx_runtime()
    info = read_elf(path)
    ostream = sorted(s for s in info.defined if s.startswith(OSTREAM_SYMBOL_PREFIXES))
    if ostream:
        return (f"{os.path.basename(path)} defines {len(ostream)} std::basic_ostream symbols itself "
                f"(e.g. {ostream[0]}): the C++ runtime was linked in statically")
    family = runtime.split(".so")[0] + ".so"
    if not any(n.startswith(family) for n in info.needed):
        return (f"{os.path.basename(path)} does not list {runtime} among its NEEDED libraries "
                f"({', '.join(info.needed) or 'none'}): it does not use torch's C++ runtime")
    return None


def torch_cxx_runtime() -> str:
    """The C++ runtime torch's libc10 was linked with (its NEEDED entry, e.g. libstdc++.so.6)."""
    import torch

    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in sorted(os.listdir(lib)) if os.path.isdir(lib) else []:
        if name.startswith("libc10.so"):
            try:
                needed = read_elf(os.path.join(lib, name), symbols=False).needed
            except (OSError, NotElfError):
                break
            for n in needed:
                if n.startswith(CXX_RUNTIMES):
                    return n
    return DEFAULT_RUNTIME


def loaded_library_path(soname: str) -> Optional[str]:
    """The file of the already loaded library ``soname`` in this process (Linux), e.g. the
    libstdc++.so.6 torch runs with, or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = [line.split(None, 5)[-1].strip() for line in f if soname in line]
    except OSError:
        return None
    paths = [p for p in paths if os.path.basename(p).startswith(soname.split(".so")[0] + ".so") and os.path.exists(p)]
    return paths[0] if paths else None


_PROBE_SOURCE = r"""
#include <sstream>
#include <stdexcept>
#include <string>
// What a TORCH_CHECK message does: format numbers into a stream, throw.
extern "C" int moelora_link_probe(long v) {
  std::ostringstream s;
  s << "value " << v;
  if (v < 0) throw std::runtime_error(s.str());
  return static_cast<int>(s.str().size());
}
"""


def _link_probe(compiler, tmp: str, extra_link_args: List[str], tag: str) -> str:
    src = os.path.join(tmp, "moelora_link_probe.cpp")
    if not os.path.exists(src):
        with open(src, "w") as f:
            f.write(_PROBE_SOURCE)
    objects = compiler.compile([src], output_dir=tmp, extra_postargs=["-fPIC"])
    out = os.path.join(tmp, f"moelora_link_probe_{tag}.so")
    compiler.link_shared_object(objects, out, target_lang="c++", extra_postargs=list(extra_link_args))
    return out


def runtime_link_args(compiler, runtime: Optional[str] = None) -> List[str]:
    """Extra link arguments that make ``compiler`` (a configured distutils compiler, as
    build_ext holds it) link torch's C++ runtime dynamically: [] when it does so by itself,
    else the path of the runtime library this process runs with (placed before the
    toolchain's own ``-lstdc++``, it resolves every runtime symbol). Raises RuntimeError with
    what to set when neither works."""
    runtime = runtime or torch_cxx_runtime()
    with tempfile.TemporaryDirectory(prefix="moelora-link-probe-") as tmp:
        problem = link_problem(_link_probe(compiler, tmp, [], "default"), runtime)
        if problem is None:
            return []
        shared = loaded_library_path(runtime)
        if shared is not None:
            args = [shared]
            if link_problem(_link_probe(compiler, tmp, args, "shared"), runtime) is None:
                return args
        raise RuntimeError(cxx_runtime_advice(compiler, problem))


def cxx_runtime_advice(compiler, problem: str) -> str:
    """The build error for an extension (or probe) that does not link the runtime dynamically."""
    linker = (getattr(compiler, "compiler_cxx", None) or ["c++"])[0]
    return (f"moelora._C would not link torch's C++ runtime dynamically with the C++ compiler `{linker}`: "
            f"{problem}. Every torch error raised inside the extension would then crash the process. That "
            "compiler links libstdc++ statically into shared objects (its lib dir has only libstdc++.a, or its "
            "specs add -static-libstdc++). Set CXX (and CC) to a compiler that links it dynamically, e.g. the "
            "system compiler: CXX=/usr/bin/g++ CC=/usr/bin/gcc pip install --no-build-isolation -e . ; or build "
            "without the extension: MOELORA_NO_EXT=1.")
