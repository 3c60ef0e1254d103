"""How sure an answer is: temperatures that calibrate it, the modules' disagreement, and the exit
rule of adaptive budgets. Pure numpy: the exporter fits on the validation split, the runtime
applies, `quorum calibration` and `quorum ood` report.

- Calibration: a temperature T_b per number of modules combined, fitted at the stage lengths
  on the validation prefixes of the anytime order and interpolated between them. Dividing the
  mean logits by T changes no label.
- Uncertainty, from the modules actually used: the entropy of the served (calibrated)
  distribution; the mutual information between label and module, H(mean_j p_j) - mean_j H(p_j),
  the part of the uncertainty that is the modules' disagreement; the share of the modules
  whose own argmax is the served label; and p_correct, the chance the label is right, read off
  a per-stage map of the calibrated top probability fitted on validation (isotonic regression).
  A temperature cannot make a lone module of a high-λ ensemble calibrated: its accuracy rises far
  more slowly than its confidence, which needs flattening at the top and sharpening at the bottom
  at once; the map bends where it must (docs/RESULTS.md, "Calibration").
- Adaptive budgets: the anytime order runs in stages (prefix lengths 1, 2, 4, ..., 32, 48, 64, 96,
  ..., M: powers of two, and from 32 on the points halfway between them as well); an input
  leaves after a stage once its exit signal reaches the stage's threshold. The signal (PESSIMISTIC)
  is the calibrated probability of the prefix's label once its lead over the runner-up is lowered
  by one standard error of that lead as an estimate of the whole order's: the modules' disagreement
  about the two classes in question counts against leaving. The exporter picks the thresholds, one
  set per tolerance, on the validation split: at each stage, the lowest at which the inputs with
  that signal agree with the whole order often enough. Bundles of schema versions 4 and 5 exit on
  the calibrated top probability itself (TOP_PROBABILITY) and still do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_TOLERANCE",
    "EXIT_SIGNALS",
    "FINE_FROM",
    "NEVER",
    "PESSIMISTIC",
    "RATES",
    "SIGNAL",
    "STANDARD_TOLERANCES",
    "TOP_PROBABILITY",
    "MemberSums",
    "Uncertainty",
    "adaptive_exits",
    "choose_thresholds",
    "correctness_at",
    "doubling_lengths",
    "exit_signal",
    "expected_calibration_error",
    "fit_temperatures",
    "lead_error",
    "negative_log_likelihood",
    "pessimistic",
    "prefix_errors",
    "prefix_means",
    "prefix_signals",
    "reliability",
    "stage_lengths",
    "stage_signals",
    "stage_thresholds",
    "temperature_at",
    "tempered_softmax",
    "top_label_ece",
    "uncertainty",
]

TOP_PROBABILITY = "calibrated top probability"  # the exit signal of bundles of schema versions 4 and 5
PESSIMISTIC = "calibrated top probability, its lead less one standard error"  # what the exporter fits
EXIT_SIGNALS = (TOP_PROBABILITY, PESSIMISTIC)
SIGNAL = PESSIMISTIC
STANDARD_TOLERANCES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)  # accuracy given up against all M
DEFAULT_TOLERANCE = 0.001  # budget=auto without a tolerance: within 0.1 point of the whole ensemble
_EPS = 1e-12
NEVER = 2.0  # a threshold no probability reaches: the stage lets no input leave


def doubling_lengths(m: int) -> list[int]:
    """1, 2, 4, ... below m, then m: the budgets `quorum calibration` reports."""
    lengths, b = [], 1
    while b < m:
        lengths.append(b)
        b *= 2
    return [*lengths, m]


FINE_FROM = 32  # stages from here on also stop halfway between powers of two


def stage_lengths(m: int) -> list[int]:
    """The prefix lengths adaptive budgets stop at: 1, 2, 4, ..., 32, then 48, 64, 96, 128, 192, ...
    below m, then m.

    Above FINE_FROM an input that needs one module more than a stage pays for as many modules again
    when stages double; the midpoints halve that. Below it a stage costs little and more stages only
    add thresholds to fit (docs/RESULTS.md, "Adaptive budgets").
    """
    lengths = []
    for b in doubling_lengths(m)[:-1]:
        lengths.append(b)
        if b >= FINE_FROM and b * 3 // 2 < m:
            lengths.append(b * 3 // 2)
    return [*lengths, m]


def tempered_softmax(z: np.ndarray, temperature: float | np.ndarray = 1.0) -> np.ndarray:
    """softmax(z / T) over the last axis, in z's float type; T a scalar or one per row."""
    t = np.asarray(temperature, dtype=z.dtype)
    s = z / (t[..., None] if t.ndim else t)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats over the last axis."""
    return -(p * np.log(np.maximum(p, _EPS))).sum(axis=-1)


@dataclass
class MemberSums:
    """Sums over modules of what the uncertainty and the exit signal need, additive across stages and
    shards: member probabilities (N, K), member entropies (N,), argmax votes (N, K), and, where the exit
    signal needs them (budget=auto), the products of each member's logits less its largest, s s^T
    (N, K, K) in float64, whose entries give the spread of the modules' gap between any two classes
    (`lead_error`); None where not summed."""

    probabilities: np.ndarray
    entropy: np.ndarray
    votes: np.ndarray
    squares: np.ndarray | None = None

    @classmethod
    def of(cls, members: np.ndarray, *, classes_first: bool = False, squares: bool = False) -> MemberSums:
        """The sums of member logits (b, N, K), or (b, K, N) with `classes_first`, in few numpy calls
        (they run on every request). Reductions over K run over (b, K, N): a reduction over a last
        axis of 10 costs numpy several times more.

        With s = eta - max eta and Z = sum exp(s): H(p) = log Z - sum_k p_k s_k, one log per member
        and input rather than one per class. A vote goes to every class at the member's maximum.
        With `squares`, the products s s^T too, by one batched matrix product (b N K^2 multiplications:
        at batch 1 a few microseconds, at 256 modules and 1,000 inputs about 13 ms, so only on request)."""
        m = members if classes_first else np.ascontiguousarray(members.transpose(0, 2, 1))  # (b, K, N)
        s = m - m.max(axis=1, keepdims=True)  # <= 0
        top = s == 0
        products = None
        if squares:
            by_input = s.astype(np.float64).transpose(2, 1, 0)  # (N, K, b)
            products = np.matmul(by_input, by_input.transpose(0, 2, 1))
        e = np.exp(s)
        z = e.sum(axis=1)  # (b, N)
        e /= z[:, None, :]  # member probabilities
        entropy = np.log(z).sum(axis=0) - np.einsum("bkn,bkn->n", e, s)
        return cls(
            np.ascontiguousarray(e.sum(axis=0).T),
            entropy.astype(np.float32),
            np.ascontiguousarray(top.sum(axis=0, dtype=np.float32).T),
            products,
        )

    @classmethod
    def zeros(cls, n: int, k: int, *, squares: bool = False) -> MemberSums:
        return cls(
            np.zeros((n, k), np.float32),
            np.zeros(n, np.float32),
            np.zeros((n, k), np.float32),
            np.zeros((n, k, k)) if squares else None,
        )

    def plus(self, other: MemberSums) -> MemberSums:
        """The sums of both (of the same inputs); the products only where both have them."""
        both = MemberSums.total([self, other])
        assert both is not None
        return both

    def rows(self, start: int, stop: int) -> MemberSums:
        """The sums of inputs start..stop-1."""
        return MemberSums(
            self.probabilities[start:stop],
            self.entropy[start:stop],
            self.votes[start:stop],
            None if self.squares is None else self.squares[start:stop],
        )

    @classmethod
    def total(cls, parts: list[MemberSums | None]) -> MemberSums | None:
        """The sums of all parts (of the same inputs); None when a part's are not known, and no products
        when a part has none."""
        if not parts or any(p is None for p in parts):
            return None
        known = [p for p in parts if p is not None]
        squares = [p.squares for p in known if p.squares is not None]
        return cls(
            np.add.reduce([p.probabilities for p in known]),
            np.add.reduce([p.entropy for p in known]),
            np.add.reduce([p.votes for p in known]),
            np.add.reduce(squares) if len(squares) == len(known) else None,
        )

    def add(self, other: MemberSums, rows: np.ndarray | None = None) -> None:
        """Add `other` (of the inputs `rows`, or all) into these sums; the products stop being known
        where `other` has none."""
        pairs = [(self.probabilities, other.probabilities), (self.entropy, other.entropy), (self.votes, other.votes)]
        if self.squares is not None and other.squares is not None:
            pairs.append((self.squares, other.squares))
        else:
            self.squares = None
        for mine, theirs in pairs:
            if rows is None:
                mine += theirs
            else:
                mine[rows] += theirs


@dataclass
class Uncertainty:
    """Per input (N,): how far to trust the answer."""

    entropy: np.ndarray  # of the served distribution, nats
    mutual_information: np.ndarray | None  # nats: the modules' disagreement, 0 when they all agree (None: unknown)
    vote_share: np.ndarray | None  # of the modules used, the share whose own argmax is the served label
    p_correct: np.ndarray | None = None  # the chance the label is right (None: the bundle has no map fitted)


def uncertainty(
    probabilities: np.ndarray,
    labels: np.ndarray,
    sums: MemberSums | None,
    used: np.ndarray,
    p_correct: np.ndarray | None = None,
) -> Uncertainty:
    """The uncertainty of answers `probabilities` (N, K) with `labels` (N,), from the sums over the
    `used` (N,) modules of each input (None: the members are not known, only the entropy is), with
    the chance `p_correct` (N,) each is right where known."""
    if sums is None:
        return Uncertainty(_entropy(probabilities).astype(np.float32), None, None, p_correct)
    b = np.maximum(used, 1).astype(np.float32)
    both = _entropy(np.stack([probabilities, sums.probabilities / b[:, None]]))  # (2, N): served, mean member
    rows = np.arange(len(labels))
    mi = both[1] - sums.entropy / b
    return Uncertainty(
        entropy=both[0].astype(np.float32),
        # below 1e-6 nats is float32 rounding of two equal entropies (one module, or all agreeing)
        mutual_information=np.where(mi > 1e-6, mi, 0.0).astype(np.float32),
        vote_share=(sums.votes[rows, labels] / b).astype(np.float32),
        p_correct=p_correct,
    )


def correctness_at(
    lengths: Sequence[int], maps: Sequence[tuple[np.ndarray, np.ndarray]], b: int | np.ndarray, top: np.ndarray
) -> np.ndarray:
    """The chance (N,) float32 that answers of b modules (one count, or one per input) with calibrated
    top probability `top` (N,) are right: each stage's map (knots top, right) at the stage lengths,
    interpolated linearly in log b between the two stages around b."""
    top = np.asarray(top, np.float64)
    pos = np.interp(
        np.log(np.broadcast_to(np.asarray(b, np.float64), top.shape)), np.log(lengths), np.arange(len(lengths))
    )
    lo = np.floor(pos).astype(np.int64)
    out = np.empty(top.shape, np.float64)
    for s in np.unique(lo).tolist():
        rows = lo == s
        x, w = top[rows], pos[rows] - s
        above = np.interp(x, *maps[min(s + 1, len(maps) - 1)]) if (w > 0).any() else 0.0
        out[rows] = (1 - w) * np.interp(x, *maps[s]) + w * above
    return out.astype(np.float32)


def lead_error(mean: np.ndarray, count: np.ndarray, squares: np.ndarray, whole: int) -> tuple[np.ndarray, np.ndarray]:
    """Per input, the label a (N,) of the mean logits `mean` (N, K) of `count` (N,) modules, and the standard
    error (N,) of its lead over the runner-up b as an estimate of the same lead over all `whole` modules of
    the order.

    Each module's own lead d_j = eta_ja - eta_jb has the mean lead as its mean and s_aa + s_bb - 2 s_ab of
    `squares` (N, K, K) (`MemberSums`; the shift of each member's logits cancels) as its sum of squares. The
    count modules are taken as drawn from the whole order without replacement: the standard error is
    sd(d) / sqrt(count) * sqrt((whole - count) / (whole - 1)), nothing for one module (no spread to measure)
    or for all of them."""
    mean = np.asarray(mean, np.float64)
    rows = np.arange(len(mean))
    a = mean.argmax(axis=1)
    others = mean.copy()
    others[rows, a] = -np.inf
    b = others.argmax(axis=1)
    lead = mean[rows, a] - mean[rows, b]
    n = np.asarray(count, np.float64)
    sum_sq = squares[rows, a, a] + squares[rows, b, b] - 2 * squares[rows, a, b]
    spread = np.maximum(sum_sq - n * lead * lead, 0.0) / np.maximum(n - 1, 1)  # sd(d)^2
    drawn = np.clip((whole - n) / max(whole - 1, 1), 0.0, 1.0)  # the finite-population correction
    error = np.where(n >= 2, np.sqrt(spread / np.maximum(n, 1) * drawn), 0.0)
    return a, error


def exit_signal(
    signal: str,
    mean: np.ndarray,
    count: np.ndarray,
    temperature: np.ndarray,
    squares: np.ndarray | None,
    whole: int,
) -> np.ndarray:
    """Each input's exit signal (N,) after a stage: mean logits (N, K) of `count` (N,) modules, their
    temperatures (N,) and members' `squares` (N, K, K), of an order of `whole` modules.

    TOP_PROBABILITY: the calibrated top probability. PESSIMISTIC: the calibrated probability of the same
    label with its logit lowered by `lead_error`, as if its lead over the runner-up were one standard error
    smaller; the top probability itself where the members' squares are not known (None)."""
    if signal == TOP_PROBABILITY or squares is None:
        return pessimistic(mean, np.zeros(len(mean)), temperature)
    return pessimistic(mean, lead_error(mean, count, squares, whole)[1], temperature)


def pessimistic(mean: np.ndarray, error: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """The calibrated probability (N,) of the label of mean logits (N, K) once its logit is lowered by
    `error` (N,) (at temperature T, a scalar or one per input); with no error, the top probability."""
    lowered = np.array(mean, np.float64)
    rows = np.arange(len(lowered))
    label = lowered.argmax(axis=1)
    lowered[rows, label] -= error
    chance: np.ndarray = tempered_softmax(lowered, temperature)[rows, label]
    return chance


# ---------------------------------------------------------------- fitting and measuring (offline)


def prefix_means(logits: np.ndarray, order: Sequence[int], lengths: Sequence[int]) -> np.ndarray:
    """Mean logits (L, N, K) of the prefixes of `order` of the given (increasing) lengths, from
    logits (N, M, K): one running sum in float64, a chunk of modules at a time."""
    order = list(order)
    total = np.zeros((logits.shape[0], logits.shape[2]))
    out, done = [], 0
    for b in lengths:
        total += logits[:, order[done:b]].sum(axis=1, dtype=np.float64)
        out.append(total / b)
        done = b
    return np.stack(out)


def prefix_errors(logits: np.ndarray, order: Sequence[int], lengths: Sequence[int]) -> np.ndarray:
    """The standard error (L, N) of each prefix's lead (`lead_error`) for the prefixes of `order` of the given
    (increasing) lengths, from logits (N, M, K), as the runtime's stages compute it: running sums of the logits
    and of the members' products (`MemberSums`), a chunk of modules at a time."""
    order = list(order)
    n, _, k = logits.shape
    total, squares = np.zeros((n, k)), np.zeros((n, k, k))
    out, done = [], 0
    for b in lengths:
        chunk = np.asarray(logits[:, order[done:b]], np.float64)  # (N, c, K)
        total += chunk.sum(axis=1)
        s = chunk - chunk.max(axis=2, keepdims=True)
        squares += np.matmul(s.transpose(0, 2, 1), s)
        out.append(lead_error(total / b, np.full(n, b), squares, len(order))[1])
        done = b
    return np.stack(out)


def stage_signals(
    means: np.ndarray, errors: np.ndarray | None, temperatures: Sequence[float] | np.ndarray, signal: str = SIGNAL
) -> tuple[np.ndarray, np.ndarray]:
    """The exit signal (S, N) and label (S, N) of each stage's mean logits `means` (S, N, K), at its
    temperature, with the standard errors of its leads `errors` (S, N) (`prefix_errors`; PESSIMISTIC only)."""
    if signal == PESSIMISTIC and errors is None:
        raise ValueError(f"the signal {signal!r} needs the standard errors of the leads")
    zero = np.zeros(means.shape[1])
    values = [
        pessimistic(z, zero if signal == TOP_PROBABILITY or errors is None else errors[i], t)
        for i, (z, t) in enumerate(zip(means, np.asarray(temperatures, np.float64), strict=True))
    ]
    return np.stack(values), means.argmax(axis=2)


def prefix_signals(
    logits: np.ndarray,
    order: Sequence[int],
    lengths: Sequence[int],
    temperatures: Sequence[float] | np.ndarray,
    signal: str = SIGNAL,
) -> tuple[np.ndarray, np.ndarray]:
    """The exit signal (L, N) and label (L, N) of the prefixes of `order` of the given (increasing) lengths
    and their temperatures, from logits (N, M, K), as the runtime's stages compute them."""
    errors = prefix_errors(logits, order, lengths) if signal == PESSIMISTIC else None
    return stage_signals(prefix_means(logits, order, lengths), errors, temperatures, signal)


def fit_temperatures(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The temperature T >= 1 of each row of mean logits z (L, N, K) that minimizes the expected
    calibration error against labels y (N,): a log-spaced grid from 1 to 30, then a finer one
    around the best.

    ECE rather than NLL: a lone module of a high-λ ensemble is miscalibrated in a way no
    temperature fixes, and the NLL-optimal one there makes the top probability worse. T >= 1:
    the validation split also chose the checkpoint, so it flatters the ensemble, and sharpening
    fitted on it does not carry over to new inputs (docs/RESULTS.md).
    """
    z = np.asarray(z, np.float64)
    gap = z - z.max(axis=2, keepdims=True)  # (L, N, K), <= 0
    correct = (z.argmax(axis=2) == np.asarray(y)[None]).astype(np.float64)  # (L, N)
    chosen = np.empty(z.shape[0])
    for i in range(z.shape[0]):
        best = (np.inf, 1.0)
        for grid in (np.geomspace(1.0, 30.0, 31), None):
            if grid is None:  # a finer grid between the best coarse point's neighbours
                grid = np.maximum(best[1] * np.geomspace(0.89, 1.12, 21), 1.0)
            for t in grid:
                best = min(best, (top_label_ece(1.0 / np.exp(gap[i] / t).sum(axis=1), correct[i]), float(t)))
        chosen[i] = best[1]
    return chosen


def temperature_at(lengths: Sequence[int], temperatures: Sequence[float], b: int | np.ndarray) -> np.ndarray:
    """The temperature for b modules: log T interpolated linearly in log b between the fitted lengths."""
    return np.exp(np.interp(np.log(np.asarray(b, np.float64)), np.log(lengths), np.log(temperatures)))


def top_label_ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE of answers with these confidences (N,) and correctness (N,): the count-weighted mean
    |accuracy - confidence| over equal-width confidence bins."""
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.bincount(which, correct - confidence, bins)
    return float(np.abs(gap).sum() / count.sum())


def negative_log_likelihood(p: np.ndarray, y: np.ndarray) -> float:
    """Mean NLL (nats) of labels y under probabilities p (N, K)."""
    return float(-np.log(np.maximum(p[np.arange(len(y)), y], _EPS)).mean())


def reliability(
    p: np.ndarray, y: np.ndarray, bins: int = 15, confidence: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin of equal width: mean confidence, accuracy and count (empty bins: NaN, 0) of
    the answers p (N, K) to labels y; the confidence is the top probability unless given (N,)."""
    confidence = p.max(axis=1) if confidence is None else confidence
    correct = p.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, confidence, bins) / count
        acc = np.bincount(which, correct.astype(float), bins) / count
    return conf, acc, count


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    return top_label_ece(p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64), bins)


def adaptive_exits(top: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """The stage (index) each input leaves after, given its exit signal at each stage `top` (S, N)
    and the thresholds of all stages but the last (which every input leaves)."""
    n = top.shape[1]
    leaves = np.vstack([top[:-1] >= np.asarray(thresholds, top.dtype)[:, None], np.ones((1, n), bool)])
    exits: np.ndarray = leaves.argmax(axis=0)
    return exits


def stage_thresholds(top: np.ndarray, labels: np.ndarray, rates: Sequence[float]) -> list[list[float]]:
    """For each rate: per stage but the last, the lowest threshold on the exit signal `top` (S, N)
    at which the inputs with at least that signal disagree with the last stage's labels (S, N) at
    most that rate of the time (each stage's own evidence of when its answer is the whole order's)."""
    out: list[list[float]] = [[] for _ in rates]
    for s in range(len(top) - 1):
        o = np.argsort(-top[s], kind="stable")
        disagree = np.cumsum(labels[s][o] != labels[-1][o]) / np.arange(1, len(o) + 1)
        # the last position at which the running rate is within each rate
        last = np.maximum.accumulate(
            np.where(disagree[None] <= np.asarray(rates)[:, None], np.arange(len(o)), -1), axis=1
        )[:, -1]
        for i, k in enumerate(last.tolist()):
            out[i].append(float(top[s][o][k]) if k >= 0 else NEVER)
    return out


RATES = (0.0, *np.geomspace(1e-4, 0.3, 60).tolist())  # the disagreement rates tried, per tolerance


def choose_thresholds(
    top: np.ndarray, labels: np.ndarray, y: np.ndarray, lengths: Sequence[int], tolerance: float
) -> tuple[list[float], float, float]:
    """The stage thresholds that use the fewest modules on average while the accuracy stays within
    `tolerance` of the last stage's (the whole order's), among `stage_thresholds` of each rate.

    Args:
        top: the exit signal at each stage (S, N), on the validation split.
        labels: each stage's label (S, N); y: the true labels (N,).
        lengths: the stages' prefix lengths (S,).

    Returns (thresholds, accuracy, mean modules) on these inputs.
    """
    correct = labels == np.asarray(y)[None]
    target = correct[-1].mean() - tolerance - 1e-12
    lengths_arr = np.asarray(lengths, np.float64)
    rows = np.arange(top.shape[1])
    best = ([NEVER] * (len(lengths) - 1), float(correct[-1].mean()), float(lengths_arr[-1]))
    for thresholds in stage_thresholds(top, labels, RATES):
        exits = adaptive_exits(top, thresholds)
        accuracy, modules = float(correct[exits, rows].mean()), float(lengths_arr[exits].mean())
        if accuracy >= target and modules < best[2]:
            best = (thresholds, accuracy, modules)
    return best
