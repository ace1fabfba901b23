import numpy as np
import pytest

from evaluation_container.data import Event, generate_events
from evaluation_container.data import format as fmt
from evaluation_container.pipeline import (
    BatchSource,
    EventTable,
    epoch_rng,
    padded_fraction,
    padded_length,
    plan_batches,
    split_train_val,
)

MAX_PADDING = 0.15  # the target share of padding among processed elements


def _events_of_sizes(sizes) -> list[Event]:
    """Events whose rows are numbered (column 1 = event id, column 2 = row), so reshuffles are visible."""
    events = []
    for index, size in enumerate(sizes):
        x = np.zeros((size, fmt.N_X_COLUMNS), np.float32)
        x[:, fmt.X_TYPE] = fmt.TYPE_TRACK
        x[:, 1] = index
        x[:, 2] = np.arange(size)
        y = np.zeros((size, fmt.N_Y_COLUMNS), np.float32)
        y[:, fmt.Y_PT] = index
        events.append(Event(X=x, ygen=y, ycand=y))
    return events


def test_table_keeps_events_and_subset_picks_them_in_order():
    events = _events_of_sizes([3, 5, 2, 7])
    table = EventTable.from_events(events)
    assert list(table.sizes) == [3, 5, 2, 7]
    picked = table.subset(np.array([3, 0]))
    assert list(picked.sizes) == [7, 3]
    assert np.array_equal(picked.X[:7], events[3].X)
    assert np.array_equal(picked.X[7:], events[0].X)
    assert np.array_equal(picked.y[7:], events[0].ygen)


def test_split_is_fixed_disjoint_and_complete():
    table = EventTable.from_events(_events_of_sizes(range(1, 51)))
    train, val = split_train_val(table, 0.2)
    again_train, _ = split_train_val(table, 0.2)
    assert (len(train), len(val)) == (40, 10)
    assert np.array_equal(train.X, again_train.X)
    ids = np.concatenate([np.unique(train.X[:, 1]), np.unique(val.X[:, 1])])
    assert sorted(ids) == list(range(50))


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_split_refuses_fractions_leaving_a_side_empty(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(EventTable.from_events(_events_of_sizes([3, 4, 5])), fraction)


def test_one_event_cannot_be_split():
    with pytest.raises(ValueError, match="at least 2"):
        split_train_val(EventTable.from_events(_events_of_sizes([3])), 0.5)


def test_plan_uses_every_event_once_depends_on_seed_and_epoch_only():
    sizes = np.random.default_rng(1).integers(10, 500, size=103)
    plan = plan_batches(sizes, 4, epoch_rng(7, 1))
    assert sorted(np.concatenate(plan)) == list(range(103))
    assert max(len(batch) for batch in plan) == 4
    assert len(plan) == 26
    replay = plan_batches(sizes, 4, epoch_rng(7, 1))
    assert all(np.array_equal(a, b) for a, b in zip(plan, replay, strict=True))
    next_epoch = plan_batches(sizes, 4, epoch_rng(7, 2))
    assert not all(np.array_equal(a, b) for a, b in zip(plan, next_epoch, strict=True))


def test_bucketing_keeps_padding_below_target_on_real_size_events():
    """Real events hold ~5–6k elements; sizes spread widely between events of one sample."""
    sizes = np.random.default_rng(2).integers(1000, 6500, size=400)
    for bin_size in (8, 32, 64, 128):
        plan = plan_batches(sizes, 4, epoch_rng(0, 1))
        bucketed = padded_fraction(sizes, plan, bin_size)
        naive = padded_fraction(sizes, np.split(np.arange(400), 100), bin_size)
        assert bucketed < MAX_PADDING, (bin_size, bucketed)
        assert bucketed < naive / 3, (bin_size, bucketed, naive)


def test_bucketing_keeps_padding_below_target_on_toy_events_with_small_bins():
    sizes = np.random.default_rng(3).integers(100, 401, size=100)
    for bin_size in (8, 16, 32):
        assert padded_fraction(sizes, plan_batches(sizes, 4, epoch_rng(0, 1)), bin_size) < MAX_PADDING


def test_padded_fraction_counts_padding_of_the_whole_batch():
    sizes = np.array([10, 20, 30])
    # batch 1: two events padded to 32 (64 processed, 30 real); batch 2: one event of 30 padded to 32
    assert padded_fraction(sizes, [np.array([0, 1]), np.array([2])], 16) == pytest.approx(1 - 60 / 96)
    assert padded_length(33, 16) == 48
    assert padded_length(32, 16) == 32


def test_dataset_pads_each_batch_to_a_bin_multiple_of_its_longest_event():
    events = _events_of_sizes([5, 17, 9, 40, 33, 2])
    table = EventTable.from_events(events)
    plan = [np.array([1, 2]), np.array([3, 4, 0]), np.array([5])]
    batches = list(BatchSource(table, bin_size=8).dataset(plan))
    assert [tuple(x.shape) for x, _, _ in batches] == [(2, 24, 12), (3, 40, 12), (1, 8, 12)]
    for (x, y, mask), ids in zip(batches, plan, strict=True):
        for row, event_id in enumerate(ids):
            n = len(events[event_id])
            assert np.array_equal(x[row, :n].numpy(), events[event_id].X)
            assert np.array_equal(y[row, :n].numpy(), events[event_id].ygen)
            assert mask[row].numpy().sum() == n and mask[row, :n].numpy().all()
            assert not x[row, n:].numpy().any()


def test_dataset_of_generated_events_matches_the_table():
    events = generate_events(np.random.default_rng(5), 6, 20, 70)
    table = EventTable.from_events(events)
    plan = plan_batches(table.sizes, 3)
    masks = [mask.numpy() for _, _, mask in BatchSource(table, 16).dataset(plan)]
    assert sum(int(mask.sum()) for mask in masks) == table.n_elements
    assert all(mask.shape[1] % 16 == 0 for mask in masks)
