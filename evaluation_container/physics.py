"""Physics figures of merit on the validation set (DESIGN.md §4), from predictions per element.

Row i of the target belongs to element i, so matching is per element: efficiency of class c is the
fraction of true-c elements predicted as c; fake rate is the fraction of elements predicted as c
that are not truly c. Resolutions are robust widths, half the 16–84 % interval of the response
(predicted / true) divided by its median, over elements that are a particle in truth and in the
prediction; MET response and resolution come from per-event vector sums of predicted and true
particles. A figure with nothing to measure (no true electrons in the set, say) is left out rather
than reported as 0 or NaN. Pure numpy: it runs on the host while the accelerator trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data import format as fmt

SHORT_CLASS_NAMES = ("none", "ch_had", "n_had", "photon", "electron", "muon")
LOW_QUANTILE, HIGH_QUANTILE = 0.16, 0.84
MIN_TRUE_VALUE = 1e-3  # GeV: responses to smaller true values are numerical noise


@dataclass
class PhysicsAccumulator:
    """Adds up validation batches; ``result()`` gives the figures."""

    confusion: np.ndarray = field(default_factory=lambda: np.zeros((fmt.N_CLASSES, fmt.N_CLASSES), np.int64))
    responses: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"pt": [], "e": [], "met": []})

    def add(self, y: np.ndarray, mask: np.ndarray, predicted_class: np.ndarray, pt: np.ndarray,
            energy: np.ndarray, sin_phi: np.ndarray, cos_phi: np.ndarray) -> None:
        """One batch: targets (B, N, 7), mask (B, N), predictions (B, N) each."""
        true_class = y[..., fmt.Y_CLASS].astype(np.int64)
        index = true_class[mask] * fmt.N_CLASSES + predicted_class[mask].astype(np.int64)
        self.confusion += np.bincount(index, minlength=fmt.N_CLASSES**2).reshape(fmt.N_CLASSES, fmt.N_CLASSES)
        both = mask & (true_class > 0) & (predicted_class > 0)
        self.responses["pt"].append(_ratio(pt[both], y[..., fmt.Y_PT][both]))
        self.responses["e"].append(_ratio(energy[both], y[..., fmt.Y_E][both]))
        predicted = mask & (predicted_class > 0)
        true = mask & (true_class > 0)
        norm = np.maximum(np.hypot(sin_phi, cos_phi), MIN_TRUE_VALUE)
        met_pred = _missing_pt(pt, cos_phi / norm, sin_phi / norm, predicted)
        met_true = _missing_pt(y[..., fmt.Y_PT], y[..., fmt.Y_COS_PHI], y[..., fmt.Y_SIN_PHI], true)
        self.responses["met"].append(_ratio(met_pred, met_true))

    def result(self) -> dict[str, float]:
        figures: dict[str, float] = {}
        diagonal = np.diag(self.confusion)
        for c in range(1, fmt.N_CLASSES):
            n_true, n_predicted = self.confusion[c].sum(), self.confusion[:, c].sum()
            if n_true:
                figures[f"eff_{SHORT_CLASS_NAMES[c]}"] = float(diagonal[c] / n_true)
            if n_predicted:
                figures[f"fake_{SHORT_CLASS_NAMES[c]}"] = float((n_predicted - diagonal[c]) / n_predicted)
        for name, label in (("pt", "pt"), ("e", "e"), ("met", "met")):
            response = np.concatenate(self.responses[name]) if self.responses[name] else np.empty(0)
            if response.size:
                figures[f"{label}_response"] = float(np.median(response))
                width = resolution(response)
                if width is not None:
                    figures[f"{label}_resolution"] = width
        return figures


def resolution(response: np.ndarray) -> float | None:
    """Half the central 68 % interval over the median: a width that outliers do not dominate.

    None when the median response is not positive (a relative width would be meaningless).
    """
    low, median, high = np.quantile(response, [LOW_QUANTILE, 0.5, HIGH_QUANTILE])
    return float((high - low) / 2 / median) if median > 0 else None


def _ratio(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    valid = true > MIN_TRUE_VALUE
    return predicted[valid] / true[valid]


def _missing_pt(pt: np.ndarray, cos_phi: np.ndarray, sin_phi: np.ndarray, select: np.ndarray) -> np.ndarray:
    """Per event |Σ pT vector| over the selected elements."""
    weight = np.where(select, pt, 0.0)
    return np.hypot((weight * cos_phi).sum(axis=-1), (weight * sin_phi).sum(axis=-1))
