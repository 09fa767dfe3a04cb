"""One packed upload and one waited-for download per inference pass (srl.workers.staging)."""
import numpy as np
import pytest
import torch

from srl.workers.staging import StagedArrays, pack, packed_size, unpack

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_arrays_of_mixed_dtypes_and_odd_sizes_arrive_intact_pass_after_pass(device):
    rng = np.random.default_rng(0)
    staged = StagedArrays()
    for n in (3, 17, 1, 40):  # the buffer grows and is reused
        arrays = [rng.integers(0, 10**9, n).astype(np.int64), rng.integers(0, 255, (n, 1, 5, 7), dtype=np.uint8),
                  rng.integers(0, n, 0).astype(np.int64), rng.normal(size=(n, 3)).astype(np.float32),
                  rng.integers(0, 255, (n, 4, 5, 7), dtype=np.uint8)[:, ::2]]  # not contiguous
        moved = staged.upload(arrays, device)
        for a, t in zip(arrays, moved):
            assert t.device.type == device and t.dtype == torch.from_numpy(np.empty(0, a.dtype)).dtype
            np.testing.assert_array_equal(t.cpu().numpy(), a)
        back = staged.download([moved[0] * 2, moved[3] + 1])
        np.testing.assert_array_equal(back[0], arrays[0] * 2)
        np.testing.assert_allclose(back[1], arrays[3] + 1)


def test_packing_aligns_mixed_dtypes_and_views_them_back():
    """The CUDA path's packing, checked on the CPU (the GPU test above runs it end to end)."""
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 255, 5, dtype=np.uint8), rng.integers(-9, 9, 3).astype(np.int64),
              rng.normal(size=(2, 3)).astype(np.float32), rng.integers(0, 255, (4, 6), dtype=np.uint8)[:, ::2]]
    buffer = torch.zeros(packed_size(arrays), dtype=torch.uint8)
    offsets = pack(arrays, buffer)
    assert all(at % 8 == 0 for at in offsets) and offsets == sorted(offsets)
    for a, t in zip(arrays, unpack(buffer, arrays, offsets)):
        np.testing.assert_array_equal(t.numpy(), a)
    arrays[1][0] += 1  # the buffer holds copies, not views of the inputs
    assert unpack(buffer, arrays, offsets)[1][0].item() == arrays[1][0] - 1
