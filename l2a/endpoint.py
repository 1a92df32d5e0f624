"""Talking to OpenAI-compatible chat endpoints (LLM judge, info extractor, served policies).

- ``api_key(env, what)``: the key from an environment variable, never printed;
- ``chat(...)``: one chat request, retried with exponential backoff, its answer parsed;
- ``run_async(coroutine)``: run async code from synchronous code, so that Ctrl-C always stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from l2a.cli import UserError

if TYPE_CHECKING:  # openai is imported where a request is made: the offline paths (rubric judge) run without it
    import openai

log = logging.getLogger(__name__)
T = TypeVar("T")

INTERRUPT_GRACE_SECONDS = 2.0
"""After an interruption, how long pending requests get to wind down before they are abandoned."""


class EndpointRefused(UserError):
    """The endpoint rejected us (wrong key, model or URL: HTTP 401/403/404); no retry can succeed."""


class RequestFailed(Exception):
    """Every attempt of one request failed (timeouts, HTTP errors, unreadable answers); ``problem`` says why."""


def api_key(env: str, what: str) -> str:
    """The API key in the environment variable ``env``; a UserError naming ``what`` needs it if unset or empty."""
    key = os.environ.get(env)
    if not key:
        raise UserError(f"{what} needs an API key in the environment variable {env} "
                        f"(for a local server without a key: export {env}=EMPTY)")
    return key


async def chat(
    client: openai.AsyncOpenAI,
    model: str,
    messages: list[dict],
    parse: Callable[[Any], T],
    *,
    what: str,
    max_retries: int = 3,
    backoff: float = 1.0,
    slots: asyncio.Semaphore | None = None,
    **sampling: Any,
) -> T:
    """``parse(completion)`` of one chat request, trying up to ``1 + max_retries`` times.

    A timeout, a connection or HTTP error (429, 5xx, other 4xx) or an answer ``parse`` rejects with ValueError
    is retried after ``backoff``, 2x, 4x ... seconds; when every attempt failed, ``RequestFailed`` says why.
    HTTP 401/403/404 mean a wrong key, model or URL, which no retry fixes: ``EndpointRefused`` at once.
    ``slots`` bounds the requests in flight; a request waiting to retry does not hold a slot. ``sampling``
    goes to the request (temperature, max_tokens, top_p, n, extra_body ...). The API key never appears in a
    message, even if a server echoes it.
    """
    import openai

    problem = "no attempt"
    for attempt in range(1 + max_retries):
        if attempt:
            await asyncio.sleep(backoff * 2 ** (attempt - 1))
        async with slots or contextlib.nullcontext():
            try:
                completion = await client.chat.completions.create(model=model, messages=messages, **sampling)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
                raise EndpointRefused(_without_key(
                    client, f"{what} at {client.base_url} (model {model!r}) refused the request: {err}. "
                            "Check the URL, the model name and the API key.")) from None
            except openai.APIError as err:  # timeouts, connection errors, 429, 5xx, other 4xx: worth another try
                problem = f"{type(err).__name__}: {err}"
            else:
                try:
                    return parse(completion)
                except ValueError as err:
                    problem = f"unreadable answer: {err}"
        problem = _without_key(client, problem)
        log.warning("%s: attempt %d/%d failed: %s", what, attempt + 1, 1 + max_retries, problem)
    raise RequestFailed(problem)


def first_choice_text(completion: Any) -> str:
    """The text of a completion's first choice ("" if it has none)."""
    return (completion.choices[0].message.content or "") if completion.choices else ""


def _without_key(client: openai.AsyncOpenAI, text: str) -> str:
    key = client.api_key
    return text.replace(key, "***") if key and key != "EMPTY" else text


def run_async(coroutine: Awaitable[T]) -> T:
    """Run a coroutine to completion in a fresh event loop; an interruption always ends it promptly.

    ``asyncio.run`` turns the first Ctrl-C into a cancellation and then waits, without a limit, for every task
    to wind down. Here the KeyboardInterrupt (raised by ``l2a.cli``'s handlers, or Python's default one)
    propagates at once: pending tasks are cancelled and get ``INTERRUPT_GRACE_SECONDS`` to run their
    ``finally`` blocks (closing files and connections), then the loop is closed whatever they do.
    """
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    except BaseException:
        # The interrupted tasks end with the interruption or a cancellation: nothing to report about them (asyncio
        # would print "Task exception was never retrieved" with a traceback when they are collected).
        loop.set_exception_handler(lambda loop, context: None)
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            with contextlib.suppress(BaseException):  # a second Ctrl-C here only shortens the grace period
                loop.run_until_complete(asyncio.wait(pending, timeout=INTERRUPT_GRACE_SECONDS))
        raise
    finally:
        with contextlib.suppress(BaseException):
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), INTERRUPT_GRACE_SECONDS))
        loop.close()  # also shuts the default executor down, without waiting for its threads
