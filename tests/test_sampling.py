"""The one batch order of the trainers (rag_jax.data.sampling.epoch_rows, read by the RAG,
retriever and closed-book trainers), checked by its properties: each epoch a permutation with
the remainder dropped, a pure function of (seed, step)."""

import numpy as np
import pytest

from rag_jax.data.sampling import epoch_rows


def test_each_epoch_reads_every_row_once_but_the_remainder():
  n, batch = 23, 5  # 4 batches per epoch, 3 rows dropped each epoch
  epochs = []
  for epoch in range(3):
    rows = np.concatenate([epoch_rows(7, 4 * epoch + i, n, batch) for i in range(4)])
    assert rows.shape == (20,) and len(set(rows.tolist())) == 20 and rows.max() < n
    epochs.append(rows)
  assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled per epoch
  # A pure function of (seed, step): asked out of order, or again, it gives the same rows.
  np.testing.assert_array_equal(epoch_rows(7, 9, n, batch), epochs[2][5:10])
  assert not np.array_equal(epoch_rows(8, 0, n, batch), epochs[0][:5])


def test_fewer_examples_than_a_batch_are_refused():
  with pytest.raises(ValueError, match="3 training examples < batch_size 4"):
    epoch_rows(0, 0, 3, 4)
