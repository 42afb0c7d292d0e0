"""Long-context evaluations of a trained or converted model: passkey retrieval and loss by position.

- `checkpoint`: a model dir, run dir or HF folder -> (config, params, tokenizer), with model overrides
  (rope_theta, rope_scaling, ...) so a context extension (YaRN) can be judged without training.
- `forward`: chunked prefill into a KV cache (logits never exceed [B, chunk, V]), batched greedy decoding
  and per-token losses, one compile per (batch, length).
- `passkey`, `ppl_position`: the two evals, each returning a JSON-ready table; `plots`: their PNGs.
"""
