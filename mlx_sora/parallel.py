"""One request across several ranks: ``mx.distributed`` with one rank per Mac, started by ``mlx.launch``.

    mlx.launch --backend ring --hosts 10.0.0.1,10.0.0.2 -- python -m mlx_sora.generate --prompt "..." --parallel cfg
    pipe = Pipeline.from_pretrained(group=mx.distributed.init(), parallel="sequence")   # on every rank

Modes (``PARALLEL_MODES``):

* ``data``: the seeds of the request are shared out, each rank denoising and decoding whole seeds
  (all prompts of a seed are one batch, as in one process, so its videos are bit for bit the ones
  one process makes); each rank writes its own videos.
* ``cfg``: two ranks, one per half of the classifier-free-guidance batch (conditional, unconditional);
  one ``all_gather`` of the velocities per model evaluation (``models/stdit3_parallel.cfg_units``).
* ``sequence``: R ranks share STDiT3's tokens, frames in spatial blocks and positions in temporal
  blocks, an all-to-all between them (``models/stdit3_parallel.sequence_units``): each rank holds
  ~1/R of the activations, and the memory plan is made per rank.

What each rank runs and loads (CI-DL plans per rank, ``planning.RankShare``): the text encoder runs
on rank 0 only, on the whole request as one process does, and its output goes around the ring to
the others (4.9 MB per prompt for T5-XXL in float32; the other ranks never load T5). In ``data`` mode
each rank decodes its own seeds. In ``cfg`` and ``sequence`` mode every rank ends the denoising with
the whole latent, and the decoding is split where it pays: the VAE decodes independent temporal
chunks (17 frames each), so each rank decodes a contiguous range of chunks and sends its frames to
rank 0, which writes the videos; a video of one chunk (up to 17 frames) is decoded by rank 0 alone.

Failures: every collective is watched (``runtime/distributed.py``); a rank that fails, is killed or
hangs ends the job on every rank with a message, and the videos are only renamed into place once
every rank has its videos staged (``write_videos``), so a failed job leaves none.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import mlx.core as mx
import numpy as np

from .errors import UserError
from .models.stdit3_parallel import cfg_units, sequence_split_for, sequence_units
from .planning import PlannedPhase, RankShare
from .request import GenerationRequest
from .runtime.distributed import (
    DEFAULT_TIMEOUT,
    RankGroup,
    as_rank_failure,
    init_group,
    stop_on_termination,
    watchdog,
)
from .runtime.memory import PhaseReport, measure_phase

if TYPE_CHECKING:
    from .pipeline import GenerationResult, Pipeline

PARALLEL_MODES = ("data", "cfg", "sequence")


def _even_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    sizes = [n // parts + (i < n % parts) for i in range(parts)]
    starts = np.cumsum([0, *sizes]).tolist()
    return [(starts[i], starts[i + 1]) for i in range(parts)]


# ---------------------------------------------------------------- reports


@dataclass
class RankReport:
    """What one rank did: its seeds, phases and the bytes it sent."""

    rank: int
    host: str
    seeds: list[int]
    phases: list[dict] = field(default_factory=list)
    """Per phase: name, seconds, peak_memory, max_rss, bytes_sent."""
    evaluations: int = 0
    denoise_seconds: float = 0.0
    """Seconds of the model evaluations (the sampler's steps), all seeds."""

    @property
    def seconds_per_step(self) -> float:
        return self.denoise_seconds / max(1, self.evaluations)

    @property
    def bytes_per_step(self) -> float:
        sent = sum(p["bytes_sent"] for p in self.phases if p["name"] == "denoising")
        return sent / max(1, self.evaluations)

    def summary(self) -> str:
        phases = ", ".join(f"{p['name']} {p['seconds']:.2f} s" for p in self.phases)
        peak = max((p["peak_memory"] for p in self.phases), default=0)
        rss = max((p["max_rss"] for p in self.phases), default=0)
        sent = sum(p["bytes_sent"] for p in self.phases)
        steps = (f"; {self.evaluations} evaluations, {self.seconds_per_step:.2f} s/step, "
                 f"{_size(self.bytes_per_step)} sent/step") if self.evaluations else ""
        seeds = f"seeds {' '.join(map(str, self.seeds))}" if self.seeds else "no seeds"
        return (f"rank {self.rank} ({self.host}, {seeds}): {phases}{steps}; peak MLX {_size(peak)}, "
                f"max RSS {_size(rss)}, {_size(sent)} sent")


@dataclass
class JobReport:
    """The merged report of a job across ranks (the same on every rank)."""

    mode: str
    ranks: list[RankReport]

    def summary(self) -> str:
        return "\n".join([f"job across {len(self.ranks)} ranks (--parallel {self.mode}):",
                          *(f"  {r.summary()}" for r in self.ranks)])


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _phase_entry(report: PhaseReport, bytes_sent: int) -> dict:
    return dict(name=report.name, seconds=report.seconds, peak_memory=report.peak_memory, max_rss=report.process_peak,
                bytes_sent=bytes_sent)


# ---------------------------------------------------------------- the job


class ParallelGeneration:
    """What this rank runs of a request, and the collectives between the ranks."""

    def __init__(self, ranks: RankGroup, mode: str = "data"):
        if mode not in PARALLEL_MODES:
            raise UserError(f"--parallel {mode!r} is not a mode; choose one of {', '.join(PARALLEL_MODES)}")
        if mode == "cfg" and ranks.size != 2:
            raise UserError(f"--parallel cfg runs on exactly 2 ranks (the two halves of the guidance batch), "
                            f"not {ranks.size}; use --parallel data or sequence for {ranks.size} ranks")
        self.ranks = ranks
        self.mode = mode

    @classmethod
    def create(cls, group: "mx.distributed.Group | RankGroup | None", mode: str = "data",
               timeout: float = DEFAULT_TIMEOUT) -> "ParallelGeneration | None":
        """None for no group or a group of one (one process: nothing changes)."""
        if group is None:
            return None
        ranks = group if isinstance(group, RankGroup) else RankGroup(group, timeout)
        return cls(ranks, mode) if ranks.size > 1 else None

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def size(self) -> int:
        return self.ranks.size

    # ------------------------------------------------------------ who runs what

    def seeds_of(self, request: GenerationRequest, rank: int) -> tuple[int, ...]:
        """The seeds rank ``rank`` denoises: a contiguous share in ``data`` mode, all otherwise."""
        if self.mode != "data":
            return request.seeds
        start, end = _even_ranges(len(request.seeds), self.size)[rank]
        return request.seeds[start:end]

    def decoded_chunks(self, pipe: "Pipeline", request: GenerationRequest, rank: int) -> tuple[int, int, int] | None:
        """``cfg`` / ``sequence``: the latent frames [start, end) and the video frames rank ``rank``
        decodes (a contiguous range of the VAE's temporal chunks), None when it decodes none."""
        vae = pipe.planner.skeletons["vae"]
        latent_frames = pipe.latent_size(request.num_frames, request.height, request.width)[0]
        chunks = vae.temporal_chunks(latent_frames, request.num_frames)
        start, end = _even_ranges(len(chunks), self.size)[rank]
        if start == end:
            return None
        return chunks[start][0], chunks[end - 1][1], sum(frames for _, _, frames in chunks[start:end])

    def share(self, pipe: "Pipeline", request: GenerationRequest) -> RankShare:
        has_seeds = bool(self.seeds_of(request, self.rank))
        decodes = has_seeds if self.mode == "data" else self.decoded_chunks(pipe, request, self.rank) is not None
        return RankShare(encodes_text=self.rank == 0, cfg_rows=len(request.texts) if self.mode == "cfg" else None,
                         sequence_ranks=self.size if self.mode == "sequence" else 1, denoises=has_seeds,
                         decodes=decodes)

    def check(self, pipe: "Pipeline", request: GenerationRequest) -> list[str]:
        """Raises UserError for a request this mode cannot split; returns notes for the user."""
        notes = []
        if self.mode == "sequence":
            latent = pipe.latent_size(request.num_frames, request.height, request.width)
            try:
                sequence_split_for(pipe.planner.skeletons["stdit3"], latent, self.size, merge=False)
                if request.sampler.tdtm_steps:
                    sequence_split_for(pipe.planner.skeletons["stdit3"], latent, self.size, merge=True)
            except ValueError as e:
                raise UserError(f"--parallel sequence: {e}; use fewer ranks, more frames, or --parallel data / cfg") from e
        if self.mode == "data" and len(request.seeds) < self.size:
            notes.append(f"--parallel data shares out whole seeds (all prompts of a seed are one batch, so the videos "
                         f"are exactly one process's): {len(request.seeds)} seed(s) leave "
                         f"{self.size - len(request.seeds)} of {self.size} ranks idle; give more seeds or use "
                         "--parallel cfg / sequence")
        return notes

    def plan(self, pipe: "Pipeline", request: GenerationRequest) -> list[PlannedPhase]:
        """The phases this rank runs, planned for its share of the work (no collective: local)."""
        self.check(pipe, request)
        return pipe.planner.plan(request, self.share(pipe, request))

    # ------------------------------------------------------------ running

    def run(self, pipe: "Pipeline", request: GenerationRequest, progress: bool = False) -> list["GenerationResult"]:
        """Run this rank's part of the request. Returns this rank's results: its seeds (``data``), or
        every seed (``cfg`` / ``sequence``; the videos on rank 0 only). Every result carries the
        merged ``JobReport``."""
        progress = progress and self.rank == 0
        failure: UserError | None = None
        try:
            plans = self.plan(pipe, request)
        except UserError as e:
            failure, plans = e, []
        self.ranks.agree(failure is None, "planning the memory of each phase")
        if failure is not None:
            raise failure
        previous_cache_limit = mx.set_cache_limit(2**62)  # (reads the current limit)
        mx.set_cache_limit(previous_cache_limit)
        try:
            return self._run(pipe, request, {p.component: p for p in plans}, progress)
        except RuntimeError as e:
            failure = as_rank_failure(e, self.rank)
            if failure is e:
                raise
            raise failure from e
        finally:
            mx.set_cache_limit(previous_cache_limit)

    def _run(self, pipe: "Pipeline", request: GenerationRequest, plans: dict[str, PlannedPhase],
             progress: bool) -> list["GenerationResult"]:
        ranks = self.ranks
        seeds = self.seeds_of(request, self.rank)
        results = pipe._results(request, list(plans.values()), seeds)
        report = RankReport(self.rank, socket.gethostname(), list(seeds) if self.mode == "data" else [])
        texts = list(request.texts)

        # text encoding: rank 0, on the whole request; the caption embeddings go around the ring
        sent = ranks.bytes_sent
        with measure_phase("text encoding" if self.rank == 0 else "text (rank 0)") as phase:
            y = None
            if self.rank == 0:
                y, text_mask = pipe.encode_text(texts, plans["text_encoder"], phase, progress)
                y = y.astype(pipe.dtypes["stdit3"])  # as the denoising casts it
            else:
                text_mask = mx.array(pipe.tokenize(texts)[1])
            stdit = pipe.planner.skeletons["stdit3"].config
            shape = (len(texts), 1, pipe.text_length, stdit.caption_channels)
            y = ranks.broadcast(y, shape, pipe.dtypes["stdit3"], "receiving the caption embeddings from rank 0")
        self._record(report, results, phase, ranks.bytes_sent - sent)

        sent = ranks.bytes_sent
        with measure_phase("denoising") as phase:
            if "stdit3" in plans:
                self._denoise(pipe, plans["stdit3"], phase, results, y, text_mask, request, progress)
        self._record(report, results, phase, ranks.bytes_sent - sent)
        report.evaluations = sum(r.sampling.evaluations for r in results)
        report.denoise_seconds = sum(r.sampling.seconds for r in results)

        sent = ranks.bytes_sent
        with measure_phase("decoding") as phase:
            self._decode(pipe, plans.get("vae"), phase, results, request, progress)
        self._record(report, results, phase, ranks.bytes_sent - sent)

        gathered = ranks.gather_objects(asdict(report), "gathering the ranks' reports")
        job = JobReport(self.mode, [RankReport(**r) for r in gathered])
        for result in results:
            result.job = job
        return results

    @staticmethod
    def _record(report: RankReport, results: list["GenerationResult"], phase: PhaseReport, sent: int) -> None:
        report.phases.append(_phase_entry(phase, sent))
        for result in results:
            result.phases.append(phase)

    def _denoise(self, pipe: "Pipeline", planned: PlannedPhase, phase: PhaseReport, results: list["GenerationResult"],
                 y: mx.array, text_mask: mx.array, request: GenerationRequest, progress: bool) -> None:
        from .models.stdit3_layers import chunked_layers

        def denoise_all(model, weights) -> None:
            units = None
            if self.mode == "cfg":
                units = cfg_units(model, self.ranks)
            elif self.mode == "sequence":
                units = sequence_units(model, self.ranks)
            for result in results:
                result.latent = pipe._denoise(model, weights, result, y, text_mask, request, progress, units=units)

        with chunked_layers(planned.chunk_bytes):
            pipe._in_phase(planned, phase, denoise_all, cyclic=True)

    def _decode(self, pipe: "Pipeline", planned: PlannedPhase | None, phase: PhaseReport,
                results: list["GenerationResult"], request: GenerationRequest, progress: bool) -> None:
        mine = None if self.mode == "data" else self.decoded_chunks(pipe, request, self.rank)
        frames_by_result: list[list[np.ndarray]] = [[] for _ in results]

        def decode_all(vae, weights) -> None:
            vae.micro_batch_size = planned.micro_batch
            vae.set_tiling(planned.tiling is not None, *(planned.tiling or (32, 8)))
            for i, result in enumerate(results):
                if self.mode == "data":
                    result.videos = pipe._decode(vae, weights, result.latent, request.num_frames, progress)
                else:
                    start, end, frames = mine
                    frames_by_result[i] = pipe._decode(vae, weights, result.latent[:, :, start:end], frames, progress)

        if planned is not None:
            pipe._in_phase(planned, phase, decode_all)
        if self.mode == "data":
            return
        # every rank's frames of each video to rank 0, which writes them
        height, width = request.height, request.width
        counts = []
        for rank in range(self.size):
            chunk = self.decoded_chunks(pipe, request, rank)
            counts.append(0 if chunk is None else chunk[2])
        for i, result in enumerate(results):
            mine_frames = np.stack(frames_by_result[i]) if frames_by_result[i] else None  # [B, f, H, W, 3]
            batch = len(request.texts)
            shapes = [(batch, n, *self._frame_size(pipe, height, width), 3) for n in counts]
            pieces = self.ranks.gather_to_root(None if mine_frames is None else mx.array(mine_frames), shapes, mx.uint8,
                                               f"sending the decoded frames of seed {result.seed} to rank 0")
            if pieces is not None:
                video = np.concatenate([np.array(p) for p in pieces if p is not None], axis=1)
                result.videos = list(video)

    @staticmethod
    def _frame_size(pipe: "Pipeline", height: int, width: int) -> tuple[int, int]:
        """(H, W) of the decoded frames: 8x the latent, as the reference (240p 9:16 gives 240 x 424)."""
        _, lh, lw = pipe.latent_size(1, height, width)
        factor = pipe.planner.skeletons["vae"].spatial_factor
        return lh * factor, lw * factor


# ---------------------------------------------------------------- the command line


def join_job(timeout: float) -> RankGroup:
    """The CLI's start on every rank: join the job (a group of one outside a launcher) and turn the
    launcher's SIGTERM into a message."""
    ranks = init_group(timeout)
    if ranks.size > 1:
        stop_on_termination()
    return ranks


def write_job_videos(job: ParallelGeneration, results: Sequence["GenerationResult"], paths: dict[tuple[int, int], Path],
                     request: GenerationRequest, quiet: bool) -> None:
    """The CLI's end on every rank: write the videos this rank holds (``write_videos``); rank 0
    lists every video of the job and prints the merged report."""
    videos = [(paths[(index, result.seed)], frames) for result in results for index, frames in enumerate(result.videos)]
    written = write_videos(job.ranks, videos, request.fps)
    if quiet:
        return
    lines = []
    for rank, names in enumerate(written):
        for name in names:
            lines.append(f"wrote {name} ({request.num_frames} frames, {request.fps} fps; rank {rank})")
    if results:
        lines.append(results[0].job.summary())
    count = sum(map(len, written))
    lines.append(f"done: {count} video{'' if count == 1 else 's'} written by {job.size} ranks")
    print("\n".join(lines))


def write_videos(ranks: RankGroup, videos: Sequence[tuple[Path, np.ndarray]], fps: int) -> list[list[str]]:
    """Write this rank's videos so that a job writes all of its videos or none: each rank encodes
    its own into hidden temporary files beside their names, the ranks agree that every one of them
    has, and only then are the files renamed into place (removed otherwise, also when the watchdog
    ends a hung job). Returns the paths every rank wrote, by rank."""
    from .io.video import stage_mp4

    staged: list[tuple[Path, Path]] = []

    def discard() -> None:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)

    watchdog().cleanups.append(discard)
    failure: BaseException | None = None
    try:
        try:
            for path, frames in videos:
                staged.append((stage_mp4(path, frames, fps), Path(path)))
        except (UserError, OSError) as e:
            failure = e
        ranks.agree(failure is None, "writing the videos")
        if failure is not None:
            raise failure
        for temporary, path in staged:
            os.replace(temporary, path)
        staged.clear()
    finally:
        discard()
        watchdog().cleanups.remove(discard)
    return ranks.gather_objects([str(path) for path, _ in videos], "listing the videos written")


__all__ = ["JobReport", "PARALLEL_MODES", "ParallelGeneration", "RankReport", "join_job", "write_job_videos",
           "write_videos"]
