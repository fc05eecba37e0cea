"""Values reported in the LLM.int8() paper, for drawing beside our measurements.

Source: Dettmers, Lewis, Belkada, Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale", NeurIPS 2022, arXiv:2208.07339: Table 1 (perplexity per quantization
method, at the end of this module) and Appendix C, Table 4 ("Summary
statistics of outliers with a magnitude of at least 6 that occur in at least 25% of all layers
and at least 6% of all sequence dimensions"). Figures 3 and 4a of the paper plot these same
measurements (their points are the table's rows), so the table gives the figures' values
exactly, without reading them off a plot.

Columns: C4 validation perplexity, parameter count, number of outlier features, how many of
them are one-sided, the share of layers and of sequence dimensions affected, the signed
quartiles (25%, 50%, 75%) of the most common outlier's values, and the mean top-1 attention
softmax probability with and without the outliers. The paper's perplexities are on C4; ours
are on whatever text the analysis ran on, so the perplexity axes are not directly comparable.

Statements from the paper's text used as reference values elsewhere:

* Section 4.2, point 1: between 6B and 6.7B parameters "the percentage of layers affected
  increases from 65% to 100%" and "the number of sequence dimensions affected increases
  rapidly from 35% to 75%".
* Section 4.2: removing the outliers reduces the mean top-1 softmax probability "from about
  40% to about 20%" and increases validation perplexity "by 600-1000%"; removing 7 random
  feature dimensions decreases the top-1 probability by only "0.02-0.3%" and increases
  perplexity by "0.1%".
* Section 4.2, point 3: outlier values of magnitude around 60 beyond the 6.7B scale.
"""

from __future__ import annotations

PAPER_SOURCE = "Dettmers et al. 2022, arXiv:2208.07339, Appendix C Table 4"

# (family, C4 ppl, params, count, one-sided, layers %, sdims %, quartiles, top1 with, top1 without)
_ROWS = [
    ("GPT2", 33.5, 117e6, 1, 1, 25, 6, (-8, -7, -6), 45, 19),
    ("GPT2", 26.0, 345e6, 2, 1, 29, 18, (6, 7, 8), 45, 19),
    ("FSEQ", 25.7, 125e6, 2, 2, 25, 22, (-40, -23, -11), 32, 24),
    ("GPT2", 22.6, 762e6, 2, 0, 31, 16, (-9, -6, 9), 41, 18),
    ("GPT2", 21.0, 1.5e9, 2, 1, 41, 35, (-11, -9, -7), 41, 25),
    ("FSEQ", 15.9, 1.3e9, 4, 3, 64, 47, (-33, -21, -11), 39, 15),
    ("FSEQ", 14.4, 2.7e9, 5, 5, 52, 18, (-25, -16, -9), 45, 13),
    ("GPT-J", 13.8, 6.0e9, 6, 6, 62, 28, (-21, -17, -14), 55, 10),
    ("FSEQ", 13.3, 6.7e9, 6, 6, 100, 75, (-44, -40, -35), 35, 13),
    ("FSEQ", 12.5, 13e9, 7, 6, 100, 73, (-63, -58, -45), 37, 16),
]

#: One dict per model of the paper's Table 4. Shares are fractions in [0, 1];
#: ``median_magnitude`` is ``|median|`` of the most common outlier (the Figure 4a quantity).
PAPER_TABLE4: list[dict] = [
    {
        "model": f"{fam} {p / 1e9:.1f}B" if p >= 1e9 else f"{fam} {p / 1e6:.0f}M",
        "family": fam,
        "c4_ppl": ppl,
        "n_params": p,
        "n_outlier_features": cnt,
        "n_one_sided": one,
        "layer_share": lay / 100,
        "position_share": sd / 100,
        "quartiles": q,
        "median_magnitude": abs(q[1]),
        "top1_with_outliers": w / 100,
        "top1_without_outliers": wo / 100,
    }
    for fam, ppl, p, cnt, one, lay, sd, q, w, wo in _ROWS
]

#: Zeroing experiment, as stated in the paper's Section 4.2 text.
PAPER_ZEROING = {
    "top1_with_outliers": 0.40,
    "top1_without_outliers": 0.20,
    "ppl_increase_min": 6.0,   # +600%
    "ppl_increase_max": 10.0,  # +1000%
    "random_top1_decrease_max": 0.003,
    "random_ppl_increase": 0.001,
}

#: The paper's Table 1: C4 validation perplexity of OPT-style (fairseq) models of five sizes,
#: per method (same source, Section 3.4). Keys are the paper's row names.
PAPER_TABLE1_PARAMS = (125e6, 1.3e9, 2.7e9, 6.7e9, 13e9)
PAPER_TABLE1: dict[str, tuple[float, ...]] = {
    "32-bit Float": (25.65, 15.91, 14.43, 13.30, 12.45),
    "Int8 absmax": (87.76, 16.55, 15.11, 14.59, 19.08),
    "Int8 zeropoint": (56.66, 16.24, 14.76, 13.49, 13.94),
    "Int8 absmax row-wise": (30.93, 17.08, 15.24, 14.13, 16.49),
    "Int8 absmax vector-wise": (35.84, 16.82, 14.98, 14.13, 16.48),
    "Int8 zeropoint vector-wise": (25.72, 15.94, 14.36, 13.38, 13.47),
    "Int8 absmax row-wise + decomposition": (30.76, 16.19, 14.65, 13.25, 12.46),
    "Absmax LLM.int8() (vector-wise + decomp)": (25.83, 15.93, 14.44, 13.24, 12.45),
    "Zeropoint LLM.int8() (vector-wise + decomp)": (25.69, 15.92, 14.43, 13.24, 12.45),
}
