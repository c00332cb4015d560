import pytest
import torch

from pqd.core.packing import pack_int4, unpack_int4


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1001])
def test_round_trip(n):
    g = torch.Generator().manual_seed(n)
    q = torch.randint(-8, 8, (n,), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_int4(packed, n), q)


def test_byte_layout():
    # -1 -> 0xF in the low nibble, 7 -> 0x7 in the high nibble
    assert pack_int4(torch.tensor([-1, 7], dtype=torch.int8)).tolist() == [0x7F]
    assert pack_int4(torch.tensor([-8, 0, 3], dtype=torch.int8)).tolist() == [0x08, 0x03]


def test_multidim_round_trip():
    q = torch.randint(-8, 8, (4, 3, 3, 3), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q), q.numel()).reshape(q.shape), q)


def test_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8], dtype=torch.int8))


def test_rejects_wrong_length():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 10)
