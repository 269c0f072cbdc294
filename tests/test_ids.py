import numpy as np

from curation.ingest.ids import make_uid, sorted_uid_array, u128_to_uids, uids_to_u128


def test_uid_is_stable_128_bit_hex_and_unambiguous():
    u = make_uid("emoji", "emoji-00000", "000001")
    assert u == make_uid("emoji", "emoji-00000", "000001")
    assert len(u) == 32 and int(u, 16) >= 0
    # length-prefixed parts: moving a boundary changes the id
    assert make_uid("ab", "c", "d") != make_uid("a", "bc", "d")
    assert make_uid("emoji", "emoji-00000", "000002") != u


def test_u128_round_trip_and_datacomp_sort_order():
    uids = [make_uid("d", "s", str(i)) for i in range(50)]
    arr = uids_to_u128(uids)
    assert arr.dtype == np.uint64 and arr.shape == (50, 2)
    assert u128_to_uids(arr) == uids
    s = sorted_uid_array(uids)
    assert u128_to_uids(s) == sorted(uids)  # lexicographic hex order == (hi, lo) order
    assert sorted_uid_array([]).shape == (0, 2)
