"""From checked prompts to an HTTP response: one scheduler Request per prompt, then the scheduler's events
(scheduler.py) gathered into one JSON object, or sent as SSE chunks ending in [DONE]. A client that goes away
cancels its requests either way: their rows are freed at the scheduler's next step."""

import asyncio
import collections
import json

from ..core.errors import ChoicelmError
from .errors import APIError
from .scheduler import QueueFull, Request

RETRY_AFTER_S = "1"  # a full queue drains as requests finish: seconds, not minutes


class EventInbox:
    """Events from the scheduler thread to one request's coroutine. The loop is woken once per burst, not once per
    event: at 32 streams that is 32 wake-ups a decode step instead of hundreds of cross-thread calls."""

    def __init__(self, loop):
        self.loop, self.items = loop, collections.deque()
        self.ready = asyncio.Event()
        self.wake_scheduled = False

    def put(self, event) -> None:  # scheduler thread
        self.items.append(event)
        if not self.wake_scheduled:
            self.wake_scheduled = True
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:  # event loop
        self.wake_scheduled = False
        self.ready.set()

    async def get_all(self) -> list:
        while not self.items:
            self.ready.clear()
            if self.items:
                break
            await self.ready.wait()
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out


class Job:
    """The scheduler requests of one API call (one per prompt, n choices each) and their events."""

    def __init__(self, ctx, prompts: list[list[int]], opts, max_tokens: list[int], stop: list[str], fmt,
                 logprobs: int | None):
        if len(prompts) > ctx.scheduler.max_queue:  # they all wait at once: this could never be accepted
            raise APIError(400, f"this request has {len(prompts)} prompts, but the server queues at most "
                                f"{ctx.scheduler.max_queue} requests (its --max-queue); send at most "
                                f"{ctx.scheduler.max_queue} prompts per request", "prompt", "too_many_prompts")
        self.scheduler, self.opts, self.fmt = ctx.scheduler, opts, fmt
        self.total = len(prompts) * opts.n
        self.prompt_tokens = sum(len(p) for p in prompts) * opts.n
        self.events = EventInbox(asyncio.get_running_loop())
        self.requests = []
        try:
            for i, (ids, mt) in enumerate(zip(prompts, max_tokens)):
                cfg = opts.generation_config(ctx.lm, mt, stop)
                req = Request(ids, cfg, self.events.put, index_base=i * opts.n, logprobs=logprobs)
                self.scheduler.submit(req)
                self.requests.append(req)
        except QueueFull as e:
            self.cancel()
            raise APIError(429, str(e), None, "queue_full", "rate_limit_exceeded",
                           headers={"Retry-After": RETRY_AFTER_S}) from None
        except ChoicelmError as e:
            self.cancel()
            raise APIError(400, str(e), None, "invalid_value") from None

    def cancel(self) -> None:
        for req in self.requests:
            self.scheduler.cancel(req)

    def usage(self, n_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n_tokens,
                "total_tokens": self.prompt_tokens + n_tokens}

    async def batches(self):
        """Batches of events (whatever arrived since the last wake-up) until every choice has finished."""
        open_choices, started = self.total, set()
        while open_choices:
            batch = []
            for event in await self.events.get_all():
                if event[0] == "error":
                    raise APIError(500, event[1], None, "generation_failed", "server_error")
                if event[0] == "delta" and self.fmt.strip_first and event[1] not in started:
                    text = event[2].lstrip()
                    if not text:
                        continue
                    started.add(event[1])
                    event = ("delta", event[1], text)
                if event[0] == "finish":
                    open_choices -= 1
                batch.append(event)
            yield batch


async def respond(http, job: Job):
    """The whole response, or a stream of SSE chunks."""
    from fastapi.responses import JSONResponse, StreamingResponse

    if not job.opts.stream:
        return JSONResponse(await _until_done_or_gone(http, job))
    return StreamingResponse(_sse(job), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _until_done_or_gone(http, job: Job) -> dict:
    """The final JSON of a non-streamed request; its requests are cancelled if the client disconnects first."""
    work = asyncio.ensure_future(_gather(job))
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise APIError(400, "the client disconnected; the request was cancelled", None, "client_gone")
    finally:
        work.cancel()
        gone.cancel()
        job.cancel()  # a finished request is gone already; a disconnected client's rows are freed now


async def _disconnected(http) -> None:
    """Returns when the client closes the connection (the body has been read: nothing else can arrive)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _gather(job: Job) -> dict:
    texts, reasons, n_tokens = [""] * job.total, [None] * job.total, 0
    token_logprobs = [[] for _ in range(job.total)]  # per choice: (token, logprob, top)
    async for batch in job.batches():
        for event in batch:
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "logprob":
                token_logprobs[event[1]].append(event[2:])
            else:
                reasons[event[1]] = event[2]
                n_tokens += event[3]
    return job.fmt.final(texts, reasons, job.usage(n_tokens), token_logprobs)


async def _sse(job: Job):
    n_tokens = 0
    try:
        for first in job.fmt.opening():
            yield f"data: {json.dumps(first)}\n\n"
        async for batch in job.batches():
            out = []  # one write for everything that arrived together
            for event in batch:
                if event[0] == "logprob":  # not requested when streaming (refused before)
                    continue
                if event[0] == "delta":
                    data = job.fmt.delta(event[1], event[2], None)
                else:
                    n_tokens += event[3]
                    data = job.fmt.delta(event[1], None, event[2])
                out.append(f"data: {json.dumps(data)}\n\n")
            if out:
                yield "".join(out)
        if job.opts.include_usage:
            yield f"data: {json.dumps(job.fmt.usage(job.usage(n_tokens)))}\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        job.cancel()  # a finished request is gone already; a disconnected client's rows are freed now
    yield "data: [DONE]\n\n"
