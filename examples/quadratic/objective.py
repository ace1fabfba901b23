"""A runHPO payload with a plain Python objective: reads input.json, writes output.json.

It follows the PanDA evaluation contract (DESIGN.md §3.4) so the same file works under `hepopt run`,
the local iDDS loop and a real PanDA/iDDS. The loss is a shifted quadratic with its minimum 0 at
x = 1.5, y = -0.5, optimizer = "adam"; it finishes in milliseconds.

When a hepopt worker runs it (HEPOPT_* variables set, hepopt importable), it also walks through a few
fake "epochs" whose loss decays towards the final value, reports each one, and stops early when the
orchestrator prunes the point (output then carries ``"pruned": true``). Without those variables it
behaves exactly as under PanDA.
"""

import json
import math
import os
from pathlib import Path

OPTIMUM = {"x": 1.5, "y": -0.5}
OPTIMIZER_PENALTY = {"adam": 0.0, "sgd": 0.5, "rmsprop": 0.2}
#: Fake training: the epoch-e loss is final * (1 + EXCESS / (e + 1)), reaching the final value at the end.
EPOCHS = 5
EXCESS = 1.0


def loss(point: dict) -> float:
    return sum((point[k] - v) ** 2 for k, v in OPTIMUM.items()) + OPTIMIZER_PENALTY[point["optimizer"]]


def curve(final: float) -> list[float]:
    """Per-epoch losses ending exactly at ``final``."""
    return [final * (1 + EXCESS / (epoch + 1)) if epoch < EPOCHS - 1 else final for epoch in range(EPOCHS)]


def reporter():
    """hepopt's reporting channel, or None under PanDA (no HEPOPT_* variables, or hepopt not installed)."""
    if "HEPOPT_URL" not in os.environ:
        return None
    try:
        from hepopt.reporting import Reporter
    except ImportError:
        return None
    return Reporter.from_env()


def train(point: dict) -> dict:
    """The output.json document for one point, reporting each fake epoch when a reporter is available."""
    final = loss(point)
    if not math.isfinite(final):
        return {"status": 1, "message": "non-finite loss"}
    channel = reporter()
    if channel is None:
        return {"status": 0, "loss": final, "message": "ok"}
    try:
        for epoch, value in enumerate(curve(final)):
            if channel.report(epoch, value) and epoch < EPOCHS - 1:
                return {"status": 0, "loss": value, "message": f"stopped early after epoch {epoch}",
                        "pruned": True}
    finally:
        channel.close()
    return {"status": 0, "loss": final, "message": "ok"}


def main() -> None:
    try:
        result = train(json.loads(Path("input.json").read_text()))
    except (OSError, ValueError, KeyError) as exc:
        result = {"status": 1, "message": f"bad input: {exc}"}
    Path("output.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
