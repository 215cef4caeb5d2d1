from __future__ import annotations

import gc

from transforms import heap


def test_freeze_puts_live_objects_out_of_the_collectors_reach_and_unfreeze_gives_them_back() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector can free it

    kept = [Node() for _ in range(1000)]
    collected = lambda: {id(o) for o in gc.get_objects()}  # noqa: E731  (frozen objects are not listed)
    try:
        heap.freeze(collect=True)
        assert gc.get_freeze_count() >= 1000 and id(kept[0]) not in collected()
        later = Node()
        assert id(later) in collected()
        heap.freeze(collect=False)  # again: what was built since joins them
        assert id(later) not in collected()
    finally:
        heap.unfreeze()
    assert gc.get_freeze_count() == 0 and id(kept[0]) in collected()


def test_a_cycle_that_became_garbage_before_the_freeze_is_collected_not_frozen() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    import weakref

    node = Node()
    ref = weakref.ref(node)
    del node  # unreachable, but alive until a collection finds the cycle
    try:
        heap.freeze(collect=True)
        assert ref() is None
    finally:
        heap.unfreeze()
