"""STDiT3 evaluated by several ranks at once: the halves of the CFG batch, or its tokens split.

Both are chains of units with the model's own unit names and weight prefixes (``model.units``), so
``run_units`` and CI-DL's ``StreamingWeights`` run them exactly as they run the model itself; only
what a unit computes on this rank, and what it exchanges, differs.

``cfg_units``: two ranks, rank 0 the conditional rows of the CFG batch ``[z, z]``, rank 1 the
unconditional ones. The embedders run on the whole batch on both ranks, as in one process, and each
keeps its half (they are a small share of the work; the blocks' products then see the same numbers
as in one process, whereas BLAS libraries may round a tiny product of 2B rows differently from one
of B rows: MKL does for the timestep MLP). The final layer's velocities of both halves are gathered
with one ``all_gather`` per evaluation.

``sequence_units``: R ranks share the tokens ``[B, T, S, C]`` of every block, as the sequence
parallelism of Open-Sora's later releases (DSP) does. A spatial block attends within each frame, so
it runs on a range of frames (all positions); a temporal block attends along time at each position,
so it runs on a range of positions (all frames); cross-attention, the MLP, norms and modulation act
on each token alone and run in either layout. An all-to-all switches the layout before each
temporal block and back after it: two per block unit, each moving (R-1)/R of a rank's tokens.
With TDTM (``merge``), frames are split between pairs, so that a merged pair never straddles two
ranks (the odd last frame stays with the last pair, as the merge rule needs).
Every rank embeds only its own frames (patches are per frame: ``patch_size[0]`` token-grid frames),
and the final layer's velocities of all frames are gathered on every rank (small: latent-sized).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import mlx.core as mx

from .stdit3 import STDiT3, STDiT3State
from .stdit3_layers import CaptionKeys
from .units import Unit


class Exchange(Protocol):
    """The collectives these chains need (``mlx_sora.runtime.distributed.RankGroup``)."""

    rank: int
    size: int

    def all_to_all(self, blocks: Sequence[mx.array], block_shape: Callable[[int, int], tuple[int, ...]],
                   what: str) -> list[mx.array]: ...

    def all_gather_rows(self, x: mx.array, rows: Sequence[int], what: str) -> list[mx.array]: ...


def _rows(a: mx.array | None, rows: slice) -> mx.array | None:
    return None if a is None else a[rows]


def state_rows(state: STDiT3State, rows: slice) -> STDiT3State:
    """The state of the samples ``rows`` of the batch."""
    keys = state.key_mask
    if keys is not None and keys.mask is not None:
        keys = CaptionKeys(keys.index, keys.mask[rows])
    return dataclasses.replace(state, t=state.t[rows], t_mlp=state.t_mlp[rows], y=state.y[rows], key_mask=keys,
                               x_mask=_rows(state.x_mask, rows), t0=_rows(state.t0, rows),
                               t0_mlp=_rows(state.t0_mlp, rows))


# ---------------------------------------------------------------- CFG halves


def cfg_units(model: STDiT3, exchange: Exchange) -> tuple[Unit, ...]:
    """The chain of rank ``exchange.rank`` (0: conditional, 1: unconditional half) of two; it takes
    the model's inputs for the whole CFG batch and returns the whole batch's velocity, its first
    ``in_channels`` channels (all the sampler reads; the learned sigma is not gathered)."""
    if exchange.size != 2:
        raise ValueError(f"the CFG split runs on exactly 2 ranks, not {exchange.size}")
    channels = model.config.in_channels

    def embed(inputs: dict[str, Any]) -> tuple[mx.array, STDiT3State]:
        tokens, state = model.prepare(**inputs)
        half = tokens.shape[0] // 2
        rows = slice(exchange.rank * half, (exchange.rank + 1) * half)
        return tokens[rows], state_rows(state, rows)

    def finish(carry: tuple[mx.array, STDiT3State]) -> mx.array:
        velocity = model.finalize(*carry)[:, :channels]
        halves = exchange.all_gather_rows(velocity, [velocity.shape[0]] * 2, "gathering the CFG halves' velocities")
        return mx.concatenate(halves, axis=0)

    first, *blocks, last = model.units
    return (Unit(first.name, first.paths, embed), *blocks, Unit(last.name, last.paths, finish))


# ---------------------------------------------------------------- sequence split


def _even(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def _ranges(sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return tuple(out)


@dataclass(frozen=True)
class SequenceSplit:
    """Which tokens of ``[B, T, S, C]`` each rank holds: a range of token-grid frames in a spatial
    block, a range of patch positions in a temporal block."""

    frames: tuple[tuple[int, int], ...]
    positions: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, frames: int, positions: int, ranks: int, pairs: bool = False) -> "SequenceSplit":
        """Contiguous, as even as possible; with ``pairs`` (TDTM) the frames go by pairs, the odd
        last frame with the last pair."""
        if positions < ranks:
            raise ValueError(f"{positions} patch positions per frame cannot be split over {ranks} ranks")
        if pairs:
            if frames // 2 < ranks:
                raise ValueError(f"{frames} latent frames are {frames // 2} TDTM pairs, too few for {ranks} ranks "
                                 "(each needs a pair)")
            sizes = [2 * n for n in _even(frames // 2, ranks)]
            sizes[-1] += frames % 2
        else:
            if frames < ranks:
                raise ValueError(f"{frames} latent frames cannot be split over {ranks} ranks")
            sizes = _even(frames, ranks)
        return cls(_ranges(sizes), _ranges(_even(positions, ranks)))

    @property
    def ranks(self) -> int:
        return len(self.frames)

    def frame_count(self, rank: int) -> int:
        start, end = self.frames[rank]
        return end - start

    def position_count(self, rank: int) -> int:
        start, end = self.positions[rank]
        return end - start


def sequence_split_for(model: STDiT3, latent_size: tuple[int, int, int], ranks: int, merge: bool) -> SequenceSplit:
    """The split of a latent ``(T, H, W)`` (raises ValueError when it cannot be split that way)."""
    n_t, n_h, n_w = (-(-n // p) for n, p in zip(latent_size, model.config.patch_size))
    return SequenceSplit.of(n_t, n_h * n_w, ranks, pairs=merge and n_t >= 2)


@dataclass
class SequenceCarry:
    """What flows between the units of ``sequence_units`` on one rank."""

    tokens: mx.array
    """This rank's frames [B, F_r, S, C] (between units, the layout of a spatial block)."""
    state: STDiT3State
    """The state of its frames (x_mask: its frames)."""
    split: SequenceSplit
    x_mask: mx.array | None
    """Every token-grid frame's flag [B, T], for the temporal blocks."""
    latent_frames: int
    """Of the whole latent."""

    def arrays(self) -> list[mx.array]:
        return [self.tokens, *self.state.arrays(), *([self.x_mask] if self.x_mask is not None else [])]


def sequence_units(model: STDiT3, exchange: Exchange) -> tuple[Unit, ...]:
    """The chain of rank ``exchange.rank`` of R sharing the tokens; it takes the model's inputs for
    the whole batch and returns the whole batch's velocity, its first ``in_channels`` channels."""
    rank, size = exchange.rank, exchange.size
    config = model.config
    pt = config.patch_size[0]

    def embed(inputs: dict[str, Any]) -> SequenceCarry:
        x, x_mask = inputs["x"], inputs.get("x_mask")
        frames = x.shape[2]
        split = sequence_split_for(model, tuple(x.shape[2:]), size, bool(inputs.get("merge")))
        start, end = split.frames[rank]
        latent = slice(start * pt, min(end * pt, frames))
        mine = dict(inputs, x=x[:, :, latent], x_mask=None if x_mask is None else mx.array(x_mask)[:, latent])
        tokens, state = model.prepare(**mine)
        full_mask = None
        if x_mask is not None:
            full_mask = mx.array(x_mask).astype(mx.bool_)
            grid_frames = split.frames[-1][1]
            if grid_frames != frames:
                full_mask = mx.pad(full_mask, [(0, 0), (0, grid_frames - frames)], constant_values=True)
        return SequenceCarry(tokens, state, split, full_mask, frames)

    def to_positions(x: mx.array, split: SequenceSplit, what: str) -> mx.array:
        b, _, _, c = x.shape
        blocks = [x[:, :, p0:p1] for p0, p1 in split.positions]
        received = exchange.all_to_all(
            blocks, lambda o, d: (b, split.frame_count(o), split.position_count(d), c), what)
        return mx.concatenate(received, axis=1)

    def to_frames(x: mx.array, split: SequenceSplit, what: str) -> mx.array:
        b, _, _, c = x.shape
        blocks = [x[:, f0:f1] for f0, f1 in split.frames]
        received = exchange.all_to_all(
            blocks, lambda o, d: (b, split.frame_count(d), split.position_count(o), c), what)
        return mx.concatenate(received, axis=2)

    def block(index: int, carry: SequenceCarry) -> SequenceCarry:
        s, split = carry.state, carry.split
        spatial, temporal = model.spatial_blocks[index], model.temporal_blocks[index]
        x = spatial(carry.tokens, s.y, s.t_mlp, s.key_mask, s.x_mask, s.t0_mlp, s.merge)
        x = to_positions(x, split, f"block {index}: exchanging frames for positions")
        x = temporal(x, s.y, s.t_mlp, s.key_mask, carry.x_mask, s.t0_mlp, s.merge)
        x = to_frames(x, split, f"block {index}: exchanging positions for frames")
        return dataclasses.replace(carry, tokens=x)

    def finish(carry: SequenceCarry) -> mx.array:
        velocity = model.finalize(carry.tokens, carry.state)[:, : config.in_channels]  # [B, C, t_r, H, W]
        counts = [min(f1 * pt, carry.latent_frames) - f0 * pt for f0, f1 in carry.split.frames]
        pieces = exchange.all_gather_rows(velocity.transpose(2, 0, 1, 3, 4), counts, "gathering the velocities of all frames")
        return mx.concatenate(pieces, axis=0).transpose(1, 2, 0, 3, 4)

    first, *blocks, last = model.units
    chain = [Unit(first.name, first.paths, embed)]
    chain += [Unit(unit.name, unit.paths, lambda carry, i=i: block(i, carry)) for i, unit in enumerate(blocks)]
    return (*chain, Unit(last.name, last.paths, finish))


def sequence_tokens(model: STDiT3, latent_size: tuple[int, int, int], ranks: int, merge: bool = False) -> int:
    """The most tokens of one sample any rank holds in a block (either layout)."""
    split = sequence_split_for(model, latent_size, ranks, merge)
    n_t = split.frames[-1][1]
    n_s = split.positions[-1][1]
    return max(max(split.frame_count(r) * n_s, n_t * split.position_count(r)) for r in range(ranks))


__all__ = ["Exchange", "SequenceCarry", "SequenceSplit", "cfg_units", "sequence_split_for", "sequence_tokens",
           "sequence_units", "state_rows"]
