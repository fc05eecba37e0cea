"""What a new user meets around the arithmetic: the demo's report, broken pipes, corrupt
vocabularies, quantize's output folder, build_info's CUDA report, relative_error's shapes,
layer(x, out_dtype=), float64 input, signatures and type hints, --tokenizer, perplexity's cost
and text files that are not text."""
import importlib
import inspect
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import llmint8
import llmint8.__main__ as cli
from data_paths import require

FP16_EPS = 2.0**-11  # float16's unit roundoff: its rounding error is of this order, relative


# ---------------------------------------------------------------- demo

def test_demo_reports_threads_once_and_fp16_output_error(capsys):
    from llmint8 import demo

    results = demo.run(size=256, tokens=(4,), repeat=1)
    out = capsys.readouterr().out
    assert out.splitlines()[0].count("CPU threads") == 1, out.splitlines()[0]
    # the fp16 column is the error of float16 outputs (what an fp16 layer returns): of the
    # order of float16's rounding, not float32's 1e-7
    err = results["error"][4]["fp16"]
    assert FP16_EPS / 16 < err < FP16_EPS, err


# ---------------------------------------------------------------- broken pipe

@pytest.mark.parametrize("argv", [["demo", "--size", "64", "--tokens", "1", "--repeat", "1"], ["--help"]])
def test_a_closed_pipe_ends_a_command_quietly(argv):
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # the reader is gone before the command writes: as `| head` after its lines
    try:
        p = subprocess.run([sys.executable, "-m", "llmint8", *argv], stdout=w_fd, stderr=subprocess.PIPE,
                           text=True, timeout=300)
    finally:
        os.close(w_fd)
    assert p.stderr == "", p.stderr
    assert p.returncode == 141


# ---------------------------------------------------------------- corrupt GGUF vocabulary

def test_gguf_vocabulary_with_one_changed_byte_names_the_file(tmp_path):
    from llmint8.models.tokenizers import load_tokenizer, read_gguf_metadata

    src = require("tokenizers", "llama.cpp-vocab", "ggml-vocab-gpt-2.gguf")
    data = bytearray(open(src, "rb").read())
    merge = read_gguf_metadata(src)["tokenizer.ggml.merges"][1000].encode()
    at = data.find(len(merge).to_bytes(8, "little") + merge) + 8  # the merge's characters in the file
    assert at >= 8
    data[at] = 0x01  # a byte no byte-level vocabulary token holds raw
    bad = tmp_path / "vocab.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        load_tokenizer(str(bad))
    assert str(bad) in str(e.value) and "merge 1000" in str(e.value), str(e.value)


# ---------------------------------------------------------------- quantize --out

@pytest.fixture
def stories():
    return require("models", "stories260K", "stories260K.bin")


def test_quantize_refuses_a_folder_of_other_files(stories, tmp_path, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["quantize", "--model", stories, "--out", str(out), "--no-progress"]) == 2
    assert "other entr" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert cli.main(["quantize", "--model", stories, "--out", "/", "--no-progress"]) == 2
    assert "--out '/'" in capsys.readouterr().err


def test_quantize_reports_the_size_of_what_it_wrote(stories, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", stories, "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    written = sum(os.path.getsize(out / f) for f in os.listdir(out))
    # beside the saved model: a large unrelated file and a dangling link
    (out / "big.bin").write_bytes(b"\0" * (4 << 20))
    os.symlink(tmp_path / "nowhere", out / "dangling")
    assert cli.main(["quantize", "--model", stories, "--out", str(out), "--overwrite", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{written / 2**20:.2f} MiB" in line, (line, written)


# ---------------------------------------------------------------- build_info and CUDA

class _TooOldDriver:
    """Stands in for llmint8._cuda on a machine whose driver is older than the runtime."""

    @staticmethod
    def build_info():
        return {"cuda_version": (13, 0), "cuda_archs": "sm_90 compute_90", "cuda_runtime_version": (13, 0),
                "cuda_driver_version": (12, 2)}

    @staticmethod
    def cuda_available():
        return False

    @staticmethod
    def cuda_unavailable_reason():
        return "CUDA driver version is insufficient for CUDA runtime version"


def test_build_info_says_why_cuda_cannot_run(monkeypatch):
    from llmint8 import cuda

    backends = sys.modules["llmint8.backends"]  # llmint8.backends is also a function's name
    real = dict(backends._C.build_info())

    class C:
        @staticmethod
        def build_info():
            return dict(real, cuda_built=True)

    monkeypatch.setattr(backends, "_C", C)
    monkeypatch.setitem(cuda._state, "module", _TooOldDriver)
    info = llmint8.build_info()
    assert info["cuda"] is True and info["cuda_usable"] is False
    reason = info["cuda_unusable_reason"]
    assert "insufficient" in reason and "12.2" in reason and "13.0" in reason, reason
    assert info["cuda_driver_version"] == (12, 2) and info["cuda_runtime_version"] == (13, 0)


def test_build_info_of_a_real_cuda_build_reports_versions():
    from llmint8 import cuda

    if cuda._module() is None:
        pytest.skip("no CUDA backend in this build")
    info = llmint8.build_info()
    assert isinstance(info["cuda_runtime_version"], tuple) and isinstance(info["cuda_driver_version"], tuple)
    assert info["cuda_usable"] == llmint8.cuda_available()
    if not info["cuda_usable"]:
        assert info["cuda_unusable_reason"].startswith(cuda.unavailable_reason())


# ---------------------------------------------------------------- relative_error

def test_relative_error_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(3, 1\).*\(3,\)"):
        llmint8.relative_error(np.ones((3, 1)), np.array([1.0, 2.0, 3.0]))
    assert llmint8.relative_error(np.array([1.0, 2.0]), np.array([1.0, 4.0])) == pytest.approx(2.0 / 5.0)


# ---------------------------------------------------------------- the layer's call

def _layer(k=32, n=24, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    return llmint8.Int8Linear.from_float(w, device="cpu"), rng.standard_normal((2, 3, k)).astype(np.float16)


def test_call_takes_out_dtype_like_forward():
    layer, x = _layer()
    y32 = layer(x, out_dtype=np.float32)
    assert y32.dtype == np.float32 and y32.shape == (2, 3, 24)
    assert np.array_equal(y32.reshape(6, 24), layer.forward(x.reshape(6, 32), out_dtype=np.float32))
    assert layer(x).dtype == np.float16
    assert np.array_equal(layer(x, out_dtype="float16"), layer(x))
    with pytest.raises(TypeError, match="out_dtype"):
        layer(x, out_dtype=np.int32)


@pytest.mark.parametrize("call", ["layer", "forward", "matmul", "from_float", "quantize_rowwise"])
def test_float64_is_refused_with_the_cast_in_the_message(call):
    layer, x = _layer()
    x64 = x.astype(np.float64)
    fns = {"layer": lambda: layer(x64), "forward": lambda: layer.forward(x64[0]),
           "matmul": lambda: llmint8.matmul(x64[0], x64[0]),
           "from_float": lambda: llmint8.Int8Linear.from_float(x64[0]),
           "quantize_rowwise": lambda: llmint8.quantize_rowwise(x64[0])}
    with pytest.raises(TypeError, match=r"float64.*astype\(np\.float32\)"):
        fns[call]()


def test_signatures_and_type_hints():
    from llmint8 import _C

    L = llmint8.Int8Linear
    assert list(inspect.signature(L).parameters) == ["weight_int8", "weight_scale", "outlier_columns",
                                                     "outlier_weight", "bias", "threshold", "device"]
    assert list(inspect.signature(L.forward).parameters) == ["self", "x", "out_dtype"]
    assert list(inspect.signature(L.__call__).parameters) == ["self", "x", "out_dtype"]
    for f in (_C.quantize_absmax, _C.quantize_rowwise, _C.int8_matmul, _C.find_outlier_columns,
              _C.quantize_weight, _C.set_num_threads, _C.build_info):
        inspect.signature(f)  # raises ValueError where no signature can be read
    assert inspect.signature(llmint8.matmul).return_annotation is not inspect.Signature.empty
    assert os.path.isfile(os.path.join(os.path.dirname(llmint8.__file__), "py.typed"))


# ---------------------------------------------------------------- --tokenizer

@pytest.mark.parametrize("argv", [
    ["perplexity", "--model", "M", "--text", "TEXT", "--no-progress"],
    ["quantize", "--model", "M", "--out", "OUT", "--no-progress"],
    ["analyze", "--model", "M", "--text", "TEXT", "--out", "OUT", "--no-progress"],
])
def test_tokenizer_option_reaches_load_model(argv, tmp_path, monkeypatch, capsys):
    import llmint8.models as models

    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat.")
    model = tmp_path / "model.bin"  # a path that exists: the loader below is a stand-in
    model.write_bytes(b"\0")
    tok = tmp_path / "tok.bin"
    tok.write_bytes(b"\0")
    seen = {}

    def fake_load(name, *a, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(models, "load_model", fake_load)
    argv = [{"TEXT": str(text), "OUT": str(tmp_path / "out"), "M": str(model)}.get(a, a) for a in argv]
    rc = cli.main(argv + ["--tokenizer", str(tok)])
    assert seen.get("tokenizer") == str(tok), (rc, capsys.readouterr().err)
    assert cli.main(argv + ["--tokenizer", str(tmp_path / "missing")]) == 2
    assert "--tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------- perplexity: cost and text

class _SlowModel:
    """A stand-in model: uniform logits over 8 tokens, one forward per window."""

    method = "float"
    config = {"max_seq_len": 64}

    def __init__(self):
        self.forwards = 0

    def forward(self, tokens, logits=False):
        self.forwards += 1
        return np.zeros((1, np.asarray(tokens).shape[1], 4), np.float32)

    def logits_from_hidden(self, h):
        return np.zeros((len(h), 8), np.float32)


def test_perplexity_max_tokens_and_a_warning_with_an_estimate(monkeypatch):
    ppl_mod = importlib.import_module("llmint8.models.perplexity")  # the module, not the function

    tokens = np.arange(1000) % 8
    m = _SlowModel()
    r = ppl_mod.perplexity(m, tokens, context=16, stride=8, progress=False, max_tokens=100)
    m2 = _SlowModel()
    assert r == ppl_mod.perplexity(m2, tokens[:100], context=16, stride=8, progress=False)
    assert r["n_tokens"] == 99 and m.forwards == m2.forwards
    assert r["ppl"] == pytest.approx(8.0)  # uniform over 8 tokens
    monkeypatch.setattr(ppl_mod, "SLOW_WARNING_S", 0.0)  # every run counts as slow
    with pytest.warns(RuntimeWarning, match=r"1000 tokens in 124 windows of 16 .* max_tokens=N"):
        ppl_mod.perplexity(_SlowModel(), tokens, context=16, stride=8, progress=False)
    monkeypatch.setattr(ppl_mod, "SLOW_WARNING_S", 1e9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ppl_mod.perplexity(_SlowModel(), tokens, context=16, stride=8, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        ppl_mod.perplexity(_SlowModel(), tokens, max_tokens=1)


@pytest.mark.parametrize("content,words", [
    (b"Once upon a time\0\x7fELF\x02\x01", ["NUL byte at offset 16", "binary"]),
    (b"Once upon a time \xff\xfe there", ["not UTF-8", "byte 17"]),
])
def test_text_that_is_not_utf8_is_refused(content, words, tmp_path, capsys):
    from llmint8.models import read_text

    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_text(bad)
    assert str(bad) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    rc = cli.main(["perplexity", "--model", "stories260K", "--text", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and words[0] in err, err


def test_read_text_limit_never_cuts_a_character(tmp_path):
    from llmint8.models import read_text

    f = tmp_path / "t.txt"
    f.write_text("\ufeff" + "é€😀" * 50, encoding="utf-8")
    assert read_text(f) == "é€😀" * 50
    for n in range(1, 20):
        assert read_text(f, n) == ("é€😀" * 50)[:n]  # the byte-order mark is not counted
