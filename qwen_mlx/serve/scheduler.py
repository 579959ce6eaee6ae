"""The one thread of ``qwen-mlx serve`` that uses the model: continuous batching of requests.

A request becomes a :class:`Job` in a queue. Between decode steps the :class:`Scheduler`
admits waiting jobs, oldest first, into the running batch of their engine (its
:class:`~qwen_mlx.inference.Decoder`) while fewer than ``max_concurrent`` are decoding, and
drops the jobs whose client went away (their slot is free for the next step). Each step
decodes one token of every sequence of a batch together; a sequence leaves at its end of
turn, its ``max_tokens`` or a stop string, and its chunks reach the request side as they come.

The tuned model and its adapter-off base (the page's compare) are separate batches, stepped
in turns, so a batch never mixes adapter-on and adapter-off sequences. An engine without a
decoder (a test fake, or a GGUF on an old llama-cpp-python), and every engine with
``max_concurrent`` 1, answers one request at a time, as the server did before it batched:
such a job waits until nothing else is decoding, then has the model to itself.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.inference import Chunk, ReplyChunks, stream
from qwen_mlx.serve import DEFAULT_MAX_CONCURRENT


class Cancel(threading.Event):
    """A job's cancel flag, which wakes the scheduler when set, so the slot frees at once."""

    def __init__(self, wake):
        super().__init__()
        self._wake = wake

    def set(self) -> None:
        super().set()
        self._wake()


class Job:
    """One request's reply. Created on the event loop; the scheduler thread hands it chunks
    (then an end mark), which the request side reads with :meth:`next`. Setting ``cancel``
    drops it from the queue or the batch before the next step."""

    _END = object()

    def __init__(
        self,
        scheduler: Scheduler,
        engine: Any,
        prompt_ids: list[int],
        settings: GenerationSettings,
    ):
        self.engine, self.prompt_ids, self.settings = engine, prompt_ids, settings
        self.prompt_tokens = len(prompt_ids)
        self.think_tags = engine.family.think_tags  # where a reply's think block ends
        self.cancel = Cancel(scheduler.wake)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        scheduler.submit(self)

    def put(self, item: Chunk | Exception) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            self.cancel.set()

    def end(self) -> None:
        self.put(self._END)  # type: ignore[arg-type]

    async def next(self) -> Chunk | None:
        """The next chunk; None when the reply has ended (the last chunk carries the finish
        reason unless the job was cancelled)."""
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return None if item is self._END else item

    async def collect(self) -> list[Chunk]:
        chunks = []
        while (chunk := await self.next()) is not None:
            chunks.append(chunk)
        return chunks


@dataclass
class _Sequence:
    job: Job
    reply: ReplyChunks


@dataclass
class _Batch:
    """The running batch of one engine: its decoder and the jobs in it, by sequence id."""

    decoder: Any
    sequences: dict[int, _Sequence] = field(default_factory=dict)


class Scheduler:
    """The queue of jobs and the thread that answers them (started by the first job; it
    ends once the server is closing and nothing is left)."""

    def __init__(self, max_concurrent: int = DEFAULT_MAX_CONCURRENT):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.max_concurrent = max_concurrent
        self.closing = False
        self._cond = threading.Condition()  # guards _pending, _jobs and the thread
        self._pending: deque[Job] = deque()
        self._jobs: set[Job] = set()  # queued or being answered
        self._batches: dict[int, _Batch] = {}  # by id(engine); the scheduler thread's own
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the request side

    def submit(self, job: Job) -> None:
        with self._cond:
            self._pending.append(job)
            self._jobs.add(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="scheduler")
                self._thread.start()
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop_all(self) -> None:
        """The server is stopping: end every job now."""
        with self._cond:
            self.closing = True
            for job in list(self._jobs):
                job.cancel.set()
            self._cond.notify()

    @property
    def waiting(self) -> int:
        """Jobs in the queue, not yet admitted (for tests and the bench)."""
        with self._cond:
            return len(self._pending)

    def decoding(self) -> int:
        """Sequences in the running batches."""
        return sum(len(batch.sequences) for batch in list(self._batches.values()))

    # ------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    self._drop_cancelled_waiting()
                    alone = self._admit()
                    if alone is not None or self.decoding():
                        break
                    if self.closing and not self._pending:
                        self._thread = None
                        return
                    self._cond.wait()
            if alone is not None:
                self._answer_alone(alone)
                continue
            for key, batch in list(self._batches.items()):  # turns: a step of each batch
                if batch.sequences:
                    self._step(key, batch)

    def _drop_cancelled_waiting(self) -> None:
        for job in [job for job in self._pending if job.cancel.is_set()]:
            self._pending.remove(job)
            self._finish(job)

    def _batched(self, job: Job) -> bool:
        return self.max_concurrent > 1 and callable(getattr(job.engine, "decoder", None))

    def _admit(self) -> Job | None:
        """Move waiting jobs into their batches, oldest first, while there are free slots;
        return the oldest job if it must be answered alone and nothing else is decoding."""
        decoding = self.decoding()
        while self._pending:
            job = self._pending[0]
            if not self._batched(job):
                if decoding:
                    return None  # it waits for the batches to finish: first come, first served
                return self._pending.popleft()
            if decoding >= self.max_concurrent:
                return None
            self._pending.popleft()
            try:
                batch = self._batches.get(id(job.engine))
                if batch is None:
                    batch = self._batches[id(job.engine)] = _Batch(job.engine.decoder())
                seq = batch.decoder.join(job.prompt_ids, job.settings)
            except Exception as err:  # a model that cannot batch this: the request says so
                job.put(err)
                self._finish(job)
                continue
            batch.sequences[seq] = _Sequence(job, ReplyChunks(job.settings, batch.decoder.decode))
            decoding += 1
        return None

    def _answer_alone(self, job: Job) -> None:
        try:
            for chunk in stream(job.engine, job.prompt_ids, job.settings, job.cancel):
                job.put(chunk)
        except Exception as err:  # a bug or a model failure: the request side reports it
            job.put(err)
        finally:
            self._finish(job)

    def _step(self, key: int, batch: _Batch) -> None:
        decoder, sequences = batch.decoder, batch.sequences
        try:
            for seq, sequence in list(sequences.items()):
                if sequence.job.cancel.is_set():  # its client went: its slot is free now
                    decoder.leave(seq)
                    del sequences[seq]
                    self._finish(sequence.job)
            if not sequences:
                return
            steps = decoder.step()
        except Exception as err:  # the whole batch failed: each request reports it
            del self._batches[key]
            for sequence in sequences.values():
                sequence.job.put(err)
                self._finish(sequence.job)
            return
        for step in steps:
            sequence = sequences.get(step.seq)
            if sequence is None:
                continue
            reply = sequence.reply
            chunks = reply.token(step.token) if step.token is not None else []
            if reply.stopped and not step.done:  # a stop string: it leaves the batch now
                decoder.leave(step.seq)
            elif step.done and not reply.stopped:
                chunks += reply.end()
            for chunk in chunks:
                sequence.job.put(chunk)
            if reply.stopped or step.done:
                del sequences[step.seq]
                self._finish(sequence.job)

    def _finish(self, job: Job) -> None:
        job.end()
        with self._cond:
            self._jobs.discard(job)
