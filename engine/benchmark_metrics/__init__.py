"""Benchmark metrics of TOFU and MUSE, as plain functions of a model, a tokenizer and Python data.

- `rouge`: ROUGE-L (precision, recall, F1) with rouge_score's tokenization, LCS computed here.
- `tofu`: answer log-probabilities, the truth ratio, forget quality (KS test against a retain-only
  model's truth ratios read from a JSON file).
- `muse`: VerbMem, KnowMem (ROUGE-L of greedy outputs), the Min-K% AUC of forget vs holdout texts
  and PrivLeak.

Formulas and their sources: docs/benchmark-metrics.md. torch/transformers are imported only by the
functions that run a model, so importing this package stays light.
"""
