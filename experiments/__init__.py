"""The papers' experiments and reports on top of every layer: λ sweeps, robustness to module
removal, specialist sub-ensembles and training reports."""
