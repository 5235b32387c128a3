"""The one sentence a depth study supports about degradation, in plain words with its numbers.

Figure 6's point: a deeper plain net has a *higher training error* than a shallower one (the degradation
problem: not overfitting, since the training error itself is worse), and the residual net of the same depth
does not. The sentence is computed from the members' training-error curves and says plainly when the run does
not show it: a reader of a demo or a study must never be told what the data do not say.
"""

from __future__ import annotations

from pipeline.study.runs import MemberRun

# The end of a run's training-error curve: the mean over its last 10% of steps, since one logged value covers
# only ``log_every`` batches (a few hundred images) and jumps by several points from one log to the next.
TAIL = 0.1
# Closer than this (percentage points), two errors are "about the same": the tails still wander this much.
MARGIN = 1.0


def final_train_error(m: MemberRun) -> float | None:
    """The member's training top-1 error (%) at the end of its run: the mean over the last 10% of its steps."""
    curve = m.curves.get("train_top1_error", [])
    if not curve:
        return None
    last = max(s for s, _ in curve)
    tail = [v for s, v in curve if s >= (1 - TAIL) * last]
    return sum(tail) / len(tail)


def degradation_finding(members: list[MemberRun]) -> str | None:
    """'plain-56 ends at X% training error, plain-20 at Y%: ...' for the shallowest and deepest plain nets and
    the residual net as deep as the deepest plain one; None when the study has fewer than two plain depths."""
    ends = [(m, e) for m in members if (e := final_train_error(m)) is not None]
    plain = sorted(((m, e) for m, e in ends if not m.residual), key=lambda me: me[0].depth)
    if len(plain) < 2 or plain[0][0].depth == plain[-1][0].depth:
        return None
    (shallow, e_shallow), (deep, e_deep) = plain[0], plain[-1]
    head = f"{deep.label} ends at {e_deep:.1f}% training error, {shallow.label} at {e_shallow:.1f}%"
    if e_deep <= e_shallow + MARGIN:
        return f"{head}: the deeper plain net is not worse, so this run does not show the degradation problem."
    text = f"{head}: the deeper plain net is worse, the degradation problem."
    res = next(((m, e) for m, e in ends if m.residual and m.depth == deep.depth), None)
    if res is None:
        return text
    net, e_res = res
    if e_res + MARGIN < e_deep:
        return f"{text} {net.label} ends at {e_res:.1f}%: the shortcuts remove it."
    return f"{text} {net.label} ends at {e_res:.1f}%, no better: this run does not show the shortcuts' cure."
