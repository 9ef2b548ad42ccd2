"""Block-length schedules: which γ each SPEED step runs at, where an artifact carries step graphs for several.

Every step is exact whatever its γ (greedy tokens are the primary's; sampled tokens follow its distribution), so a
schedule decides speed only. What pays is the machine's: a step at γ yields 1 + accepted drafts and costs γ drafts
plus a verify of γ + 1 rows, whose price per row depends on where the primary is bound (docs/training.md, "What
SPEED needs on this machine"); and γ = 0, a primary step that keeps the drafter's cache current, is the right
choice wherever drafts are mostly rejected. `Measured` learns both from the decode it runs instead of from a
table made on another machine.

A schedule is asked `next()` before each step and told what the step did with `observe`.
"""

from __future__ import annotations

import numpy as np


class Fixed:
    """One block length throughout: the artifact's default, or the one asked for."""

    def __init__(self, gamma: int):
        self.gammas = (gamma,)

    def next(self) -> int:
        return self.gammas[0]

    def observe(self, gamma: int, drafted, accepted, seconds: float) -> None:
        pass


class Cycle:
    """Each block length in turn: what verification runs, so that every step graph, and every switch from one to
    another, is checked against the reference on the same schedule."""

    def __init__(self, gammas):
        self.gammas = tuple(gammas)
        self._calls = 0

    def next(self) -> int:
        gamma = self.gammas[self._calls % len(self.gammas)]
        self._calls += 1
        return gamma

    def observe(self, gamma: int, drafted, accepted, seconds: float) -> None:
        pass


class StepTimes:
    """Measured wall time of a step at each γ: a property of the machine and the artifact, not of one request, so
    a runtime keeps one per cache length across requests (`Measured` starts from it instead of measuring again).
    Each γ's time is the least of its last `window` timed calls: on a shared host a call only ever runs slower
    than the machine can, and one slow sample must not keep a γ out."""

    WARM_UP = 2  # calls per graph not timed: ONNX Runtime binds each of the two state buffer sets on first use

    def __init__(self, window: int = 8):
        self.window = window
        self.samples: dict[int, list[float]] = {}
        self.calls: dict[int, int] = {}
        self.last: dict[int, int] = {}  # the step count at each γ's latest call
        self.steps = 0

    @property
    def seconds(self) -> dict[int, float]:
        return {g: min(s) for g, s in self.samples.items()}

    def add(self, gamma: int, seconds: float) -> None:
        self.steps += 1
        self.last[gamma] = self.steps
        self.calls[gamma] = self.calls.get(gamma, 0) + 1
        if self.calls[gamma] > self.WARM_UP:
            self.samples[gamma] = (self.samples.get(gamma, []) + [seconds])[-self.window:]

    def stale(self, gammas, after: int) -> list[int]:
        """The block lengths not timed yet, or not run for `after` steps: a time measured while the host was busy
        would otherwise keep its γ out for good."""
        return [g for g in gammas if g not in self.samples or self.steps - self.last[g] >= after]


class Measured:
    """Before each step, the γ with the most expected tokens per second: E(γ) / T(γ), where T is the measured
    wall time of a step at γ and E(γ) = 1 + α + … + α^γ the expected tokens of a step whose drafts are accepted
    one by one with probability α until the first rejection.

    α is estimated from the recent steps (each draft accepted, each step stopped by a rejection, weighted by
    `decay` per step: a stretch of boilerplate lifts it, prose brings it down), afresh for each request. T comes
    from `times` (StepTimes, which a runtime keeps across requests); a γ not yet timed, or not run for
    `retime_every` steps, runs next. γ = 0 drafts nothing, so α is not seen while it runs: after `probe_every`
    such steps in a row, one step at the smallest γ > 0 looks again. Decisions follow measured time, so with
    sampling a seed fixes the tokens only at a fixed block length; greedy tokens are the primary's either way.
    """

    def __init__(self, gammas, times: StepTimes | None = None, decay: float = 0.9, probe_every: int = 8,
                 retime_every: int = 32, prior_accepted: float = 1.0, prior_rejected: float = 1.0):
        self.gammas = tuple(sorted(gammas))
        self.times = times if times is not None else StepTimes()
        self.decay, self.probe_every, self.retime_every = decay, probe_every, retime_every
        self._accepted, self._rejected = prior_accepted, prior_rejected  # weighted counts behind α
        self._idle = 0  # consecutive γ = 0 steps

    @property
    def acceptance(self) -> float:
        return self._accepted / (self._accepted + self._rejected)

    def expected_tokens(self, gamma: int) -> float:
        alpha = self.acceptance
        return float(sum(alpha ** i for i in range(gamma + 1)))

    def next(self) -> int:
        stale = self.times.stale(self.gammas, self.retime_every)
        if stale:
            return stale[0]
        seconds = self.times.seconds
        drafting = [g for g in self.gammas if g > 0]
        if self._idle >= self.probe_every and drafting:
            return drafting[0]
        return max(self.gammas, key=lambda g: self.expected_tokens(g) / seconds[g])

    def observe(self, gamma: int, drafted, accepted, seconds: float) -> None:
        """`drafted`, `accepted`: per active row of the step; `seconds`: its wall time."""
        self.times.add(gamma, seconds)
        self._idle = self._idle + 1 if gamma == 0 else 0
        drafted, accepted = np.asarray(drafted), np.asarray(accepted)
        if gamma == 0 or drafted.size == 0 or not drafted.any():
            return
        self._accepted = self.decay * self._accepted + float(accepted.sum())
        self._rejected = self.decay * self._rejected + float((accepted < drafted).sum())


def make(spec, gammas, default: int, times: StepTimes | None = None):
    """A schedule from what a caller asks for: None or "auto" (`Measured`, from `times`, where there are several
    block lengths; else the default γ), a block length the artifact has, or a schedule object."""
    from tandemc.errors import TandemcError

    if spec is None or spec == "auto":
        return Measured(gammas, times) if len(gammas) > 1 else Fixed(default)
    if isinstance(spec, str):
        try:
            spec = int(spec)
        except ValueError:
            raise TandemcError(f"block length must be 'auto' or one of {', '.join(map(str, gammas))}, got "
                               f"{spec!r}") from None
    if isinstance(spec, (int, np.integer)):
        if int(spec) not in gammas:
            raise TandemcError(f"this artifact has step graphs for block lengths {', '.join(map(str, gammas))}, not "
                               f"{spec}; re-export with --block-lengths to add it")
        return Fixed(int(spec))
    if not set(spec.gammas) <= set(gammas):
        raise TandemcError(f"the schedule runs block lengths {spec.gammas} but only {gammas} are available")
    return spec
