"""Datasets users hand to harness.Trainer(data=...): batched, ordered and resumed by the harness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.data import BatchShape, TrainBatches
from harness.data.batch import collate
from harness.data.user import DatasetSequences, IterableSequences, user_sequences
from harness.errors import HarnessError


class Counting:
    """Item i is [i, i+1, ..., i+4]: which item landed where is readable from the batch."""

    def __init__(self, n: int = 40) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> list[int]:
        return list(range(i, i + 5))


def _firsts(batches: list[torch.Tensor]) -> list[int]:
    return [int(row[0]) for batch in batches for row in batch]


def test_a_map_style_dataset_is_shuffled_by_the_seed_and_split_across_ranks_like_a_corpus():
    sequences = user_sequences(Counting())
    assert isinstance(sequences, DatasetSequences) and sequences.seq_len == 4
    one = TrainBatches(sequences, 0, BatchShape(2, 2, 1), rank=0)
    ranks = [TrainBatches(sequences, 0, BatchShape(2, 1, 2), rank=r) for r in (0, 1)]
    for step in (1, 2, 9):
        whole = _firsts(one.micro_batches(step))
        assert sorted(whole) == sorted(_firsts(ranks[0].micro_batches(step)) + _firsts(ranks[1].micro_batches(step)))
    assert _firsts(one.micro_batches(1)) != [0, 1, 2, 3]  # shuffled
    # A resume after step 3 continues with the very batches an uninterrupted run sees.
    resumed = TrainBatches(sequences, 0, BatchShape(2, 2, 1), rank=0, start_step=3, start_offset=one.consumed_after(3))
    assert _firsts(resumed.micro_batches(4)) == _firsts(one.micro_batches(4))


def test_an_iterable_is_read_in_its_own_order_epoch_after_epoch_and_after_a_restart():
    stream = user_sequences(_Stream(6))
    assert isinstance(stream, IterableSequences)
    batches = TrainBatches(stream, 0, BatchShape(2, 1, 2), rank=1)
    assert _firsts(batches.micro_batches(1)) == [2, 3]
    assert _firsts(batches.micro_batches(2)) == [0, 1]  # positions 6, 7: the second epoch
    assert _firsts(batches.micro_batches(1)) == [2, 3]  # asked again (a rollback): read from the start


class _Stream:
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter([list(range(i, i + 5)) for i in range(self.n)])


def test_dict_items_keep_their_labels_and_pad_nothing():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5, 6], "labels": [4, 5, 6]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, 5, 6]]
    assert collate([{"input_ids": [1, 2]}])["labels"].tolist() == [[1, 2]]
    sequences = DatasetSequences([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 4)
    assert sequences.seq_len == 3  # dicts: the model sees every input id
    assert sequences.batch(np.array([0, 1]))["input_ids"].dtype == torch.int64


@pytest.mark.parametrize("data, message", [
    ([[1, 2, 3], [1, 2]], "the same length"),
    ([{"ids": [1, 2]}], "without input_ids"),
    ([], "is empty"),
    (42, "takes a dataset"),
])
def test_bad_datasets_are_one_line(data, message):
    with pytest.raises(HarnessError, match=message) as caught:
        sequences = user_sequences(data)
        sequences.batch(np.arange(len(data)))
    assert "\n" not in str(caught.value)
