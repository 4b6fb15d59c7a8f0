"""The native extension links torch's C++ runtime dynamically (a static copy of libstdc++
in moelora._C turns every TORCH_CHECK error into a crash), and setup.py's toolchain probe
(moelora/_cxx_runtime.py) repairs or refuses compilers that would link it statically."""

import importlib.util
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest

from helpers import needs_c
from moelora import _cxx_runtime
from moelora.ops import native as _ext

LINUX = sys.platform.startswith("linux")


def _extension_path():
    spec = importlib.util.find_spec("moelora._C")
    return None if spec is None else spec.origin


def test_elf_reader_matches_readelf_on_the_extension():
    path = _extension_path()
    if path is None or not LINUX:
        pytest.skip("moelora._C is not built (or not an ELF platform)")
    info = _cxx_runtime.read_elf(path)
    assert info.needed, "no NEEDED entries read"
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed: the reader's own result is checked by the next test")
    out = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout
    assert info.needed == re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    dynsym = subprocess.run([readelf, "-W", "--dyn-syms", path], capture_output=True, text=True, check=True).stdout
    defined = {f[7].split("@")[0] for f in (line.split() for line in dynsym.splitlines())
               if len(f) >= 8 and f[0][:-1].isdigit() and f[6] != "UND"}
    assert defined <= info.defined


def test_extension_links_the_cxx_runtime_dynamically():
    """NEEDED lists torch's libstdc++ and no std::basic_ostream symbol is defined inside."""
    path = _extension_path()
    if path is None or not LINUX:
        pytest.skip("moelora._C is not built (or not an ELF platform)")
    runtime = _cxx_runtime.torch_cxx_runtime()
    info = _cxx_runtime.read_elf(path)
    assert runtime in info.needed, f"{runtime} is not a NEEDED library of {path}: {info.needed}"
    ostream = [s for s in info.defined if s.startswith(_cxx_runtime.OSTREAM_SYMBOL_PREFIXES)]
    assert not ostream, f"{len(ostream)} std::basic_ostream symbols defined in {path}, e.g. {ostream[:3]}"
    assert _cxx_runtime.link_problem(path) is None
    assert _ext.HAS_C, f"moelora._C was not used: {_ext.LOAD_ERROR}"


# ---- the toolchain probe of setup.py -------------------------------------------------------
def _compiler():
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    return compiler


def _static_libstdcxx():
    gxx = shutil.which("g++")
    if gxx is None or not LINUX:
        return None
    path = subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


needs_gxx = pytest.mark.skipif(_static_libstdcxx() is None, reason="needs g++ with a static libstdc++.a (Linux)")


def _wrapper(tmp_path, name, link_args):
    """A CXX that is g++ plus ``link_args`` on link lines (a toolchain with other defaults)."""
    script = tmp_path / name
    script.write_text("#!/bin/sh\n"
                      'case " $* " in *" -c "*) exec g++ "$@";; esac\n'
                      f'exec g++ {link_args} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@needs_gxx
def test_link_problem_detects_a_static_runtime(tmp_path):
    compiler = _compiler()
    repair = _cxx_runtime.runtime_link_args(compiler, "libstdc++.so.6")  # [] unless g++ links statically itself
    dynamic = _cxx_runtime._link_probe(compiler, str(tmp_path), repair, "dynamic")
    static = _cxx_runtime._link_probe(compiler, str(tmp_path), ["-static-libstdc++"], "static")
    assert _cxx_runtime.link_problem(dynamic, "libstdc++.so.6") is None
    assert "std::basic_ostream symbols" in _cxx_runtime.link_problem(static, "libstdc++.so.6")
    assert "libstdc++.so.6" not in _cxx_runtime.read_elf(static).needed


@needs_gxx
def test_probe_adds_nothing_for_a_compiler_that_links_the_runtime_dynamically(tmp_path):
    """The system compiler's own link of the probe is sound: setup.py gets no extra link argument."""
    compiler = _compiler()
    if _cxx_runtime.link_problem(_cxx_runtime._link_probe(compiler, str(tmp_path), [], "own"), "libstdc++.so.6"):
        pytest.skip("this g++ links libstdc++ statically itself")
    assert _cxx_runtime.runtime_link_args(compiler, "libstdc++.so.6") == []


@needs_gxx
def test_import_refuses_an_extension_with_a_static_runtime(tmp_path):
    """moelora.ops.native does not use such an extension (the fallbacks run) and says why."""
    from types import SimpleNamespace

    compiler = _compiler()
    static = _cxx_runtime._link_probe(compiler, str(tmp_path), ["-static-libstdc++"], "static")
    dynamic = _cxx_runtime._link_probe(compiler, str(tmp_path), _cxx_runtime.runtime_link_args(compiler), "dynamic")
    module = dict(MAX_EXPERTS=_ext.MAX_EXPERTS, MAX_BLOCK_SIZE=_ext.MAX_BLOCK_SIZE)
    reason = _ext._untrusted_reason(SimpleNamespace(__file__=static, **module))
    assert "torch errors raised inside it would crash" in reason
    assert _ext._untrusted_reason(SimpleNamespace(__file__=dynamic, **module)) is None
    stale = dict(module, MAX_BLOCK_SIZE=None)
    assert "built from other sources" in _ext._untrusted_reason(SimpleNamespace(__file__=dynamic, **stale))


@needs_gxx
@pytest.mark.parametrize("toolchain", ["specs_add_static_libstdcxx", "lib_dir_with_only_libstdcxx_a"])
def test_probe_repairs_a_compiler_that_links_the_runtime_statically(tmp_path, monkeypatch, toolchain):
    if toolchain == "specs_add_static_libstdcxx":
        link_args = "-static-libstdc++"
    else:
        static_only = tmp_path / "lib"
        static_only.mkdir()
        (static_only / "libstdc++.a").symlink_to(_static_libstdcxx())
        link_args = f"-L{static_only}"
    monkeypatch.setenv("CXX", _wrapper(tmp_path, "g++-static", link_args))
    compiler = _compiler()
    assert _cxx_runtime.link_problem(_cxx_runtime._link_probe(compiler, str(tmp_path), [], "before"),
                                     "libstdc++.so.6") is not None  # the toolchain really links it statically
    extra = _cxx_runtime.runtime_link_args(compiler, "libstdc++.so.6")
    assert len(extra) == 1 and os.path.basename(extra[0]).startswith("libstdc++.so.6")
    assert _cxx_runtime.link_problem(_cxx_runtime._link_probe(compiler, str(tmp_path), extra, "after"),
                                     "libstdc++.so.6") is None


@needs_gxx
def test_probe_refuses_a_compiler_it_cannot_repair_and_says_what_to_set(tmp_path, monkeypatch):
    whole = f"-Wl,--whole-archive {_static_libstdcxx()} -Wl,--no-whole-archive"
    monkeypatch.setenv("CXX", _wrapper(tmp_path, "g++-hostile", f"-static-libstdc++ {whole}"))
    with pytest.raises(RuntimeError, match=r"g\+\+-hostile.*std::basic_ostream.*Set CXX \(and CC\)"):
        _cxx_runtime.runtime_link_args(_compiler(), "libstdc++.so.6")


def test_read_elf_rejects_other_files(tmp_path):
    for content in (b"", b"not an ELF file at all", b"\x7fELF\x02\x01" + b"\0" * 10):
        path = tmp_path / "x.so"
        path.write_bytes(content)
        with pytest.raises(_cxx_runtime.NotElfError):
            _cxx_runtime.read_elf(str(path))


def test_read_elf_rejects_malformed_section_headers(tmp_path):
    """A section linking to a string table that does not exist, or to one that lies past the end
    of the file, is a malformed ELF file (NotElfError, which native.py's import check catches),
    not an IndexError / ValueError out of ``import moelora``."""
    path = _extension_path()
    if path is None or not LINUX:
        pytest.skip("moelora._C is not built (or not an ELF platform)")
    with open(path, "rb") as f:
        data = f.read()
    assert data[4] == 2 and data[5] == 1, "the test patches a 64-bit little-endian ELF file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    dynamic = next(shoff + i * shentsize for i in range(shnum)
                   if struct.unpack_from("<I", data, shoff + i * shentsize + 4)[0] == 6)  # SHT_DYNAMIC
    strtab = shoff + struct.unpack_from("<I", data, dynamic + 40)[0] * shentsize
    for field, value in ((dynamic + 40, struct.pack("<I", 0xFFFF)),  # sh_link: no such section
                         (strtab + 24, struct.pack("<Q", 2 * len(data)))):  # sh_offset: past the end
        broken = bytearray(data)
        broken[field:field + len(value)] = value
        (tmp_path / "x.so").write_bytes(bytes(broken))
        with pytest.raises(_cxx_runtime.NotElfError, match="malformed"):
            _cxx_runtime.read_elf(str(tmp_path / "x.so"))


# ---- the ELF reader on small synthetic files: both classes and byte orders ------------------
def _synthetic_elf(is64, little, needed=(), defined=(), undefined=(), ei_data=None, sym_type=11, sym_entsize=None,
                   extra_size=0, header_pad=0):
    """A shared object holding only .dynstr, .dynamic (NEEDED ``needed``) and .dynsym (``defined`` in a
    section, ``undefined`` in none, and a nameless section symbol), as a linker of that class and byte order writes
    them. ``sym_type`` 2 makes the symbols a .symtab; ``sym_entsize``, sizes ``extra_size`` bytes past the last whole
    entry of .dynamic and of the symbols, and section headers ``header_pad`` bytes longer than the format's, a file
    that uses ELF's freedom there."""
    e = "<" if little else ">"
    strtab, offsets = b"\0", {}
    for name in (*needed, *defined, *undefined):
        offsets[name] = len(strtab)
        strtab += name.encode() + b"\0"
    dyn_fmt, sh_fmt = (e + "qQ", e + "IIQQQQIIQQ") if is64 else (e + "iI", e + "IIIIIIIIII")
    dynamic = b"".join(struct.pack(dyn_fmt, 1, offsets[n]) for n in needed) + struct.pack(dyn_fmt, 5, 0)
    dynamic += struct.pack(dyn_fmt, 0, 0) + struct.pack(dyn_fmt, 1, offsets.get("", 0) + 1)  # DT_NULL ends it

    def sym(name, shndx):
        if is64:
            return struct.pack(e + "IBBHQQ", name, 0x12, 0, shndx, 0x1000 if shndx else 0, 8)
        return struct.pack(e + "IIIBBH", name, 0x1000 if shndx else 0, 8, 0x12, 0, shndx)

    symbols = sym(0, 0) + sym(0, 4) + b"".join(sym(offsets[n], 4) for n in defined)
    symbols += b"".join(sym(offsets[n], 0) for n in undefined)
    ehsize = 64 if is64 else 52
    str_off, dyn_off = ehsize, ehsize + len(strtab)
    sym_off = dyn_off + len(dynamic)
    shoff = sym_off + len(symbols)
    dyn_entsize = len(dynamic) // (len(needed) + 3)
    sym_entsize = sym_entsize if sym_entsize is not None else 24 if is64 else 16
    sections = [(0, 0, 0, 0, 0), (3, str_off, len(strtab), 0, 0),
                (6, dyn_off, len(dynamic) + extra_size, 1, dyn_entsize),
                (sym_type, sym_off, len(symbols) + extra_size, 1, sym_entsize)]
    headers = b"".join(struct.pack(sh_fmt, 0, t, 0, 0, off, size, link, 0, 1, ent) + b"\0" * header_pad
                       for t, off, size, link, ent in sections)
    shentsize = (64 if is64 else 40) + header_pad
    ident = b"\x7fELF" + bytes([2 if is64 else 1, (1 if little else 2) if ei_data is None else ei_data, 1]) + b"\0" * 9
    if is64:
        header = ident + struct.pack(e + "HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, shentsize, len(sections),
                                     0)
    else:
        header = ident + struct.pack(e + "HHIIIIIHHHHHH", 3, 3, 1, 0, 0, shoff, 0, 52, 0, 0, shentsize, len(sections),
                                     0)
    assert len(header) == ehsize
    return header + strtab + dynamic + symbols + headers


@pytest.mark.parametrize("is64", [True, False], ids=["elf64", "elf32"])
@pytest.mark.parametrize("little", [True, False], ids=["little_endian", "big_endian"])
def test_read_elf_reads_both_classes_and_byte_orders(tmp_path, is64, little):
    """NEEDED entries in order up to DT_NULL, defined symbols without the undefined ones: a 32-bit or
    big-endian file (another platform's build) is read as readelf reads it."""
    path = tmp_path / "x.so"
    path.write_bytes(_synthetic_elf(is64, little, needed=["libtorch.so", "libstdc++.so.6", "libc.so.6"],
                                    defined=["moelora_op", "_ZN7moelora4initEv"],
                                    undefined=["_ZNSolsEl", "_ZTVSo"]))
    info = _cxx_runtime.read_elf(str(path))
    assert info.needed == ["libtorch.so", "libstdc++.so.6", "libc.so.6"]
    assert info.defined == {"moelora_op", "_ZN7moelora4initEv"}
    assert _cxx_runtime.read_elf(str(path), symbols=False) == (info.needed, set())
    assert _cxx_runtime.link_problem(str(path), "libstdc++.so.6") is None


def test_read_elf_rejects_an_unknown_byte_order(tmp_path):
    """EI_DATA other than 1 (little-endian) or 2 (big-endian): not an ELF file the reader knows."""
    path = tmp_path / "x.so"
    for ei_data in (0, 3):
        path.write_bytes(_synthetic_elf(True, False, needed=["libstdc++.so.6"], ei_data=ei_data))
        with pytest.raises(_cxx_runtime.NotElfError):
            _cxx_runtime.read_elf(str(path))


@pytest.mark.parametrize("symbol", ["_ZNSolsEl", "_ZNKSo6sentrycvbEv", "_ZTVSo", "_ZTISo",
                                    "_ZNSt13basic_ostreamIwSt11char_traitsIwEElsEl",
                                    "_ZNKSt13basic_ostreamIwSt11char_traitsIwEE6sentrycvbEv",
                                    "_ZTVSt13basic_ostreamIwSt11char_traitsIwEE",
                                    "_ZTISt13basic_ostreamIwSt11char_traitsIwEE"])
def test_link_problem_names_each_kind_of_ostream_symbol_defined_inside(tmp_path, symbol):
    """std::ostream's and std::wostream's members, const members, vtables and typeinfo, each alone, are a
    static runtime; the same symbol undefined (taken from the shared runtime) and std::istream's are not."""
    path = tmp_path / "x.so"
    path.write_bytes(_synthetic_elf(True, True, needed=["libstdc++.so.6"], defined=[symbol, "_ZNSirsERl"]))
    problem = _cxx_runtime.link_problem(str(path), "libstdc++.so.6")
    assert problem is not None and f"defines 1 std::basic_ostream symbols itself (e.g. {symbol})" in problem
    path.write_bytes(_synthetic_elf(True, True, needed=["libstdc++.so.6"], defined=["_ZNSirsERl"],
                                    undefined=[symbol]))
    assert _cxx_runtime.link_problem(str(path), "libstdc++.so.6") is None


def test_link_problem_wants_the_runtime_family_among_the_needed_libraries(tmp_path):
    """Another version of torch's runtime (libstdc++.so.7) is the same family; none, or libc++ for a torch on
    libstdc++, is not: the message names the runtime and the NEEDED list."""
    path = tmp_path / "x.so"
    path.write_bytes(_synthetic_elf(True, True, needed=["libtorch.so", "libstdc++.so.7"]))
    assert _cxx_runtime.link_problem(str(path), "libstdc++.so.6") is None
    path.write_bytes(_synthetic_elf(True, True, needed=["libtorch.so", "libc++.so.1"]))
    assert "does not list libstdc++.so.6 among its NEEDED libraries (libtorch.so, libc++.so.1)" in \
        _cxx_runtime.link_problem(str(path), "libstdc++.so.6")
    path.write_bytes(_synthetic_elf(False, True))
    assert "(none)" in _cxx_runtime.link_problem(str(path), "libstdc++.so.6")


def test_read_elf_rejects_a_file_that_is_not_a_complete_elf_header(tmp_path):
    """A valid file without the magic bytes, with an unknown class (EI_CLASS 0 or 3), cut off inside the
    identification bytes: NotElfError, never another exception."""
    good = _synthetic_elf(True, True, needed=["libstdc++.so.6"])
    bad_magic = b"\x7fELG" + good[4:]
    bad_classes = [good[:4] + bytes([c]) + good[5:] for c in (0, 3)]
    path = tmp_path / "x.so"
    for content in [bad_magic, good[:5]] + bad_classes:
        path.write_bytes(content)
        with pytest.raises(_cxx_runtime.NotElfError, match="not an ELF"):
            _cxx_runtime.read_elf(str(path))


@pytest.mark.parametrize("shoff", ["past_the_end", 2 ** 63, 2 ** 64 - 1])
def test_read_elf_rejects_section_headers_at_an_offset_no_file_reaches(tmp_path, shoff):
    """Section headers past the file's end, or at an e_shoff of 2**63 or more (a 64-bit field, past what an
    offset into memory holds), make a malformed file: NotElfError, not an OverflowError out of ``import moelora``."""
    good = _synthetic_elf(True, True, needed=["libstdc++.so.6"])
    shoff = 4 * len(good) if shoff == "past_the_end" else shoff
    (tmp_path / "x.so").write_bytes(good[:0x28] + struct.pack("<Q", shoff) + good[0x30:])
    with pytest.raises(_cxx_runtime.NotElfError, match="malformed"):
        _cxx_runtime.read_elf(str(tmp_path / "x.so"))


@pytest.mark.parametrize("is64", [True, False], ids=["elf64", "elf32"])
def test_read_elf_reads_a_symtab_and_follows_the_sizes_the_file_gives(tmp_path, is64):
    """Symbols of a .symtab count as those of .dynsym; section headers longer than the format's are stepped over by
    e_shentsize, bytes past the last whole entry of .dynamic or a symbol table are ignored, a symbol table of entry
    size 0 is skipped, and a name that is not UTF-8 is read with replacement characters."""
    path = tmp_path / "x.so"
    for kwargs in (dict(sym_type=2), dict(header_pad=8), dict(extra_size=5)):
        path.write_bytes(_synthetic_elf(is64, False, needed=["libstdc++.so.6"], defined=["_ZNSolsEl"], **kwargs))
        assert _cxx_runtime.read_elf(str(path)) == (["libstdc++.so.6"], {"_ZNSolsEl"}), kwargs
    path.write_bytes(_synthetic_elf(is64, True, needed=["libstdc++.so.6"], defined=["_ZNSolsEl"], sym_entsize=0))
    assert _cxx_runtime.read_elf(str(path)) == (["libstdc++.so.6"], set())
    path.write_bytes(_synthetic_elf(is64, True, defined=["moelora_XtX"]).replace(b"moelora_XtX", b"moelora_\xe9t\xe9"))
    assert _cxx_runtime.read_elf(str(path)).defined == {"moelora_\ufffdt\ufffd"}


def test_link_problem_counts_the_ostream_symbols_and_names_the_first_by_name(tmp_path):
    path = tmp_path / "sub" / "x.so"
    path.parent.mkdir()
    path.write_bytes(_synthetic_elf(True, True, needed=["libstdc++.so.6"],
                                    defined=["_ZTVSo", "_ZNSolsEl", "_ZNKSo6sentrycvbEv", "_ZNSirsERl"]))
    assert _cxx_runtime.link_problem(str(path), "libstdc++.so.6").startswith(
        "x.so defines 3 std::basic_ostream symbols itself (e.g. _ZNKSo6sentrycvbEv)")


@pytest.mark.parametrize("libc10", ["libc++", "none", "not_elf", "no_lib_dir"])
def test_torch_cxx_runtime_is_the_runtime_libc10_needs(tmp_path, monkeypatch, libc10):
    """The C++ runtime among libc10.so's NEEDED libraries (libstdc++ or libc++, whichever comes first, not its
    first entry), libc10_cuda.so not read; libstdc++.so.6 when torch has no lib dir, or libc10.so names neither or
    is not ELF."""
    import torch

    lib = tmp_path / "torch" / "lib"
    if libc10 != "no_lib_dir":
        lib.mkdir(parents=True)
        (lib / "libc10_cuda.so").write_bytes(_synthetic_elf(True, True, needed=["libstdc++.so.5"]))
        (lib / "libc10.so").write_bytes(
            b"not ELF" if libc10 == "not_elf" else _synthetic_elf(
                True, True, needed=["libm.so.6"] + (["libc++.so.1", "libstdc++.so.6"] if libc10 == "libc++" else [])))
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "torch" / "__init__.py"))
    assert _cxx_runtime.torch_cxx_runtime() == ("libc++.so.1" if libc10 == "libc++" else "libstdc++.so.6")


def test_loaded_library_path_is_the_first_mapped_file_of_that_library(tmp_path, monkeypatch):
    """From /proc/self/maps: lines of other libraries (another version of it included), files gone since, and
    paths that only contain the soname in a directory's name are passed over, and of two files the first is
    taken; None where no such file is mapped or maps cannot be read."""
    import io

    real = tmp_path / "libstdc++.so.6.0.33"
    real.write_bytes(b"")
    folder = tmp_path / "libstdc++.so.6.d"
    folder.mkdir()
    (folder / "libfoo.so").write_bytes(b"")
    (tmp_path / "libm.so.6").write_bytes(b"")
    other_version, later = tmp_path / "libstdc++.so.5", tmp_path / "libstdc++.so.6.0.34"
    other_version.write_bytes(b"")
    later.write_bytes(b"")
    maps = "".join(f"7f00-7f01 r-xp 00000000 08:01 1  {p}\n" for p in
                   (tmp_path / "libm.so.6", other_version, tmp_path / "gone" / "libstdc++.so.6", folder / "libfoo.so",
                    real, tmp_path / "libstdc++.so.6", later))

    def fake_open(path, *args):
        if path != "/proc/self/maps":
            raise AssertionError(path)
        if fake_open.fail:
            raise PermissionError(path)
        return io.StringIO(maps)

    fake_open.fail = False
    monkeypatch.setattr(_cxx_runtime, "open", fake_open, raising=False)
    assert _cxx_runtime.loaded_library_path("libstdc++.so.6") == str(real)
    assert _cxx_runtime.loaded_library_path("libgfortran.so.5") is None
    fake_open.fail = True
    assert _cxx_runtime.loaded_library_path("libstdc++.so.6") is None


@pytest.mark.parametrize("case", ["sound", "repaired", "no_shared_runtime", "repair_fails"])
def test_runtime_link_args_links_the_probe_and_repairs_it_with_the_loaded_runtime(monkeypatch, case):
    """The probe first links with the compiler's own arguments ([] when sound); else once more with the shared
    runtime this process runs with (torch's, when no runtime is named), which is returned when that link is sound;
    a RuntimeError naming the first link's problem otherwise, or when no shared runtime is loaded."""
    links = []

    def probe(compiler, tmp, extra_link_args, tag):
        links.append((tag, list(extra_link_args)))
        return tag

    def problem(path, runtime):
        assert runtime == "libc++.so.1"
        return None if (path, case) in {("default", "sound"), ("shared", "repaired")} else f"{path} is static"

    monkeypatch.setattr(_cxx_runtime, "_link_probe", probe)
    monkeypatch.setattr(_cxx_runtime, "link_problem", problem)
    monkeypatch.setattr(_cxx_runtime, "torch_cxx_runtime", lambda: "libc++.so.1")
    shared = None if case == "no_shared_runtime" else "/usr/lib/libc++.so.1"
    monkeypatch.setattr(_cxx_runtime, "loaded_library_path", lambda name: shared if name == "libc++.so.1" else 1)
    compiler = SimpleNamespace(compiler_cxx=["clang++", "-O2"])
    if case in ("sound", "repaired"):
        assert _cxx_runtime.runtime_link_args(compiler) == ([] if case == "sound" else [shared])
    else:
        with pytest.raises(RuntimeError, match=r"compiler `clang\+\+`: default is static\. Every torch error"):
            _cxx_runtime.runtime_link_args(compiler)
    assert links == [("default", [])] + ([] if case in ("sound", "no_shared_runtime") else [("shared", [shared])])


def test_advice_names_c_plus_plus_for_a_compiler_without_a_cxx_command():
    for compiler in (SimpleNamespace(), SimpleNamespace(compiler_cxx=None), SimpleNamespace(compiler_cxx=[])):
        advice = _cxx_runtime.cxx_runtime_advice(compiler, "it is static")
        assert "with the C++ compiler `c++`: it is static." in advice


# ---- when moelora.ops.native uses the extension ---------------------------------------------
def test_import_check_refuses_a_build_with_either_limit_of_other_sources(tmp_path):
    """A stale moelora._C whose MAX_EXPERTS or MAX_BLOCK_SIZE differs from the Python side's (or is missing) is
    not used; a file that is not ELF (another platform's build) has no runtime linkage to check."""
    from types import SimpleNamespace

    other = tmp_path / "_C.pyd"
    other.write_bytes(b"MZ\x90\x00 a PE file, not ELF")
    limits = dict(MAX_EXPERTS=_ext.MAX_EXPERTS, MAX_BLOCK_SIZE=_ext.MAX_BLOCK_SIZE)
    assert _ext._untrusted_reason(SimpleNamespace(__file__=str(other), **limits)) is None
    for name in limits:
        for value in (None, limits[name] * 2):
            stale = SimpleNamespace(__file__=str(other), **dict(limits, **{name: value}))
            assert "built from other sources" in _ext._untrusted_reason(stale), (name, value)


@needs_c
def test_an_extension_the_import_check_refuses_is_not_used_and_import_warns(monkeypatch):
    """moelora.ops.native imported with an extension that links the runtime statically: HAS_C and WITH_CUDA
    false, LOAD_ERROR says why, a RuntimeWarning too, and the fallbacks run (needs a build to refuse)."""
    import importlib

    import torch

    monkeypatch.setattr(_cxx_runtime, "link_problem", lambda path, runtime=None: "it defines std::ostream")
    try:
        with pytest.warns(RuntimeWarning, match="moelora._C is not used: it defines std::ostream"):
            importlib.reload(_ext)
        assert not _ext.HAS_C and not _ext.WITH_CUDA and not _ext.has_cpu_kernels()
        assert isinstance(_ext.LOAD_ERROR, RuntimeError) and "it defines std::ostream" in str(_ext.LOAD_ERROR)
        assert not _ext.use_native(torch.device("cpu"))
    finally:
        monkeypatch.undo()
        importlib.reload(_ext)
    assert _ext.HAS_C == (_ext._C is not None)


def test_use_native_takes_the_kernels_the_build_has_for_the_device(monkeypatch):
    """CPU tensors go to the native kernels in every build, CUDA tensors only in a CUDA build, meta tensors
    never, and none while the fallbacks are forced."""
    import torch

    from moelora import switches

    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
    monkeypatch.setattr(_ext, "HAS_C", True)
    for with_cuda in (False, True):
        monkeypatch.setattr(_ext, "WITH_CUDA", with_cuda)
        assert _ext.has_cuda_kernels() == with_cuda
        assert [_ext.use_native(d) for d in (cpu, cuda, meta)] == [True, with_cuda, False]
        with switches.force_fallback():
            assert [_ext.use_native(d) for d in (cpu, cuda, meta)] == [False, False, False]
    monkeypatch.setattr(_ext, "HAS_C", False)
    assert not _ext.has_cuda_kernels() and [_ext.use_native(d) for d in (cpu, cuda, meta)] == [False, False, False]
