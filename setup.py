"""Build llmint8's two C extensions:

  llmint8._C     the op oracles, the CPU backend and the Int8Linear type (csrc/core,
                 csrc/python); links no CUDA library, so `import llmint8` never maps one.
  llmint8._cuda  the CUDA backend (csrc/cuda, csrc/python/cuda_*.c), built when nvcc is
                 found; links libcudart and libcublasLt and is imported on first CUDA use.

Environment:
  LLMINT8_CUDA=0     build the CPU backend only, even where nvcc is found
  LLMINT8_CUDA=1     require the CUDA backend (fail when nvcc is not found or fails; without
                     this, a failing nvcc leaves a CPU-only build and says why)
  CUDA_HOME, CUDA_PATH  the CUDA toolkit (default: where nvcc on PATH lives, /usr/local/cuda)
  LLMINT8_CUDA_ARCHS GPU architectures to compile for, e.g. "90" or "80;90"
                     (default: sm_80, sm_86, sm_89, sm_90 and PTX for compute_90). With
                     "90a" among them and CUTLASS's headers found, the Hopper GEMM with the
                     dequantization in its epilogue is built too (csrc/cuda/gemm_sm90*:
                     about 2-3 minutes and 4.5 GB of memory per file; `pip install
                     --no-deps nvidia-cutlass` provides the headers)
  LLMINT8_CUTLASS_DIR a CUTLASS checkout to take the headers from instead of the
                     nvidia-cutlass package
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _files(folder, suffix):
    d = os.path.join(HERE, CSRC, folder)
    return sorted(os.path.join(CSRC, folder, f) for f in os.listdir(d) if f.endswith(suffix))


# _C: the op oracles and CPU backend (core/) and the Python bindings (python/, except the
# CUDA module's files, named cuda_*). _cuda: its bindings, the shared error helpers
# (python/shared.c, core/common.c) and the CUDA objects (cuda/*.cu, built by nvcc).
C_SOURCES = _files("core", ".c") + [f for f in _files("python", ".c") if not os.path.basename(f).startswith("cuda_")]
CUDA_EXT_SOURCES = [f for f in _files("python", ".c") if os.path.basename(f).startswith("cuda_")] + [
    os.path.join(CSRC, "python", "shared.c"), os.path.join(CSRC, "core", "common.c")]
CUDA_SOURCES = _files("cuda", ".cu")
# the CUTLASS kernels (sm_90a only, built when CUTLASS's headers are found)
SM90_SOURCES = [f for f in CUDA_SOURCES if os.path.basename(f).startswith("gemm_sm90")]
CUDA_SOURCES = [f for f in CUDA_SOURCES if f not in SM90_SOURCES]
INCLUDE_DIRS = [os.path.join(CSRC, d) for d in ("core", "cuda", "python")]
HEADERS = [f for d in ("core", "cuda", "python") for f in _files(d, ".h")]

# C11 for the host code; -fno-math-errno lets lrintf inline to one instruction.
C_FLAGS = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fno-math-errno", "-fvisibility=hidden"]


CUDA_ARCHS = ["80", "86", "89", "90"]  # Ampere, Ampere (GA10x), Ada, Hopper; PTX of the last for newer GPUs


def _find_cuda():
    """(cuda_home, nvcc path), or (None, None) when no toolkit is found."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home, os.path.join(home, "bin", "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), nvcc
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda", "/usr/local/cuda/bin/nvcc"
    return None, None


def _cuda_lib_dir(home):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"), os.path.join("targets", "sbsa-linux", "lib")):
        d = os.path.join(home, sub)
        if os.path.isfile(os.path.join(d, "libcudart.so")):
            return d
    raise RuntimeError(f"llmint8: libcudart.so not found under {home}; set CUDA_HOME")


def _gencode_flags():
    archs = [a.strip().replace("sm_", "") for a in os.environ.get("LLMINT8_CUDA_ARCHS", "").replace(",", ";").split(";")
             if a.strip()] or CUDA_ARCHS
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX: newer GPUs JIT it
    return flags, " ".join([f"sm_{a}" for a in archs] + [f"compute_{archs[-1]}"])


def _cutlass_includes():
    """CUTLASS's header folders (include/, tools/util/include/) from LLMINT8_CUTLASS_DIR or
    the nvidia-cutlass package (found without importing it), or None."""
    root = os.environ.get("LLMINT8_CUTLASS_DIR", "").strip()
    if not root:
        import importlib.util
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = os.path.join(list(spec.submodule_search_locations)[0], "source")
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    need = [os.path.join(dirs[0], "cutlass", "gemm", "collective", "collective_builder.hpp"),
            os.path.join(dirs[1], "cutlass", "util", "packed_stride.hpp")]
    return dirs if all(os.path.isfile(f) for f in need) else None


def _local_includes(path, seen=None):
    """The csrc headers `path` includes with #include "...", recursively."""
    seen = set() if seen is None else seen
    with open(path, encoding="utf-8") as f:
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read(), re.M):
            for d in INCLUDE_DIRS:
                h = os.path.join(HERE, d, name)
                if h not in seen and os.path.isfile(h):
                    seen.add(h)
                    _local_includes(h, seen)
    return seen


class BuildExt(build_ext):
    _inplace_requested = False

    def run(self):
        # setuptools builds an in-place request into build/lib (inplace = 0 meanwhile) and
        # copies the modules to the sources afterwards: remember what was asked for
        self._inplace_requested = bool(self.inplace)
        super().run()

    def _build_cuda(self, nvcc, gencode, cutlass):
        """Compile csrc/*.cu with nvcc into build/cuda-objects (files in parallel, each one's
        architectures in parallel too). cutlass: CUTLASS's include folders, to build the sm_90a
        GEMM files too (for sm_90a only), or None. An object is reused when the stamp beside
        it (.sig) matches: a hash of nvcc's version, the flags, the source and every csrc
        header it includes (this tree's path and CUTLASS's left out, CUTLASS's version in).
        So a change of LLMINT8_CUDA_ARCHS, of nvcc or of a source recompiles what it
        touches, and a build folder carried to a GPU machine (another checkout path, another
        Python) is reused there as is."""
        out_dir = os.path.join(HERE, "build", "cuda-objects")
        os.makedirs(out_dir, exist_ok=True)
        base = ["-O3", "-std=c++17", "--threads", "0", "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall",
                "-DLLMINT8_CUDA=1"] + ["-DLLMINT8_SM90_GEMM=1"] * bool(cutlass) + [
                "-I" + os.path.join(HERE, d) for d in INCLUDE_DIRS]
        flags = base + gencode
        # CUTLASS: no asserts (a device assert is a call, which serializes the wgmma pipeline)
        # and Programmatic Dependent Launch's wait inside CUTLASS's kernels (gemm_sm90.cuh)
        sm90_flags = base + ["-DNDEBUG", "--expt-relaxed-constexpr", "-DCUTLASS_ENABLE_GDC_FOR_SM90=1"] + ["-I" + d for d in cutlass or []] + [
            "-gencode=arch=compute_90a,code=sm_90a"]
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        if cutlass:
            with open(os.path.join(cutlass[0], "cutlass", "version.h"), encoding="utf-8") as f:
                version += f.read()

        def stamp(src, fl):
            text = "\n".join(fl)
            for d in cutlass or []:
                text = text.replace(d, "<cutlass>")
            h = hashlib.sha256((version + text.replace(HERE, "<src>")).encode())
            for f in sorted([src, *_local_includes(src)]):
                with open(f, "rb") as fh:
                    h.update(os.path.relpath(f, HERE).encode() + b"\0" + fh.read())
            return h.hexdigest()

        jobs, objects = [], []
        for src, fl in [(f, flags) for f in CUDA_SOURCES] + [(f, sm90_flags) for f in SM90_SOURCES if cutlass]:
            src = os.path.join(HERE, src)
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            objects.append(obj)
            sig = stamp(src, fl)
            try:
                with open(obj + ".sig", encoding="utf-8") as f:
                    same = f.read() == sig and os.path.exists(obj)
            except OSError:
                same = False
            if self.force or not same:
                jobs.append(([nvcc] + fl + ["-c", src, "-o", obj], sig))

        def run(job):
            cmd, sig = job
            t0 = time.time()
            if os.path.exists(cmd[-1] + ".sig"):
                os.remove(cmd[-1] + ".sig")  # a failed compile leaves no stamp that matches
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                with open(cmd[-1] + ".sig", "w", encoding="utf-8") as f:
                    f.write(sig)
            return cmd, r, time.time() - t0

        t0 = time.time()
        with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            for cmd, r, dt in pool.map(run, jobs):
                name = os.path.basename(cmd[-3])
                if r.returncode != 0:
                    raise RuntimeError(f"llmint8: nvcc failed on {name}:\n{r.stdout}{r.stderr}")
                if r.stderr.strip():
                    print(r.stderr.strip())
                print(f"llmint8: nvcc {name} ({dt:.1f} s)")
        if jobs:
            print(f"llmint8: CUDA sources compiled in {time.time() - t0:.1f} s")
        else:
            print(f"llmint8: CUDA objects up to date in {os.path.relpath(out_dir, HERE)}")
        return objects

    def _cuda_off(self, c_ext, reason):
        """Build without llmint8._cuda; _C records why (build_info()["cuda_off"])."""
        c_ext.define_macros.append(("LLMINT8_CUDA_OFF", '"%s"' % reason.replace('"', "'")))
        self.extensions = [e for e in self.extensions if e.name != "llmint8._cuda"]
        self._config = "cpu only: " + reason
        # an earlier CUDA build's module must neither load (in-place and editable builds
        # put it beside the sources) nor ship in this wheel (build/lib is reused)
        for stale in self._outputs("llmint8._cuda"):
            if os.path.exists(stale):
                print(f"llmint8: removing {stale} (a CUDA build's module; this build is CPU-only)")
                os.remove(stale)

    def _outputs(self, name):
        """Where this build writes module `name`: build_lib, and the source tree for an
        in-place or editable build."""
        paths = [self.get_ext_fullpath(name)]
        if not self.inplace and (self._inplace_requested or getattr(self, "editable_mode", False)):
            self.inplace = 1
            try:
                paths.append(self.get_ext_fullpath(name))
            finally:
                self.inplace = 0
        return paths

    def _rebuild_on_config_change(self):
        """setuptools rebuilds a module only when a source is newer than it, but _C is
        compiled differently with and without CUDA (LLMINT8_CUDA_OFF): a build whose CUDA
        setting differs from the last one into the same output rebuilds everything.
        Returns the stamp to write once the build succeeded."""
        out = self.get_ext_fullpath("llmint8._C")
        key = re.sub(r"[^A-Za-z0-9]+", "_", os.path.abspath(out))[-120:]
        stamp = os.path.join(self.build_temp, f"config-{key}.txt")
        try:
            with open(stamp, encoding="utf-8") as f:
                same = f.read() == self._config
        except OSError:
            same = False
        if not same and not self.force:
            if os.path.exists(out):
                print(f"llmint8: build configuration changed ({self._config}): rebuilding")
            self.force = True
        return stamp

    def _setup_cuda(self, c_ext, cuda_ext):
        """Configure llmint8._cuda, or drop it (and say why) when CUDA is off or unavailable."""
        mode = os.environ.get("LLMINT8_CUDA", "").strip()
        if mode == "0":
            print("llmint8: LLMINT8_CUDA=0: building the CPU backend only")
            return self._cuda_off(c_ext, "LLMINT8_CUDA=0")
        home, nvcc = _find_cuda()
        if not nvcc:
            if mode == "1":
                raise RuntimeError("llmint8: LLMINT8_CUDA=1 but nvcc was not found; set CUDA_HOME or put nvcc on PATH")
            print("llmint8: nvcc not found; building the CPU backend only (set CUDA_HOME to build the CUDA backend)")
            return self._cuda_off(c_ext, "nvcc not found")
        gencode, arch_names = _gencode_flags()
        cutlass = None
        if "sm_90a" in arch_names.split():
            cutlass = _cutlass_includes()
            if cutlass:
                print(f"llmint8: sm_90a with CUTLASS ({cutlass[0]}): building the Hopper GEMM (minutes)")
            else:
                print("llmint8: sm_90a requested but CUTLASS's headers were not found (pip install --no-deps "
                      "nvidia-cutlass, or set LLMINT8_CUTLASS_DIR): the Hopper GEMM is left out")
        try:
            lib = _cuda_lib_dir(home)
            objects = self._build_cuda(nvcc, gencode, cutlass)
        except RuntimeError as e:
            if mode == "1":
                raise
            print(f"llmint8: WARNING: the CUDA backend failed to build; building the CPU backend only\n{e}")
            return self._cuda_off(c_ext, "the CUDA backend failed to build (see the build log)")
        cuda_ext.extra_objects.extend(objects)
        # setuptools relinks only when sources + depends are newer than the .so: a
        # recompiled CUDA object must relink too (extra_objects are not compared)
        cuda_ext.depends.extend(objects)
        cuda_ext.include_dirs.append(os.path.join(home, "include"))
        cuda_ext.library_dirs.append(lib)
        cuda_ext.runtime_library_dirs.append(lib)  # rpath: libcudart loads without a GPU; the driver at run time
        cuda_ext.libraries.extend(["cublasLt", "cudart", "stdc++"])
        cuda_ext.define_macros.extend([("LLMINT8_CUDA", "1"), ("LLMINT8_CUDA_ARCHS", f'"{arch_names}"')])
        if cutlass:
            cuda_ext.define_macros.append(("LLMINT8_SM90_GEMM", "1"))
        self._config = f"cuda: {nvcc} {arch_names}" + (" sm90-gemm" if cutlass else "")

    def build_extensions(self):
        by_name = {e.name: e for e in self.extensions}
        self._setup_cuda(by_name["llmint8._C"], by_name["llmint8._cuda"])
        c_ext = by_name["llmint8._C"]  # the CPU backend's thread pool (csrc/core/threadpool.c)
        c_ext.extra_compile_args.append("-pthread")
        c_ext.extra_link_args.append("-pthread")
        stamp = self._rebuild_on_config_change()
        super().build_extensions()
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        with open(stamp, "w", encoding="utf-8") as f:
            f.write(self._config)

    def build_extension(self, ext):
        # each module's objects in a folder of its own: both compile some of the same
        # sources (shared.c, common.c)
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


def _extension(name, sources):
    return Extension(name, sources=sources, include_dirs=[np.get_include()] + INCLUDE_DIRS,
                     define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_23_API_VERSION")],
                     extra_compile_args=list(C_FLAGS), depends=list(HEADERS))


extensions = [
    _extension("llmint8._C", C_SOURCES),
    _extension("llmint8._cuda", CUDA_EXT_SOURCES),
]

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
