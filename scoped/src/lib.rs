//! scoped: the scope tracing daemon, as a library (the binary is `main.rs`).
//!
//! Data flow, one module per stage:
//! `ebpf` (kernel programs and rings) → `reader` (epoll, decode) → `pipeline` (attribute to
//! probes, fan out) → `store` → `export` (Chrome JSON, JSON Lines, flame graphs, OTLP);
//! `probes` + `resolve` attach sessions, `budget` keeps their overhead under a session's budget; `daemon` is the domain API and `api` its gRPC face;
//! `model` holds the records everything passes around. `analyze` says what a program is;
//! `sampler` (perf_event CPU samples) and `planner` choose what to probe within a budget.

pub mod access;
pub mod analyze;
pub mod api;
pub mod btf;
pub mod budget;
pub mod daemon;
pub mod ebpf;
pub mod error;
pub mod export;
pub mod glob;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod planner;
pub mod probes;
pub mod procfs;
pub mod reader;
pub mod resolve;
pub mod sampler;
pub mod stats;
pub mod store;
pub mod usdt;
