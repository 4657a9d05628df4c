"""How STDiT3's work is shared between ranks (models/stdit3_parallel.py): the splits, the per-rank
state and token counts. The chains themselves run across real ranks in tests/test_parallel.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_sora.models.stdit3 import STDiT3, STDiT3Config
from mlx_sora.models.stdit3_layers import CaptionKeys
from mlx_sora.models.stdit3_parallel import SequenceSplit, cfg_units, sequence_split_for, sequence_tokens, state_rows


def test_split_is_contiguous_and_as_even_as_possible():
    split = SequenceSplit.of(frames=20, positions=256, ranks=3)
    assert split.frames == ((0, 7), (7, 14), (14, 20))
    assert split.positions == ((0, 86), (86, 171), (171, 256))
    assert SequenceSplit.of(5, 16, 2).frames == ((0, 3), (3, 5))


@pytest.mark.parametrize("frames, ranks, expected", [
    (5, 2, ((0, 2), (2, 5))),            # the odd last frame stays with the last pair (TDTM's unmerge reuses it)
    (20, 3, ((0, 8), (8, 14), (14, 20))),
    (7, 3, ((0, 2), (2, 4), (4, 7))),
])
def test_tdtm_split_never_separates_a_pair(frames, ranks, expected):
    split = SequenceSplit.of(frames, 16, ranks, pairs=True)
    assert split.frames == expected
    assert all(start % 2 == 0 for start, _ in split.frames)
    assert split.frames[-1][1] == frames


@pytest.mark.parametrize("frames, positions, ranks, pairs, message", [
    (1, 16, 2, False, "1 latent frames cannot be split over 2 ranks"),
    (5, 16, 3, True, "2 TDTM pairs, too few for 3 ranks"),
    (8, 1, 2, False, "1 patch positions per frame"),
])
def test_split_refuses_what_cannot_be_shared(frames, positions, ranks, pairs, message):
    with pytest.raises(ValueError, match=message):
        SequenceSplit.of(frames, positions, ranks, pairs)


def test_tokens_per_rank_follow_the_latent_grid():
    model = STDiT3(STDiT3Config(depth=1, hidden_size=64, num_heads=4, caption_channels=32))
    # 68 frames at 256x256: latent 20x32x32 -> 20 frames of 16x16 = 256 patch positions
    assert sequence_split_for(model, (20, 32, 32), 2, merge=False).positions == ((0, 128), (128, 256))
    assert sequence_tokens(model, (20, 32, 32), 2) == 10 * 256
    assert sequence_tokens(model, (20, 32, 32), 3) == 7 * 256  # 7 frames x 256 > 20 x 86
    assert sequence_tokens(model, (5, 8, 8), 2, merge=True) == 3 * 16


def test_state_rows_keep_each_samples_state():
    b, c, length = 4, 8, 5
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]] * 2, dtype=bool)
    keys = CaptionKeys.from_mask(mask)
    from mlx_sora.models.stdit3 import STDiT3State

    state = STDiT3State(t=mx.arange(b * c).reshape(b, c), t_mlp=mx.arange(b * 6 * c).reshape(b, 6 * c),
                        y=mx.arange(b * length * c).reshape(b, length, c), key_mask=keys,
                        x_mask=mx.array([[True, False]] * b), grid=(2, 4, 4), input_size=(2, 8, 8))
    half = state_rows(state, slice(2, 4))
    for name in ("t", "t_mlp", "y", "x_mask"):
        assert np.array_equal(np.array(getattr(half, name)), np.array(getattr(state, name))[2:4])
    assert np.array_equal(np.array(half.key_mask.mask), np.array(keys.mask)[2:4])
    assert half.key_mask.index is keys.index and half.grid == state.grid and half.t0 is None


def test_cfg_split_needs_two_ranks():
    class Three:
        rank, size = 0, 3

    model = STDiT3(STDiT3Config(depth=1, hidden_size=64, num_heads=4, caption_channels=32))
    with pytest.raises(ValueError, match="exactly 2 ranks"):
        cfg_units(model, Three())
    names = [u.name for u in cfg_units(model, type("Two", (), {"rank": 1, "size": 2})())]
    assert names == [u.name for u in model.units]  # the same units: streaming runs them alike
