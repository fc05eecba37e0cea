"""setup.py: a second build into the same build/ folder follows the CUDA setting of that
build, not the first one's (setuptools alone reuses _C as long as no source is newer, and
leaves an earlier build's _cuda module where the wheel picks it up).

Builds _C twice in a copy of the sources (about 10 s each on 2 cores). Without nvcc the
CUDA side is simulated: a toolkit whose nvcc fails gives a CPU-only build with another
reason, which is enough to tell a rebuilt _C from a reused one. The real CUDA -> CPU-only ->
CUDA sequence, with wheels, is checked by .ci/packaging.sh."""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_sources(dst):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dst)
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(dst, "csrc"))
    shutil.copytree(os.path.join(ROOT, "llmint8"), os.path.join(dst, "llmint8"),
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))


def _build(src, env, *args):
    r = subprocess.run([sys.executable, "setup.py", "build_ext", *args], cwd=src, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _cuda_off_reason(where):
    code = "import llmint8._C as C; print(C.build_info().get('cuda_off'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=where, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="builds with the Linux toolchain")
def test_second_build_follows_the_cuda_setting(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _copy_sources(src)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMINT8_", "CUDA_"))}
    cuda_name = "_cuda" + sysconfig.get_config_var("EXT_SUFFIX")

    # an in-place CPU-only build where an earlier CUDA build left its module beside the sources
    stale_src = src / "llmint8" / cuda_name
    stale_src.write_bytes(b"not a module")
    _build(src, dict(env, LLMINT8_CUDA="0"), "--inplace")
    assert not stale_src.exists(), "an in-place CPU-only build left an earlier build's _cuda module"
    assert _cuda_off_reason(src) == "LLMINT8_CUDA=0"

    # build/lib, which the next `pip install .` reuses, with what an earlier CUDA build leaves there
    (lib,) = (src / "build").glob("lib*")
    stale = lib / "llmint8" / cuda_name
    stale.write_bytes(b"not a module")

    # a CUDA toolkit whose nvcc fails: this build is CPU-only for another reason
    fake = tmp_path / "cuda"
    (fake / "bin").mkdir(parents=True)
    (fake / "lib64").mkdir()
    (fake / "lib64" / "libcudart.so").write_bytes(b"")
    nvcc = fake / "bin" / "nvcc"
    nvcc.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "nvcc: simulated failure" >&2
        exit 1
        """))
    nvcc.chmod(0o755)
    _build(src, dict(env, CUDA_HOME=str(fake)))
    assert not stale.exists(), "a CPU-only build left an earlier build's _cuda module in the build output"
    assert _cuda_off_reason(lib) == "the CUDA backend failed to build (see the build log)", \
        "_C was not rebuilt for the new CUDA setting"


def test_sdist_ships_what_the_readme_points_to(tmp_path):
    """benchmarks/ and notebooks/ (the README points to both) and the typing marker are in the
    sdist: every file git tracks there. (.ci/packaging.sh checks the same with `python -m build`.)"""
    import tarfile

    r = subprocess.run(["git", "ls-files", "benchmarks", "notebooks", "llmint8/py.typed"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        pytest.skip("not a git checkout: no list of tracked files to compare with")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "*.so",
                                                             "__pycache__", ".pytest_cache", ".hypothesis"))
    b = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                       capture_output=True, text=True, env=dict(os.environ, LLMINT8_CUDA="0"))
    assert b.returncode == 0, b.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").iterdir()
    with tarfile.open(sdist) as t:
        shipped = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    missing = sorted(set(r.stdout.split()) - shipped)
    assert not missing, f"the sdist lacks {missing}"
