//! Benchmarks for attention-core.
