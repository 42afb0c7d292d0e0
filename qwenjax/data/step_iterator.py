"""Training iterators whose whole state is their step (chat conversations, preference pairs): batch `step` is
`batch_at(step)`, so a checkpoint holds {"format", "fingerprint", "step"} and a run resumes at any step."""

from __future__ import annotations

from typing import Any

from qwenjax.errors import UserError


class StepIterator:
    """The `qwenjax.data.TrainIterator` interface (`next`, `batch_at`, `get_state`, `set_state`, `close`) for a
    subclass that sets `STATE_FORMAT`, `KIND` (its data, for messages), `FINGERPRINT_OF` (what the fingerprint
    covers), `self.fingerprint` and `self.step`, and defines `batch_at`."""

    STATE_FORMAT: str
    KIND: str
    FINGERPRINT_OF: str

    def _start(self, cache, seq_len: int, global_batch_size: int, seed: int, truncate: bool, process_index: int,
               process_count: int, empty: str) -> None:
        """Check the cache and the batch split, then set cache, seq_len, seed, global_batch_size, this
        process's `local` rows starting at row `first`, and step 0. `empty`: the error when nothing trains."""
        if global_batch_size < 1 or global_batch_size % process_count:
            raise UserError(f"global_batch_size {global_batch_size} is not a positive multiple of the "
                            f"number of processes {process_count}")
        cache.check_lengths(seq_len, truncate)
        if cache.num("train") < 1:
            raise UserError(empty)
        self.cache, self.seq_len, self.seed = cache, int(seq_len), int(seed)
        self.global_batch_size = int(global_batch_size)
        self.local = self.global_batch_size // process_count
        self.first = process_index * self.local
        self.step = 0

    def batch_at(self, step: int) -> Any:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"format": self.STATE_FORMAT, "fingerprint": self.fingerprint, "step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != self.STATE_FORMAT:
            raise UserError(f"not a {self.KIND} data-iterator state (expected the dict from "
                            f"{type(self).__name__}.get_state())")
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"the data-iterator state was saved for a different {self.KIND} data configuration "
                            f"({self.FINGERPRINT_OF} changed)")
        self.step = int(state["step"])

    def close(self) -> None:
        pass
