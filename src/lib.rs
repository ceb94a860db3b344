//! shardproxy: a thread-per-core, sharded TCP proxy on glommio (io_uring).
//!
//! Module map, in import order: each module uses only those below it, so the
//! list reads like a connection's lifecycle (app → shard → listener →
//! session → relay → engine → conn → proto).
//!
//! | module       | what it owns                                                |
//! |--------------|-------------------------------------------------------------|
//! | [`app`]      | start-up: pre-flight checks, listeners, shards, exit code    |
//! | [`demo`]     | `shardproxy demo`: origin + exit + entry on loopback         |
//! | [`control`]  | signals as events, shard messages over socketpairs           |
//! | [`shard`]    | one pinned executor per core: its run loop and drain         |
//! | [`listener`] | `SO_REUSEPORT` sockets and the accept loop with permits      |
//! | [`session`]  | one client + one upstream: handshake, connect, relay         |
//! | [`relay`]    | the one relay entry point: a pair's framing and lifetime     |
//! | [`keepalive`]| idle keep-alive tunnels (entry pool, exit registry), start/status |
//! | [`context`]  | one shard's `Rc` state: config, counters, keys, triggers     |
//! | [`engine`]   | every pair's bounded half-duplex relay, from completions     |
//! | [`conn`]     | one socket tagged with its side (downstream / upstream)      |
//! | [`error`]    | start-up errors; session errors that name the failing side   |
//! | [`trigger`]  | shard-local stop events and the stop-first `bounded` race    |
//! | [`metrics`]  | per-shard HDR histograms, `/metrics`, `/histograms`, `stats`  |
//! | [`stats`]    | per-shard counters and close reasons                         |
//! | [`rng`]      | per-shard salt generator (ChaCha20 keyed from the OS)        |
//! | [`config`]   | the one path from flags and files to a validated `Config`   |
//! | [`cli`]      | clap structs only                                           |
//! | [`units`]    | `500ms` / `16KiB` parsers shared by flags and config         |
//! | [`log`]      | one-line stderr logging macros                               |
//! | [`stop`]     | the stop deadline that bounds the waits after a drain        |
//! | [`sys`]      | the only `unsafe`: adopting fds, io_uring probe, raw syscalls |
//! | [`proto`]    | sans-io tunnel protocol: keys, hellos, chunk framing         |
//!
//! Data never crosses cores: each shard accepts on its own listener, pairs
//! and relays its own connections, and counts into its own `Cell`s.

pub mod access_log;
pub mod app;
pub mod cli;
pub mod config;
pub mod conn;
pub mod context;
pub mod control;
pub mod demo;
pub mod engine;
pub mod error;
pub mod handover;
pub mod keepalive;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod proto;
pub mod proxy_protocol;
pub mod relay;
pub mod replay;
pub mod rng;
pub mod session;
pub mod shard;
pub mod stats;
pub mod stop;
pub mod sys;
pub mod transfer;
pub mod trigger;
pub mod units;
pub mod upstream;
pub mod watchdog;
