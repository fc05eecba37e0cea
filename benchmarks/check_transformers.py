"""llmint8 against transformers itself, on folders transformers writes.

    python benchmarks/check_transformers.py [--tokens 40] [--keep DIR]

Needs PyTorch and transformers (5.x; and bitsandbytes for the 8-bit part) in the Python that
runs it; llmint8 never depends on them, so without them the script says so and exits 0.
It imports llmint8 from this checkout (build it in place first: ``pip install -e .``).

For each architecture a tiny random model (hidden size 64, random weights of std 0.15) is
built with transformers, written with ``save_pretrained`` (safetensors), and its float32
logits (eager attention) on random tokens are compared with ``llmint8.models.load_model`` of
the same folder:

  llama          rope_parameters {"rope_type": "default", "rope_theta": 100000}
  llama3-scaled  rope_type "llama3" (factor 8, low/high 1/4, original length 64), theta 5e5
  qwen2          q/k/v biases, theta 1e6
  mistral        sliding window 16 (shorter than the sequence), theta 1e6
  gemma3         sliding window 8 on 3 of every 4 layers; full_attention linear scaling x4 with
                 theta 1e6, sliding_attention theta 1e4 (per-layer-type rope_parameters)

Each folder is also rewritten in the transformers-4 convention (top-level ``rope_theta`` /
``rope_scaling`` / ``rope_local_base_freq``, no ``rope_parameters``), and Llama is also saved in
shards. Error = max |llmint8 - transformers| / max |transformers| over the logits; the target
is 1e-4.

8-bit (when bitsandbytes and accelerate import): transformers loads the Llama folder with
``load_in_8bit=True`` on the CPU and saves it in shards small enough that modules' ``weight``
and ``SCB`` land in different files; llmint8 loads that folder. Every int8 layer's output
under ``row_scale="bitsandbytes"`` is compared with bitsandbytes' own on the inputs
transformers gave it (target 1e-6), and the logits are reported. Then
``save_quantized(..., format="bitsandbytes")`` of llmint8's model is loaded by transformers,
which must warn about nothing and give the logits of its own 8-bit folder (target 1e-6).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

TARGET = 1e-4


def rel_max(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def build(arch, torch, tf):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
        cls = tf.LlamaForCausalLM
    elif arch == "llama3-scaled":
        cfg = tf.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        cls = tf.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        cls = tf.MistralForCausalLM
    elif arch == "gemma3":
        c = dict(common, num_hidden_layers=4, tie_word_embeddings=True)
        cfg = tf.Gemma3TextConfig(**c, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention"] * 3 + ["full_attention"],
                                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if arch != "gemma3" else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def to_old_convention(folder, out):
    """The same folder with transformers-4 RoPE keys instead of rope_parameters."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    p = os.path.join(out, "config.json")
    with open(p) as f:
        hc = json.load(f)
    rp = hc.pop("rope_parameters")
    if "full_attention" in rp:
        full, local = dict(rp["full_attention"]), rp["sliding_attention"]
        hc["rope_local_base_freq"] = local["rope_theta"]
    else:
        full = dict(rp)
    hc["rope_theta"] = full.pop("rope_theta")
    hc["rope_scaling"] = None if full.get("rope_type") == "default" else full
    with open(p, "w") as f:
        json.dump(hc, f)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--keep", help="keep the written folders here")
    args = ap.parse_args()
    try:
        import torch
        import transformers as tf
    except ImportError as e:
        print(f"check_transformers: skipped, PyTorch and transformers are needed ({e}); "
              f"llmint8 itself never needs them")
        return 0
    from llmint8.models import load_model, save_quantized
    from benchutil import cpu_model

    tf.utils.logging.disable_progress_bar()
    print(f"transformers {tf.__version__}, torch {torch.__version__}, {cpu_model()}")
    root = args.keep or tempfile.mkdtemp(prefix="llmint8-tf-")
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 128, size=(2, args.tokens))
    rows, worst = [], 0.0
    models = {}
    for arch in ("llama", "llama3-scaled", "qwen2", "mistral", "gemma3"):
        model = build(arch, torch, tf)
        folder = os.path.join(root, arch)
        model.save_pretrained(folder)
        with torch.no_grad():
            ref = model(torch.from_numpy(toks)).logits.double().numpy()
        variants = [("rope_parameters", folder), ("rope_theta/rope_scaling", to_old_convention(folder, folder + "-v4"))]
        if arch == "llama":
            model.save_pretrained(folder + "-sharded", max_shard_size="40KB")
            variants.append(("sharded", folder + "-sharded"))
        for what, path in variants:
            err = rel_max(load_model(path)(toks), ref)
            worst = max(worst, err)
            rows.append((arch, what, err))
        models[arch] = (model, folder, ref)
    print(f"\nfloat32 logits, {toks.shape[0]} x {toks.shape[1]} random tokens; error = max|ours - transformers| / max|transformers|")
    print(f"{'architecture':<15}{'config':<26}{'error':>10}")
    for arch, what, err in rows:
        print(f"{arch:<15}{what:<26}{err:>10.2e}")
    print(f"worst {worst:.2e} (target {TARGET:g}): {'PASS' if worst <= TARGET else 'FAIL'}")
    ok = worst <= TARGET

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("\n8-bit part skipped: bitsandbytes is not installed")
        return 0 if ok else 1
    import llmint8

    print(f"\n8-bit, bitsandbytes {bitsandbytes.__version__}, Llama folder above")
    _, folder, ref_float = models["llama"]
    bcfg = tf.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    q = tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bcfg, device_map="cpu",
                                                dtype=torch.float32, attn_implementation="eager").eval()
    # every int8 layer's input and output inside transformers + bitsandbytes' forward
    rec = {}
    names = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
             "self_attn.o_proj": "attn.o", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
             "mlp.down_proj": "mlp.down"}

    def hook(name):
        def fn(mod, inp, out):
            rec[name] = (inp[0].detach().numpy().reshape(-1, inp[0].shape[-1]).copy(),
                         out.detach().numpy().reshape(-1, out.shape[-1]).copy())
        return fn

    mods = dict(q.named_modules())
    for i in range(q.config.num_hidden_layers):
        for theirs, ours in names.items():
            mods[f"model.layers.{i}.{theirs}"].register_forward_hook(hook(f"layers.{i}.{ours}"))
    with torch.no_grad():
        ref8 = q(torch.from_numpy(toks)).logits.double().numpy()
    f8 = os.path.join(root, "llama-bnb8-sharded")
    q.save_pretrained(f8, max_shard_size="30KB")
    with open(os.path.join(f8, "model.safetensors.index.json")) as f:
        wm = json.load(f)["weight_map"]
    split = sum(1 for k in wm if k.endswith(".SCB") and wm[k] != wm.get(k[:-4] + ".weight"))
    ours_bnb = load_model(f8, row_scale="bitsandbytes")
    ours_l8 = load_model(f8)
    print(f"transformers' 8-bit folder: {len(set(wm.values()))} shards, {split} modules with weight and SCB "
          f"in different shards; llmint8 loads it")
    lay_bnb = [rel_max(ours_bnb.linears[n](x), y) for n, (x, y) in rec.items()]
    lay_l8 = [llmint8.relative_error(ours_l8.linears[n](x), y) for n, (x, y) in rec.items()]
    print(f"  per layer, on transformers' own inputs of every int8 layer ({len(rec)} layers):")
    print(f"    llmint8 row_scale='bitsandbytes' vs bitsandbytes: max error {max(lay_bnb):.2e}")
    print(f"    llmint8 (own row scales)         vs bitsandbytes: median mean-abs relative difference "
          f"{float(np.median(lay_l8)):.2e}")
    e_bnb, e_l8 = rel_max(ours_bnb(toks), ref8), rel_max(ours_l8(toks), ref8)
    print(f"  logits vs transformers+bitsandbytes: row_scale='bitsandbytes' {e_bnb:.2e}, own row scales {e_l8:.2e} "
          f"(float differences upstream flip a few int8 roundings; the float model is "
          f"{rel_max(ref8, ref_float):.2e} away)")
    ok = ok and max(lay_bnb) <= 1e-6
    # llmint8's writer, read by transformers
    ours_saved = os.path.join(root, "llama-bnb8-by-llmint8")
    save_quantized(ours_l8, ours_saved, format="bitsandbytes", overwrite=True)
    records = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    h = Catch()
    logging.getLogger("transformers").addHandler(h)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        q2 = tf.AutoModelForCausalLM.from_pretrained(ours_saved, device_map="cpu", dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    logging.getLogger("transformers").removeHandler(h)
    msgs = records + [str(w.message) for w in ws]
    with torch.no_grad():
        ref_back = q2(torch.from_numpy(toks)).logits.double().numpy()
    e_back = rel_max(ref_back, ref8)
    print(f"llmint8's save_quantized(format='bitsandbytes') of that model, loaded by transformers: "
          f"{len(msgs)} warnings{': ' + '; '.join(msgs[:3]) if msgs else ''}")
    print(f"  rope_parameters as transformers reads them: {q2.config.rope_parameters}")
    print(f"  transformers' logits on it vs on its own 8-bit folder: {e_back:.2e}")
    ok = ok and e_back <= 1e-6 and not msgs
    print("PASS" if ok else "FAIL")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
