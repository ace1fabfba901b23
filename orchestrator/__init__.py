"""The orchestrator: REST service, storage, point queue with leases, steering scheduling (DESIGN.md §3.5)."""
