"""The call flow of masked calls: one state machine per call (flow.py), fed in order by the
Stasis dispatcher (stasis.py)."""
