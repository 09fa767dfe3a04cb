"""One packed upload and one waited-for download per inference pass (srl.workers.staging)."""
import numpy as np
import pytest
import torch

from srl.workers.staging import StagedArrays

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


def test_an_upload_does_not_alias_the_buffer_the_next_pass_overwrites():
    staged = StagedArrays()
    first = staged.upload([np.arange(6, dtype=np.int64)], "cpu")[0]
    staged.upload([np.full(6, -1, dtype=np.int64)], "cpu")
    assert first.tolist() == list(range(6))
