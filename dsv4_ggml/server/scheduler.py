"""Continuous batching over the model's sequence slots, with a prompt cache.

One thread owns the model. Each running request (a `Task`) owns one sequence slot; every engine
step is ONE `Model.eval_batch` call carrying every active slot's work: the last sampled token of
each decoding request and prompt chunks of the requests still reading their prompt, up to
`n_batch` tokens in all (decode tokens first, then prompt chunks in arrival order). A new request
joins at the next step, a finished or cancelled one frees its slot at once; requests beyond the
slots wait in a bounded queue (`QueueFull` beyond it).

Prompt cache: a slot keeps the tokens it holds after its request ends. A new request goes to the
idle slot whose tokens share the longest prefix with its prompt (ties: the least recently used),
the slot is truncated to that prefix (`Model.truncate`, exact) and only the rest of the prompt is
evaluated. Token ids come from tokenizing the whole prompt, as a cold run would, so a cached run
evaluates the same tokens at the same positions as a cold one and gives the same logits.

Sampling, detokenizing and stop strings go through `generation.TokenGenerator`, the same path as
`Model.generate`, so a request makes the same tokens batched as alone.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import ContextOverflowError, InvalidArgumentError, StateError
from ..generation import GenerationChunk, TokenGenerator, check_prompt_fits
from ..sampling import SamplingParams
from ..speculative import MAX_DRAFT, AdaptiveK, ModelDrafter, MtpDrafter, verify

log = logging.getLogger("uvicorn.error")


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


@dataclass
class Task:
    """One request's generation. `emit(kind, value)` is called on the scheduler thread with
    ("start", info), ("forced", text), ("token", GenerationChunk), then one of ("done", None),
    ("error", exception), ("cancelled", None)."""

    tokens: list[int]
    max_tokens: int
    params: SamplingParams
    stop: Sequence[str]
    emit: Callable[[str, Any], None]
    forced: list[int] = field(default_factory=list)     # evaluated before generating (or after </think>)
    forced_text: str = ""
    force_after: list[int] | None = None                # the token ids that trigger `forced` (None: at once)
    cancel: threading.Event = field(default_factory=threading.Event)
    cache_prompt: bool = True          # False: evaluate the whole prompt (llama.cpp's cache_prompt)
    # filled in by the scheduler
    seq: int | None = None
    cached_tokens: int = 0
    evaluated_tokens: int = 0          # prompt tokens this request evaluated (cache misses + recomputed)
    generated: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    _gen: TokenGenerator | None = None
    _pending: list[int] = field(default_factory=list)   # prompt (or forced) tokens not evaluated yet
    _save_at: int | None = None        # --cache-dir: save the slot's state when it holds this many tokens
    _drafter: Any = None               # --draft / --draft-model: the slot's drafter and its AdaptiveK
    _policy: Any = None
    _drafted: tuple = ()               # this step's (drafts, their distributions, drafting seconds)

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens)

    def usage(self) -> dict:
        n = len(self.generated)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                "total_tokens": self.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class Slot:
    seq: int
    task: Task | None = None
    last_used: float = 0.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    """Runs tasks on `model` (a `Model` opened with `n_seq` slots) on its own thread."""

    def __init__(self, model, max_queue: int = 64, n_batch: int | None = None, disk_cache=None,
                 draft: str | None = None, n_draft: int = 2, adaptive_draft: bool = True):
        if draft is not None and draft != "mtp" and not hasattr(draft, "_feed"):
            raise InvalidArgumentError(f"the server drafts with 'mtp' (the model's MTP block), a draft Model or not "
                                       f"at all, got {draft!r}")
        if draft is not None and draft != "mtp" and int(draft.n_seq) < int(model.n_seq):
            raise InvalidArgumentError(f"the draft model has {draft.n_seq} sequence slots; the server needs one per "
                                       f"slot ({model.n_seq})")
        if draft == "mtp" and not getattr(model, "mtp", False):
            raise InvalidArgumentError("--draft mtp needs the model opened with mtp=True (and a file with an MTP block)")
        if not 1 <= n_draft <= MAX_DRAFT:
            raise InvalidArgumentError(f"n_draft must be in 1..{MAX_DRAFT}, got {n_draft}")
        if draft is not None and draft != "mtp":
            ModelDrafter(draft).check_compatible(model)     # the vocabulary, now rather than per request
        self.draft, self.n_draft, self.adaptive_draft = draft, n_draft, adaptive_draft
        self.model = model
        self.disk_cache = disk_cache           # a DiskCache (--cache-dir) or None
        self.n_ctx = int(model.n_ctx)
        self.n_batch = int(n_batch or getattr(model, "n_ubatch", 512))
        self.max_queue = max_queue
        self.slots = [Slot(seq) for seq in range(int(model.n_seq))]
        self.queue: collections.deque[Task] = collections.deque()
        self._cv = threading.Condition()
        self.closing = False
        self.counters = collections.Counter()   # requests, served, cancelled, errors, tokens...
        self._rate: collections.deque[tuple[float, int]] = collections.deque()   # (time, tokens generated)
        self._think_end = self._token_ids("</think>")
        self._thread = threading.Thread(target=self._loop, name="dsv4-scheduler", daemon=True)
        self._thread.start()

    def _token_ids(self, text: str) -> list[int]:
        try:
            return self.model.tokenize(text, add_bos=False)
        except Exception:       # noqa: BLE001 - a model without a tokenizer: no thinking-mode forcing
            return []

    # --- the request side (any thread) ---------------------------------------------------------------
    def submit(self, task: Task) -> None:
        """Queues `task` (raises QueueFull, or the prompt's error: too long, empty)."""
        check_prompt_fits(len(task.tokens) + len(task.forced), self.n_ctx)
        task._gen = TokenGenerator(self.model.tokenizer, self.n_ctx, task.max_tokens, task.params, task.stop)
        with self._cv:
            if self.closing:
                raise QueueFull("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting (the queue holds {self.max_queue})")
            self.queue.append(task)
            self.counters["requests"] += 1
            self._cv.notify()

    def wake(self) -> None:
        """Call after setting a task's cancel flag: the scheduler drops it at its next step."""
        with self._cv:
            self._cv.notify()

    def shutdown(self) -> None:
        with self._cv:
            self.closing = True
            self._cv.notify()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def active(self) -> int:
        return sum(s.task is not None for s in self.slots)

    @property
    def queued(self) -> int:
        return len(self.queue)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now, rate = time.monotonic(), list(self._rate)
        recent = [(t, n) for t, n in rate if t >= now - window]
        if len(recent) < 2:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / max(recent[-1][0] - recent[0][0], 1e-9)

    def slot_info(self) -> list[dict]:
        out = []
        for s in self.slots:
            t = s.task
            out.append({"id": s.seq, "busy": t is not None, "n_tokens": len(self.model._seqs[s.seq]),
                        "prompt_tokens": t.prompt_tokens if t else None,
                        "cached_tokens": t.cached_tokens if t else None,
                        "generated": len(t.generated) if t else None})
        return out

    # --- the scheduler thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.closing and not self.queue and not self.active:
                    self._cv.wait()
                if self.closing:
                    break
                self._drop_cancelled_queued()
                self._admit()
            self._drop_cancelled_active()
            if self.active:
                self._step()
        self._stop_all()

    def _drop_cancelled_queued(self) -> None:
        keep = collections.deque()
        for t in self.queue:
            if t.cancel.is_set():
                self.counters["cancelled"] += 1
                t.emit("cancelled", None)
            else:
                keep.append(t)
        self.queue = keep

    def _drop_cancelled_active(self) -> None:
        for s in self.slots:
            if s.task is not None and s.task.cancel.is_set():
                self.counters["cancelled"] += 1
                self._release(s, "cancelled", None)

    def _stop_all(self) -> None:
        with self._cv:
            waiting, self.queue = list(self.queue), collections.deque()
        for t in waiting:
            t.emit("cancelled", None)
        for s in self.slots:
            if s.task is not None:
                self._release(s, "cancelled", None)

    def _admit(self) -> None:
        """Moves queued tasks into idle slots: each to the slot sharing the longest prefix."""
        while self.queue:
            idle = [s for s in self.slots if s.task is None]
            if not idle:
                return
            task = self.queue.popleft()
            if task.cache_prompt:       # the longest shared prefix, then the least recently used
                held = {s.seq: self.model._seqs[s.seq] for s in idle}
                slot = max(idle, key=lambda s: (common_prefix(held[s.seq], task.tokens), -s.last_used))
            else:                       # a cold run: spare the caches most likely to be wanted
                slot = min(idle, key=lambda s: s.last_used)
            try:
                self._start(slot, task)
            except Exception as e:  # noqa: BLE001 - the request fails, the server goes on
                self._fail(slot, task, e)

    def _restore_from_disk(self, seq: int, task: Task) -> None:
        """Loads the saved state sharing a longer prefix with the prompt than the slot holds."""
        path, n = self.disk_cache.best(task.tokens)
        if path is None or n <= common_prefix(self.model._seqs[seq], task.tokens):
            return
        blob = self.disk_cache.load(path)
        if blob is None:
            return
        try:
            self.model.load_state(blob, seq=seq)
            self.counters["disk_cache_hits"] += 1
        except (StateError, InvalidArgumentError, ContextOverflowError) as e:
            self.disk_cache.forget(path, str(e))      # foreign or damaged: the slot is unchanged

    def _save_to_disk(self, seq: int, task: Task) -> None:
        task._save_at = None
        try:
            self.disk_cache.save(self.model._seqs[seq], self.model.save_state(seq))
        except Exception as e:  # noqa: BLE001 - the cache is an optimization: log and go on
            log.warning("prompt cache: could not save slot %d: %s", seq, e)

    def _start(self, slot: Slot, task: Task) -> None:
        model, seq = self.model, slot.seq
        if self.disk_cache is not None and task.cache_prompt:
            self._restore_from_disk(seq, task)
        keep = min(common_prefix(model._seqs[seq], task.tokens), len(task.tokens) - 1) if task.cache_prompt else 0
        recomputed = 0
        if len(model._seqs[seq]) > keep:
            before = model.stats()["n_reevaluated"]
            model.truncate(keep, seq=seq)
            recomputed = model.stats()["n_reevaluated"] - before
        slot.task, task.seq = task, seq
        if self.draft is not None:     # the slot's drafter: the MTP block, or the draft model's slot `seq`
            task._drafter = (MtpDrafter(task.params, seq) if self.draft == "mtp"
                             else ModelDrafter(self.draft, task.params, seq=seq))
            task._drafter.check_compatible(model)
            task._policy = AdaptiveK(self.n_draft, self.adaptive_draft)
        task.started = time.monotonic()
        task.cached_tokens = max(0, keep - recomputed)
        task.evaluated_tokens = recomputed
        task._pending = list(task.tokens[keep:])
        if self.disk_cache is not None and task.cache_prompt and self.disk_cache.wants(task.tokens[:-1]):
            # the prompt but its last token: a later request with this prompt, or one extending it,
            # goes on from there without a rollback (a loaded state cannot roll back)
            task._save_at = len(task.tokens) - 1
        if task.forced and task.force_after is None:
            task._pending += task.forced
            task.emit("forced", task.forced_text)
        self.counters["cached_tokens"] += task.cached_tokens
        self.counters["cache_hits"] += task.cached_tokens > 0
        task.emit("start", {"slot": seq, "cached_tokens": task.cached_tokens})

    def _step(self) -> None:
        model = self.model
        batch: dict[int, list[int]] = {}
        budget = self.n_batch
        running = [s for s in self.slots if s.task is not None]
        for s in running:               # decoding slots: one token each, and its drafts (--draft)
            if not s.task._pending:
                t = s.task.generated[-1]
                batch[s.seq] = [t] + self._draft(s, t, budget)
                budget -= len(batch[s.seq])
        for s in sorted(running, key=lambda s: s.task.started):   # prompts, oldest first
            if s.task._pending and budget > 0:
                n = budget
                if s.task._save_at is not None and len(model._seqs[s.seq]) < s.task._save_at:
                    n = min(n, s.task._save_at - len(model._seqs[s.seq]))
                chunk = s.task._pending[:n]
                batch[s.seq] = chunk
                budget -= len(chunk)
        if not batch:
            return
        decoding = {s.seq for s in running if not s.task._pending}
        modes = {seq: "all" if seq in decoding and len(toks) > 1 else "last" for seq, toks in batch.items()}
        t_step = time.perf_counter()
        try:
            out = model.eval_batch(batch, logits=modes)
        except Exception as e:  # noqa: BLE001 - fail the tasks of this step, keep serving the others
            for s in running:
                if s.seq in batch:
                    self._fail(s, s.task, e)
            return
        self.counters["steps"] += 1
        self._rate.append((time.monotonic(), self.counters["generated_tokens"]))
        while len(self._rate) > 2 and self._rate[0][0] < self._rate[-1][0] - 10.0:
            self._rate.popleft()
        for s in running:
            if s.seq not in batch:
                continue
            task = s.task
            if task._save_at is not None and len(model._seqs[s.seq]) == task._save_at:
                self._save_to_disk(s.seq, task)
            if task._pending:
                n = len(batch[s.seq])
                del task._pending[:n]
                task.evaluated_tokens += n
                self.counters["prompt_tokens_evaluated"] += n
                if task._pending:
                    continue
            else:
                self.counters["generated_tokens_evaluated"] += len(batch[s.seq])
            if task._drafted:
                try:
                    self._verify(s, task, out[s.seq], time.perf_counter() - t_step)
                except Exception as e:  # noqa: BLE001 - the rollback failed: this request ends, the others go on
                    self._fail(s, task, e)
            else:
                if task._policy is not None and s.seq in decoding:   # a plain decode step: its cost
                    task._policy.record(0, 0, time.perf_counter() - t_step, 0.0)
                self._sample(s, task, out[s.seq][0])

    def _draft(self, slot: Slot, t: int, budget: int) -> list[int]:
        """The drafts slot's task verifies this step after its token t (none without --draft, while
        forced tokens wait, or when adaptive K says drafting does not pay)."""
        task = slot.task
        task._drafted = ()
        if task._policy is None or task.forced:
            return []
        held = self.model._seqs[slot.seq]
        room = min(self.n_ctx - 2 - len(held), task.max_tokens - task._gen.n_generated - 1, budget - 1)
        k = max(0, min(task._policy.choose(), room))
        if not k:
            return []
        t0 = time.perf_counter()
        try:
            drafts, dists = task._drafter.propose(held + [t], k, task._gen.sampler.rng)
        except Exception as e:  # noqa: BLE001 - drafts only speed a request up: it goes on without them
            log.warning("drafting failed for the request in slot %d, which goes on without drafts: %s", slot.seq, e)
            task._policy = None
            return []
        task._drafted = (drafts, dists, time.perf_counter() - t0)
        self.counters["draft_proposed"] += len(drafts)
        return list(drafts)

    def _verify(self, slot: Slot, task: Task, rows, step_s: float) -> None:
        """Speculative decoding's accept step for a slot that ran [t, drafts...] (speculative.verify,
        as one sequence's stream does); the rejected drafts are rolled back."""
        drafts, dists, draft_s = task._drafted
        task._drafted = ()
        model, seq = self.model, slot.seq
        held = model._seqs[seq]
        n_base = len(held) - 1 - len(drafts)
        accepted = 0
        for chunk, ok in verify(task._gen, rows, drafts, dists, held, n_base):
            self._emit(slot, task, chunk)
            accepted += ok
        model.truncate(n_base + 1 + accepted, seq=seq)    # t and the accepted drafts stay
        self.counters["draft_accepted"] += accepted
        task._policy.record(len(drafts), accepted, step_s, draft_s)

    def _emit(self, slot: Slot, task: Task, chunk: GenerationChunk) -> bool:
        """Hands a generated token to the request; True when that ended it (the slot is free)."""
        task.generated.append(chunk.token)
        if task.first_token is None:
            task.first_token = time.monotonic()
        self.counters["generated_tokens"] += 1
        task.emit("token", chunk)
        if chunk.finish_reason:
            self.counters["served"] += 1
            self._release(slot, "done", None)
            return True
        return False

    def _sample(self, slot: Slot, task: Task, logits) -> None:
        held = self.model._seqs[slot.seq]
        chunk: GenerationChunk = task._gen.next(logits, held, len(held))
        if self._emit(slot, task, chunk):
            return
        after = task.force_after
        if task.forced and after and task.generated[-len(after):] == after:
            # e.g. the reasoning has ended: evaluate the sampled token, then the forced ones
            task._pending = [chunk.token] + task.forced
            task.force_after = None
            task.forced = []
            task.emit("forced", task.forced_text)

    def _release(self, slot: Slot, kind: str, value: Any) -> None:
        task = slot.task
        slot.task = None
        slot.last_used = time.monotonic()
        if task is not None:
            task.finished = time.monotonic()
            task.emit(kind, value)

    def _fail(self, slot: Slot, task: Task, exc: BaseException) -> None:
        if not isinstance(exc, (InvalidArgumentError, ContextOverflowError, StateError)):
            log.error("request failed in the engine: %s", exc, exc_info=exc)
            try:                            # start this slot over from an empty, known state
                self.model.reset(slot.seq)
            except Exception:  # noqa: BLE001
                pass
        self.counters["errors"] += 1
        slot.task = slot.task if slot.task is not task else None
        task.finished = time.monotonic()
        task.emit("error", exc)
