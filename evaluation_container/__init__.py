"""The evaluation container: MLPF training on Delphes-format data, runHPO-compatible (DESIGN.md §3.4, §4)."""
