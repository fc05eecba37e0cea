"""Loading a saved llm.int8 model vs loading the float model and quantizing it.

    python benchmarks/bench_load.py [--model smollm2-135m] [--keep DIR]

Saves ``--model`` quantized with LLM.int8() (llmint8 format) once, then runs each way of getting
the quantized model in its own fresh Python process, one run each:

  float + quantize   load_model(float checkpoint).quantize("llm.int8")
  saved llm.int8     load_model(saved folder)

and prints wall time (from just before load_model to the quantized model being ready), peak
resident memory of the process (VmHWM, which includes the interpreter and NumPy) and the
peak above the RSS after ``import llmint8.models``, with the ratios saved / float+quantize.
Both processes then compute the logits of the same 8 tokens; they must be bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
import numpy as np
import llmint8.models as M
from benchutil import cpu_model

def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])

rss_kib = lambda: status_kib("VmRSS")

base = rss_kib()
t0 = time.perf_counter()
m = M.load_model(sys.argv[1])
if sys.argv[2] == "quantize":
    m = m.quantize("llm.int8")
dt = time.perf_counter() - t0
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork/exec)
peak = status_kib("VmHWM")
logits = m(np.array([[1, 504, 3458, 282, 253, 1345, 30, 2]]))
np.save(sys.argv[3], logits)
print(json.dumps(dict(seconds=dt, peak_kib=peak, base_kib=base, after_kib=rss_kib())))
"""


def run(spec, mode, out):
    r = subprocess.run([sys.executable, "-c", CHILD, spec, mode, out], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child ({mode}) failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="zoo name or path of the float model")
    p.add_argument("--keep", default=None, help="save the quantized folder here (default: a temporary folder)")
    args = p.parse_args(argv)

    import numpy as np

    from llmint8.models import zoo

    spec = zoo.fetch(args.model) if zoo.is_zoo_name(args.model) else args.model
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or os.path.join(tmp, "saved")
        t0 = time.perf_counter()
        # in a child too, so that this process stays small
        code = ("import sys; from llmint8.models import load_model, save_quantized; "
                "save_quantized(load_model(sys.argv[1]).quantize('llm.int8'), sys.argv[2], overwrite=True)")
        subprocess.run([sys.executable, "-c", code, spec, folder], check=True)
        t_save = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(folder, x)) for x in os.listdir(folder))
        a = run(spec, "quantize", os.path.join(tmp, "a.npy"))
        b = run(folder, "load", os.path.join(tmp, "b.npy"))
        same = np.array_equal(np.load(os.path.join(tmp, "a.npy")), np.load(os.path.join(tmp, "b.npy")))
    print(f"model {args.model} ({spec}); CPU {cpu_model()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"saved folder {size / 2**20:.1f} MiB (written in {t_save:.1f} s, not timed below); one run each, "
          f"each in a fresh process")
    head = f"{'way':<18} {'seconds':>8} {'peak RSS MiB':>13} {'peak - import MiB':>18} {'RSS after MiB':>14}"
    print(head)
    print("-" * len(head))
    for name, r in (("float + quantize", a), ("saved llm.int8", b)):
        print(f"{name:<18} {r['seconds']:>8.2f} {r['peak_kib'] / 1024:>13.1f} "
              f"{(r['peak_kib'] - r['base_kib']) / 1024:>18.1f} {r['after_kib'] / 1024:>14.1f}")
    print(f"{'ratio saved/float':<18} {b['seconds'] / a['seconds']:>8.2f} {b['peak_kib'] / a['peak_kib']:>13.2f} "
          f"{(b['peak_kib'] - b['base_kib']) / (a['peak_kib'] - a['base_kib']):>18.2f} "
          f"{b['after_kib'] / a['after_kib']:>14.2f}")
    print(f"logits bit-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
