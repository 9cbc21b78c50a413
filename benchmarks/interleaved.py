"""Interleaved timing shared by the CPU benchmarks: each round runs every arm once (A B A B ...), so load that comes
and goes on a shared machine falls on all arms alike, and an arm's figure is its fastest round."""
import time
from typing import Callable, ContextManager, Dict, Hashable, Tuple

# An arm: the call to time, and a factory of the context it runs in (entered outside the timed region's start)
Arm = Tuple[Callable[[], object], Callable[[], ContextManager]]


def best_seconds(arms: Dict[Hashable, Arm], repeats: int) -> Dict[Hashable, float]:
    """The fastest of `repeats` interleaved rounds of each arm, after one untimed warm-up round."""
    best = dict.fromkeys(arms, float('inf'))
    for repeat in range(repeats + 1):
        for name, (run, context) in arms.items():
            with context():
                start = time.perf_counter()
                run()
                seconds = time.perf_counter() - start
            if repeat:
                best[name] = min(best[name], seconds)
    return best
