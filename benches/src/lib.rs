//! Trellis benchmarks. The criterion micro-benchmarks are in `benches/`; results and how to run
//! them are in `README.md`.
