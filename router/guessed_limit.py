"""How the cost policy weighs a batch limit that no replica has confirmed by queueing, for a
request whose prefix the replica holds (vllm_fleet.router.balancer.request_cost).

Until a replica queues for slots, its batch limit is only the most it has been seen running,
which at moderate load is 3 or 4 on a replica that runs 16. Priced as a sure queue, that guess
outweighed the certain saving of a cached prefix whenever its holder ran at its peak, and sent
the request to a replica that computed (and duplicated) the prefix (scenario 8: 5-15 % of
requests, most of the gap to the best possible hit rate; in scenario 9, 75 of 138). Two things
temper it where the replica holds part of the prompt:

- the guessed queue is weighed by the square of the share of the prompt the replica must
  compute: a request sharing a few blocks (share ~1) still counts it in full, a conversation's
  next turn (share ~0.3: its new message and the reply the index cannot see) almost not.
  Weighed by the share itself, scenario 9 stayed at 87 % of the best possible hit rate; by its
  square, 92 %;
- the guess is at least the most any replica of the fleet has been seen running (replicas of
  one fleet mostly share max_num_seqs, as fleet_defaults assumes for measured limits): the
  holder of a conversation is not priced as full at 3 because it has not run 4 yet while its
  neighbours have (scenario 9: figures in bench/findings.md, issue 17 session 24).

The peak rises as the holder runs more; once a replica really queues
(vllm_fleet.router.speed learns the limit), the full price applies again, and that is what
spreads a hot prefix. Without a cached prefix nothing changes (scenarios 1-3): a fresh
router's guess still spreads a burst over the fleet instead of stacking it on the fast
replicas beyond their unknown limit.
"""

from __future__ import annotations


def holder_limit(limit: float, assumed: bool, fleet_peak: float, cached: float) -> float:
    """The batch limit to price a queue with: a guessed one raised to the fleet's peak when the
    replica holds part of the prompt (``cached`` > 0)."""
    return max(limit, fleet_peak) if assumed and cached > 0 else limit


def holder_queue_weight(assumed: bool, cached: float, computed: float, prompt: float) -> float:
    """Weight of a guessed queue: the squared share of the prompt still to compute when the
    replica holds part of it, else 1."""
    if not (assumed and cached > 0):
        return 1.0
    share = computed / max(1.0, prompt)
    return share * share
