"""Loss against position: does the model use (or survive) a long context?

Documents from a text/JSONL/Parquet corpus (`qwenjax.data.corpus`) are tokenized, each followed by EOS,
and concatenated into a stream cut into `sequences` windows of `length + 1` tokens. Windows are not
segment-masked: position t attends to everything before it, across document boundaries, as in a long
book. Entry t of a window's loss is -log p(x[t+1] | x[:t+1]), the loss with t + 1 tokens of context; the
table averages it over windows and over buckets of `bucket` positions (the last bucket may be shorter).
A flat or falling curve means the model uses the context; a rise past `max_position_embeddings` is the
extrapolation failure that YaRN and similar rope scalings are meant to fix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from qwenjax.data.corpus import iter_documents, resolve_files
from qwenjax.data.tokenizer import Tokenizer
from qwenjax.errors import UserError

#: (windows [B, L + 1] int32 numpy) -> next-token losses [B, L] float; tests may swap it
LossFn = Callable[[np.ndarray], np.ndarray]


def pack_windows(documents: Iterable[str], tokenizer: Tokenizer, length: int, sequences: int) -> np.ndarray:
    """[n, length + 1] int32 windows of the concatenated, EOS-separated documents (n <= sequences)."""
    need = sequences * (length + 1)
    stream: list[int] = []
    for text in documents:
        stream.extend(tokenizer.encode(text))
        stream.append(tokenizer.eos_id)
        if len(stream) >= need:
            break
    n = min(sequences, len(stream) // (length + 1))
    if n == 0:
        raise UserError(f"--data holds {len(stream)} tokens, fewer than one window of --length {length} + 1")
    return np.asarray(stream[:n * (length + 1)], np.int32).reshape(n, length + 1)


def read_documents(path: str) -> Iterable[str]:
    return (text for _, text in iter_documents(resolve_files(path)))


def model_losses(config, params, *, chunk: int = 512, impl: str = "auto") -> LossFn:
    """The loss function of a model (one compile per window length and batch)."""
    # JAX is loaded with the model's code only: the packing and bucketing here stay importable without it
    import jax.numpy as jnp

    from qwenjax.evals.forward import token_losses

    def losses(windows_BL1: np.ndarray) -> np.ndarray:
        chunk_ = min(chunk, windows_BL1.shape[1] - 1)
        return np.asarray(token_losses(config, params, jnp.asarray(windows_BL1, jnp.int32), chunk=chunk_,
                                       impl=impl))
    return losses


def bucket_means(losses_NL: np.ndarray, bucket: int) -> list[dict]:
    """[{start, end, loss, ppl}] per bucket of positions [start, end), the mean over windows and positions."""
    L = losses_NL.shape[1]
    out = []
    for start in range(0, L, bucket):
        end = min(start + bucket, L)
        loss = float(np.mean(losses_NL[:, start:end], dtype=np.float64))
        out.append({"start": start, "end": end, "loss": loss, "ppl": float(np.exp(min(loss, 700.0)))})
    return out


def run_ppl_by_position(losses: LossFn, tokenizer: Tokenizer, documents: Iterable[str], *, length: int,
                        bucket: int = 256, sequences: int = 8, batch_size: int = 1,
                        max_position_embeddings: int | None = None) -> dict:
    """The table: mean loss per position bucket over `sequences` packed windows (see module doc)."""
    if length < 2:
        raise UserError(f"--length must be >= 2 tokens, got {length}")
    if not 1 <= bucket <= length:
        raise UserError(f"--bucket must be in [1, --length={length}], got {bucket}")
    if sequences < 1 or batch_size < 1:
        raise UserError(f"--sequences and --batch-size must be >= 1, got {sequences} and {batch_size}")
    windows = pack_windows(documents, tokenizer, length, sequences)
    B = min(batch_size, len(windows))
    padded = np.concatenate([windows, np.repeat(windows[-1:], -len(windows) % B, axis=0)])
    losses_NL = np.concatenate([losses(padded[i:i + B]) for i in range(0, len(padded), B)])[:len(windows)]
    if not np.all(np.isfinite(losses_NL)):
        raise UserError("the model's losses are not finite (NaN or inf): check the checkpoint and overrides")
    beyond = max_position_embeddings is not None and length > max_position_embeddings
    table = {"eval": "ppl-by-position", "length": length, "bucket": bucket, "sequences": len(windows),
             "tokens": int(losses_NL.size), "max_position_embeddings": max_position_embeddings,
             "beyond_max_position_embeddings": beyond, "mean_loss": float(np.mean(losses_NL, dtype=np.float64)),
             "buckets": bucket_means(losses_NL, bucket)}
    if len(windows) < sequences:
        table["note"] = f"--data filled {len(windows)} of {sequences} windows"
    if beyond:
        table["note_position"] = (f"--length {length} exceeds the model's max_position_embeddings "
                                  f"({max_position_embeddings}): extrapolation")
    return table
