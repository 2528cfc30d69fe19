"""The speech engine: one background thread that generates audio codes for every running
request in one batched decoder step per frame.

Requests join between steps (up to ``max_seqs`` at once; the rest wait): a joining request's
text is encoded once (conditional bytes and the all-zero unconditional input), its
cross-attention K/V are computed once and kept in the core's ``CrossAttentionCache`` under
its two rows, and from then on it advances one frame per step alongside the others, each
request at its own position. A finished request leaves at once and its caller decodes the
codes to audio while the others continue. A model error fails the requests of that step
only; the engine keeps serving.
"""
from __future__ import annotations

import queue
import threading

import torch

from mistralrs_core.layers.attention_backends import CrossAttentionCache

from mistralrs_arch_speech.dia import DecodeStep, DiaModel
from mistralrs_arch_speech.kv_pool import DecoderKVPool
from mistralrs_arch_speech.sampling import SpeechSampling, sample_frame


class _Request:
    def __init__(self, text_ids: list[int], generator: torch.Generator, sampling: SpeechSampling):
        self.text_ids = text_ids
        self.generator = generator
        self.sampling = sampling
        self.done: queue.Queue = queue.Queue(maxsize=1)
        self.frames: list[torch.Tensor] = []       # each [C]; frame 0 is all BOS
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.enc_len = len(text_ids)
        self.ended = False
        self.finished = False
        self.delay_left: torch.Tensor | None = None
        self.eos_frame: int | None = None
        self.truncated = False

    @property
    def position(self) -> int:
        """Position of the frame this request feeds in the next step."""
        return len(self.frames) - 1


class SpeechEngine:
    def __init__(self, model: DiaModel, max_seqs: int = 16, seed: int | None = None):
        import random
        self.model = model
        cfg = model.cfg
        self.cfg = cfg
        self.max_seqs = max(1, int(max_seqs))
        self.max_positions = cfg.decoder.max_positions
        self.pool = DecoderKVPool(cfg.decoder.layers, 2 * self.max_seqs, cfg.decoder.kv_heads,
                                  cfg.decoder.head_dim, self.max_positions, model.dtype, model.device)
        self.cross = [CrossAttentionCache(2 * self.max_seqs) for _ in range(cfg.decoder.layers)]
        self._rng = random.Random(seed)
        self._seed_lock = threading.Lock()
        self._waiting: queue.Queue = queue.Queue()
        self._running: list[_Request] = []
        self._stop = threading.Event()
        self._delay = torch.tensor(cfg.delay_pattern, dtype=torch.long)
        #: steps run and the most requests one step carried (tests check batching with it)
        self.stats = {"steps": 0, "max_running": 0, "generated_frames": 0}
        self._thread = threading.Thread(target=self._loop, name="mistralrs-speech-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def generate(self, text_ids: list[int], sampling: SpeechSampling) -> tuple[torch.Tensor, bool]:
        """Audio codes [C, frames] (delay pattern undone, BOS/EOS stripped) and whether the
        maximum length cut the speech short."""
        with self._seed_lock:
            # Checked under the lock shutdown takes, so no request is queued after its drain.
            if self._stop.is_set():
                raise RuntimeError("the speech engine has been shut down")
            # The runner's seed drives a stream of per-request seeds (as the text engine does).
            gen = torch.Generator().manual_seed(self._rng.getrandbits(63))
            req = _Request(text_ids, gen, sampling)
            self._waiting.put(req)
        kind, value = req.done.get()
        if kind == "error":
            raise value
        return value

    def snapshot(self) -> dict:
        """Live counters for /metrics and /v1/models/status (read without locking: each value
        is one atomic read)."""
        return {"waiting": self._waiting.qsize(), "running": len(self._running),
                "kv_cache_bytes": self.pool.nbytes, **self.stats}

    def shutdown(self) -> None:
        with self._seed_lock:
            self._stop.set()
        self._waiting.put(None)
        self._thread.join(timeout=10)
        # Requests that were still queued get an answer too.
        while True:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.done.put(("error", RuntimeError("the speech engine was shut down")))

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            if not self._running:
                item = self._waiting.get()
                if item is None:
                    break
                self._admit(item)
            while len(self._running) < self.max_seqs:
                try:
                    item = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._stop.set()
                    break
                self._admit(item)
            if self._running:
                self._step()
        for req in self._running:
            req.done.put(("error", RuntimeError("the speech engine was shut down")))
        self._running.clear()

    def _admit(self, req: _Request) -> None:
        cfg = self.cfg
        try:
            ids = torch.tensor([req.text_ids, [0] * len(req.text_ids)], dtype=torch.long, device=self.model.device)
            enc = self.model.encode(ids)
            req.cross = [(k, v) for k, v in self.model.cross_kv(enc)]
        except Exception as exc:  # a bad request fails alone
            req.done.put(("error", exc))
            return
        req.frames = [torch.full((cfg.channels,), cfg.bos_id, dtype=torch.long)]
        req.delay_left = self._delay.clone()
        self._running.append(req)
        self._store_cross(len(self._running) - 1, req)

    def _store_cross(self, index: int, req: _Request) -> None:
        for layer, (k, v) in enumerate(req.cross):
            for branch in (0, 1):
                self.cross[layer].store(2 * index + branch, k[branch], v[branch])

    def _step(self) -> None:
        reqs = self._running
        n = len(reqs)
        cfg = self.cfg
        self.stats["steps"] += 1
        self.stats["max_running"] = max(self.stats["max_running"], n)
        try:
            pos = [r.position for r in reqs]
            self.pool.ensure(max(pos) + 1)
            positions = torch.tensor(pos, dtype=torch.long)
            # The delay pattern: codebook c starts after ``delay[c]`` frames of BOS.
            frames = torch.where(positions[:, None] <= self._delay, cfg.bos_id,
                                 torch.stack([r.frames[-1] for r in reqs])).repeat_interleave(2, dim=0)
            dev = self.model.device
            step = DecodeStep(self.pool, self.cross, torch.arange(2 * n, device=dev),
                              positions.repeat_interleave(2).to(dev), [r.enc_len for r in reqs for _ in (0, 1)])
            logits = self.model.decode(frames.to(dev), step).view(n, 2, cfg.channels, cfg.audio_vocab).cpu()
            tokens = self._sample(reqs, logits)
        except Exception as exc:
            for r in reqs:
                r.done.put(("error", exc))
            self._release(list(range(n)))
            return
        finished = []
        self.stats["generated_frames"] += n
        for i, (r, frame) in enumerate(zip(reqs, tokens.unbind(0))):
            r.frames.append(frame)
            if r.finished:
                finished.append(i)
        for i in finished:
            r = reqs[i]
            r.done.put(("ok", self._codes(r)))
        self._release(finished)

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        # Requests may carry different settings: one vectorised draw per distinct setting
        # (usually one: the pipeline's).
        groups: dict[SpeechSampling, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.sampling, []).append(i)
        if len(groups) == 1:
            return self._sample_group(reqs, logits, next(iter(groups)))
        out = torch.empty(len(reqs), cfg.channels, dtype=torch.long)
        for s, idx in groups.items():
            out[idx] = self._sample_group([reqs[i] for i in idx], logits[idx], s)
        return out

    def _sample_group(self, reqs: list[_Request], logits: torch.Tensor, s: SpeechSampling) -> torch.Tensor:
        cfg = self.cfg
        was_ended = [r.ended for r in reqs]
        draw = sample_frame(logits, s, torch.tensor(was_ended),
                            torch.stack([r.delay_left for r in reqs]),
                            torch.tensor([r.position + 1 >= s.max_frames - 1 for r in reqs]),
                            [r.generator for r in reqs], cfg.eos_id, cfg.pad_id)
        ended = draw.ended.tolist()
        # Finished: every codebook has emitted its delayed EOS.
        finished = (draw.delay_left.amax(-1) < 0).tolist()
        for j, (r, delay_left) in enumerate(zip(reqs, draw.delay_left.unbind(0))):
            if ended[j] and not was_ended[j]:
                r.eos_frame = r.position + 1
                r.truncated = not bool(draw.natural_end[j])
            r.ended = ended[j]
            r.finished = finished[j]
            r.delay_left = delay_left
        return draw.tokens

    def _codes(self, r: _Request) -> tuple[torch.Tensor, bool]:
        """Undo the delay pattern: audio frame t of codebook c is generated frame 1 + t + delay[c];
        frames run from after BOS to before codebook 0's EOS."""
        frames = torch.stack(r.frames)                 # [T, C]
        n_audio = max(0, r.eos_frame - 1)
        t = torch.arange(n_audio)[:, None] + 1 + self._delay[None, :]
        codes = frames.gather(0, t) if n_audio else frames.new_zeros(0, self.cfg.channels)
        return codes.t().contiguous(), r.truncated

    def _release(self, indices: list[int]) -> None:
        """Drop finished requests; move the last running requests into their rows so the
        running ones keep rows 0 .. 2n-1."""
        for i in sorted(indices, reverse=True):
            last = len(self._running) - 1
            if i != last:
                moved = self._running[last]
                for branch in (0, 1):
                    self.pool.move(2 * last + branch, 2 * i + branch, moved.position + 1)
                self._running[i] = moved
                self._store_cross(i, moved)
            self._running.pop()
            for cache in self.cross:
                cache.clear(2 * last)
                cache.clear(2 * last + 1)
