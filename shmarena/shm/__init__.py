"""Shared memory itself: the allocators (pure: buddy, extents, space, segments,
gens) and the mappings, files and kernel knobs behind them (arena, backing,
journal, hugepages, numa)."""
