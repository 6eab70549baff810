"""Whether search can answer, as one state machine: the engine reports what happened (a check, a run, a swap)
through the named transitions, and asks `ensure` before every request.

    from        transition                          to
    Unchecked   ensure (a request arrives)          Checking
    Checking    checked_ok / check_failed           Ready / Unchecked
    Ready       verified_mismatch                   Unchecked
    any         start_indexing(serving=False)       Indexing
    Failed      start_indexing(serving=True)        Ready (a swap's version) or Unchecked
    Indexing    indexing_finished / _cancelled      Ready (with the version a swap made current) or Unchecked
    Indexing    indexing_failed                     Failed
    any         swapped                             Ready; Indexing and Failed keep the version for later

Beside that state, in a region of its own: whether a background run goes (its progress, blocking search or
not), the ids deleted meanwhile (a swap replays them onto the next index) and why the last run failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from services.common.errors import IndexNotReadyError, StoreMismatchError
from services.common.status import IndexProgress, Status


@dataclass(frozen=True)
class Unchecked:
    """Nothing is known (at start, after a run that blocked search, after the index moved): the next request
    checks."""


@dataclass(frozen=True, eq=False)
class Checking:
    """A check runs; requests arriving meanwhile share its outcome instead of starting checks of their own."""

    task: asyncio.Task[str]


@dataclass(frozen=True)
class Ready:
    """Embedder and store agree on `model_version`, and the index holds documents: search answers."""

    model_version: str


@dataclass(frozen=True)
class Indexing:
    """A run fills the index: search answers 503 `indexing` with the progress until it ends. `model_version`
    is the one a swap made current meanwhile (search is ready with it when the run ends; None: checked then)."""

    progress: IndexProgress
    model_version: str | None = None


@dataclass(frozen=True)
class Failed:
    """The run that blocked search failed: search answers 503 `failed` with the reason until another run
    starts. `model_version` as for `Indexing`."""

    reason: str
    model_version: str | None = None


State = Unchecked | Checking | Ready | Indexing | Failed


class Readiness:
    """The readiness of one engine. `check()` finds out whether the index can be searched (its model version,
    or the reason it cannot as a `CbirError`); `verify(model_version)` raises `StoreMismatchError` once the
    index is no longer the one served for it.

    >>> readiness = Readiness(check=engine_check, verify=store.verify)
    >>> model_version = await readiness.ensure(verify_every_s=5.0)  # or raises why search cannot answer
    """

    def __init__(self, *, check: Callable[[], Awaitable[str]], verify: Callable[[str], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._check, self._verify, self._clock = check, verify, clock
        self.state: State = Unchecked()
        self._verified_at = clock()  # when a ready index was last verified (construction counts)
        self._background: IndexProgress | None = None  # set while any background run goes
        self._deleted: set[str] = set()  # ids deleted since the last run began: replayed on a swap
        self.last_failure: str | None = None  # why the last background run failed (None: it did not)

    # -- what is known --------------------------------------------------------------------------

    @property
    def model_version(self) -> str | None:
        """The model version searched (or, while a run blocks search, searched once it ends); None while
        unknown."""
        return None if isinstance(self.state, Unchecked | Checking) else self.state.model_version

    @property
    def progress(self) -> IndexProgress | None:
        """The running background job's progress, blocking search or not."""
        return self._background

    @property
    def deleted_meanwhile(self) -> frozenset[str]:
        """The ids deleted while the last background run went (kept until the next one starts)."""
        return frozenset(self._deleted)

    def refusal(self) -> IndexNotReadyError | None:
        """Why search cannot answer, when a run decides it without asking embedder or store."""
        match self.state:
            case Indexing(progress=progress):
                return IndexNotReadyError(progress.describe(), status=Status.indexing,
                                          progress={"indexed": progress.indexed, "total": progress.total})
            case Failed(reason=reason):
                return IndexNotReadyError(reason, status=Status.failed)
        return None

    # -- asking ---------------------------------------------------------------------------------

    async def ensure(self, *, verify_every_s: float) -> str:
        """The model version searched; raises the reason (503 or 409) while search cannot answer. A ready
        index is verified when the last verification is more than `verify_every_s` old."""
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
        state = self.state
        if isinstance(state, Ready):
            if self._clock() - self._verified_at > verify_every_s:
                await self._verify_ready(state.model_version)
            return state.model_version
        if not isinstance(state, Checking) or state.task.done():
            state = self._start_check()
        # Shielded: a request that goes away does not cancel the check the others wait for, so with the
        # embedder down each still gets its 503 within one embedder timeout.
        return await asyncio.shield(state.task)

    def _start_check(self) -> Checking:
        task = asyncio.create_task(self._checked(self._check()), name="readiness check")
        task.add_done_callback(_consume_exception)
        self.state = checking = Checking(task)
        return checking

    async def _checked(self, check: Awaitable[str]) -> str:
        try:
            model_version = await check
        except BaseException:
            self.check_failed()
            raise
        self.checked_ok(model_version)
        return model_version

    async def _verify_ready(self, model_version: str) -> None:
        self._verified_at = self._clock()  # one request verifies; the others go on meanwhile
        try:
            await self._verify(model_version)
        except StoreMismatchError:
            self.verified_mismatch(model_version)  # the next check says why (409)
            raise

    # -- transitions ----------------------------------------------------------------------------

    def checked_ok(self, model_version: str) -> None:
        """The check found the index servable. A check that ends after a run began or a swap says nothing
        about what is searched now: ignored then."""
        if isinstance(self.state, Checking):
            self.state = Ready(model_version)

    def check_failed(self) -> None:
        """The check raised: the next request checks again (so search recovers by itself)."""
        if isinstance(self.state, Checking):
            self.state = Unchecked()

    def verified_mismatch(self, model_version: str) -> None:
        """The index is no longer the one served for `model_version` (an Elasticsearch alias moved)."""
        if self.state == Ready(model_version):
            self.state = Unchecked()

    def start_indexing(self, progress: IndexProgress, *, serving: bool) -> None:
        """A background run begins: with `serving`, search goes on as it is; without, it waits for the run."""
        self._background, self._deleted = progress, set()
        if not serving:
            self.state = Indexing(progress)
        elif isinstance(self.state, Failed):
            self.state = _searched(self.state.model_version)

    def indexing_finished(self) -> None:
        self.last_failure = None
        self.indexing_cancelled()

    def indexing_cancelled(self) -> None:
        """The run ended without an outcome (shutdown): search is as if it had finished, its last failure kept."""
        self._background = None
        if isinstance(self.state, Indexing):
            self.state = _searched(self.state.model_version)

    def indexing_failed(self, reason: str) -> None:
        """The run failed: a run that blocked search leaves it `failed`; one that did not is only reported
        (`last_failure`)."""
        self._background, self.last_failure = None, reason
        if isinstance(self.state, Indexing):
            self.state = Failed(reason, self.state.model_version)

    def swapped(self, model_version: str) -> None:
        """A new pair (embedder and complete index) is searched from now on."""
        if isinstance(self.state, Indexing | Failed):
            self.state = replace(self.state, model_version=model_version)
        else:
            self.state = Ready(model_version)

    def deleted(self, id: str) -> None:
        """A document was deleted: remembered for the swap when a background run goes."""
        if self._background is not None:
            self._deleted.add(id)


def _searched(model_version: str | None) -> Ready | Unchecked:
    return Unchecked() if model_version is None else Ready(model_version)


def _consume_exception(task: asyncio.Task[str]) -> None:
    # Every waiting request re-raises the failure; this only keeps asyncio from reporting it as
    # "never retrieved" when all of them went away first.
    if not task.cancelled():
        task.exception()
