"""Batches for training: deterministic shuffling, a slice per data-parallel rank, resumable mid-epoch.

The order of epoch e is a permutation drawn from numpy's PCG64 seeded with (seed, e), so it depends only
on the seed and the epoch — a resumed run reads exactly the rows an uninterrupted run would. Each rank of
a data-parallel group takes every world_size-th row of the (truncated) permutation, so ranks never share
rows and all ranks run the same number of steps.

One item of `StepLoader` is one optimizer step: a list of `micro_batches` micro-batches (gradient
accumulation), each a dict of int64 tensors of `batch_size` rows: the model's keyword arguments (token blocks become
input_ids and targets with causal_lm_inputs; classification rows are input_ids, attention_mask, labels).
"""
from __future__ import annotations

import numpy as np
import torch


def as_columns(data) -> dict:
    """A dataset as named columns, one row per example: a dict of arrays (input_ids, attention_mask, labels ...) as
    it is, a 2-D token-block array (numpy or torch) as {"input_ids": blocks}, a dataset of dicts (a
    torch.utils.data.Dataset, a list) stacked key by key; checked for a common number of rows."""
    if isinstance(data, dict):
        columns = dict(data)
    elif hasattr(data, "ndim") or not hasattr(data, "__getitem__"):
        columns = {"input_ids": data}
    else:
        columns = _stack_rows(data)
    if not columns:
        raise ValueError("the dataset has no columns")
    rows = {name: len(col) for name, col in columns.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"dataset columns differ in length: {rows}")
    if next(iter(rows.values())) == 0:
        raise ValueError("the dataset is empty: prepare it from a larger text or check the path")
    return columns


def checked_columns(data, vocab_size: int, num_labels: int | None = None, what: str = "data") -> dict:
    """The data's columns (as_columns), checked once before a model trains or evaluates on them: every column is
    integers (a float array is accepted when it holds whole numbers, and returned as int64), token ids lie in
    [0, vocab_size) (-100, "ignore" in a loss, is no token), labels in [0, num_labels) (num_labels None: not a
    classifier), attention masks hold only 0 and 1, and no row is all padding (it has nothing to score: an error
    for training and for evaluation alike). One ValueError line names the column, the value and its row."""
    columns = {name: integer_column(column, name, what) for name, column in as_columns(data).items()}
    ids = columns["input_ids"]
    low, high = _extremes(ids)
    if high >= vocab_size:
        raise ValueError(f"the {what} holds token id {high} (row {_first_row(ids, ids == high)}) but the model's "
                         f"vocab_size is {vocab_size}: was it prepared with another tokenizer? (or set "
                         f"model.model_config.vocab_size)")
    if low < 0:
        raise ValueError(f"the {what} holds token id {low} (row {_first_row(ids, ids == low)}): token ids must be in "
                         f"[0, {vocab_size}) (-100 marks a label to ignore, never an input token); prepare the data "
                         f"again")
    if "labels" in columns and num_labels is not None:
        labels = columns["labels"]
        low, high = _extremes(labels)
        if low < 0 or high >= num_labels:
            bad = low if low < 0 else high
            raise ValueError(f"the {what} holds labels {low}..{high} but num_labels is {num_labels}: label {bad} "
                             f"(row {_first_row(labels, labels == bad)}) is not a class id in [0, {num_labels}); "
                             f"set model.model_config.num_labels, or fix the labels")
    if "attention_mask" in columns:
        _check_mask(columns["attention_mask"], what)
    return columns


def integer_column(column, name: str, what: str):
    """column as an integer numpy array (a memory map stays one); a float one only when every value is whole."""
    if isinstance(column, torch.Tensor):
        column = column.detach().cpu().numpy()
    array = column if isinstance(column, np.ndarray) else np.asarray(column)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"the {what}'s {name} is an array of {array.dtype}, not integers: prepare the data again")
    whole = np.isfinite(array) & (np.floor(array) == array)
    if not whole.all():
        value = array[~whole].flat[0]
        raise ValueError(f"the {what}'s {name} holds {float(value)} (row {_first_row(array, ~whole)}), not a whole "
                         f"number: token ids, labels and masks must be integers (an integer array); prepare the "
                         f"data again")
    return array.astype(np.int64)


def _extremes(array) -> tuple[int, int]:
    if array.size == 0:
        return 0, 0
    return int(array.min()), int(array.max())


def _first_row(array, hits) -> int:
    """The first row (index along the first axis) where hits is true."""
    return int(np.argwhere(np.asarray(hits))[0][0]) if array.ndim else 0


def _check_mask(mask, what: str):
    if not np.isin(mask, (0, 1)).all():
        bad = np.asarray(mask)[~np.isin(mask, (0, 1))].flat[0]
        raise ValueError(f"the {what}'s attention_mask holds {bad} (row {_first_row(mask, ~np.isin(mask, (0, 1)))}):"
                         f" a mask is 1 for a token and 0 for padding; prepare the data again")
    empty = ~np.asarray(mask).reshape(len(mask), -1).any(axis=1)
    if empty.any():
        raise ValueError(f"{int(empty.sum())} row(s) of the {what} have an all-zero attention_mask (the first: row "
                         f"{int(np.argmax(empty))}): they hold nothing to score; drop them or prepare the data again")


def _stack_rows(dataset) -> dict:
    """{key: (rows, ...) array} of a dataset whose items are dicts of equal-shaped values."""
    items = [dataset[i] for i in range(len(dataset))]
    if not items or not all(isinstance(item, dict) for item in items):
        raise ValueError("a dataset of examples must yield dicts (input_ids, and attention_mask / labels for a "
                         "classifier), or pass a 2-D array of token blocks")
    return {key: np.stack([np.asarray(item[key]) for item in items]) for key in items[0]}


def causal_lm_inputs(blocks) -> dict:
    """Token blocks (rows of T+1 tokens) as a language model's keyword arguments: input_ids, the first T tokens, and
    targets, the T tokens that follow each (views: no copy of a memory-mapped file)."""
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise ValueError(f"language-model data must be blocks of at least 2 tokens (rows, T+1), got shape "
                         f"{tuple(blocks.shape)}")
    return {"input_ids": blocks[:, :-1], "targets": blocks[:, 1:]}


def model_inputs(data, examples: str) -> dict:
    """A dataset of a head's `examples` as that model's keyword arguments: token blocks of T+1 become input_ids and
    targets (causal_lm_inputs), labelled rows stay their columns."""
    columns = as_columns(data)
    return causal_lm_inputs(columns["input_ids"]) if examples == "token_blocks" else columns


class StepLoader:
    """Deterministic, resumable, rank-sliced batches; one item = the micro-batches of one optimizer step."""

    def __init__(self, data, batch_size: int, micro_batches: int = 1, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False):
        if batch_size < 1 or micro_batches < 1:
            raise ValueError(f"batch_size and micro_batches must be >= 1, got {batch_size} and {micro_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.columns = as_columns(data)
        self.num_rows = len(next(iter(self.columns.values())))
        self.batch_size = batch_size
        self.micro_batches = micro_batches
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        rows_per_step = batch_size * micro_batches * world_size
        self.steps_per_epoch = self.num_rows // rows_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {self.num_rows} rows, fewer than one step needs "
                             f"(batch_size {batch_size} x accumulation {micro_batches} x data-parallel "
                             f"ranks {world_size} = {rows_per_step}); lower the batch size or add data")
        self.epoch = 0
        self.step_in_epoch = 0
        self._order = None

    # ---- order ----
    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This rank's row indices for `epoch`, in reading order."""
        if self.shuffle:
            order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        used = self.steps_per_epoch * self.batch_size * self.micro_batches * self.world_size
        return order[:used][self.rank::self.world_size]

    # ---- iteration ----
    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            self._order = None
        if self._order is None:
            self._order = self.epoch_rows(self.epoch)
        rows_per_step = self.batch_size * self.micro_batches
        start = self.step_in_epoch * rows_per_step
        rows = self._order[start:start + rows_per_step]
        self.step_in_epoch += 1
        return [self._gather(rows[i:i + self.batch_size]) for i in range(0, rows_per_step, self.batch_size)]

    def _gather(self, rows: np.ndarray) -> dict:
        # sorted reads are kinder to a memory-mapped file; the permutation inside a batch is kept
        batch = {}
        for name, column in self.columns.items():
            values = np.asarray(column[np.sort(rows)])[np.argsort(np.argsort(rows))]
            tensor = torch.from_numpy(values.astype(np.int64, copy=False))
            batch[name] = tensor.pin_memory() if self.pin_memory else tensor
        return batch

    # ---- resume ----
    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, step_in_epoch=self.step_in_epoch, seed=self.seed, shuffle=self.shuffle,
                    num_rows=self.num_rows, batch_size=self.batch_size, micro_batches=self.micro_batches,
                    world_size=self.world_size)

    def load_state_dict(self, state: dict):
        """Continue where a checkpoint stopped. The layout may change (say 2-way tensor parallel -> 2-way
        data parallel with half the rows per rank): what must match is the rows one optimizer step reads
        in all, since the ranks' slices of a step together are the step's rows of the epoch order."""
        for key in ("num_rows", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"the checkpoint's data position was saved with {key}={state.get(key)} but this "
                                 f"run has {key}={getattr(self, key)}; resume with the same data and batch settings")
        saved = state["batch_size"] * state["micro_batches"] * state["world_size"]
        ours = self.batch_size * self.micro_batches * self.world_size
        if saved != ours:
            raise ValueError(f"the checkpoint was saved with {saved} rows per optimizer step (batch_size "
                             f"{state['batch_size']} x accumulation {state['micro_batches']} x data-parallel ranks "
                             f"{state['world_size']}) but this run reads {ours}: keep the global batch the same")
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self._order = None

    def seek(self, step: int):
        """Position the loader as if `step` optimizer steps had been read."""
        self.epoch, self.step_in_epoch = divmod(step, self.steps_per_epoch)
        self._order = None

