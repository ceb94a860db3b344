//! shardproxy: a thread-per-core, sharded TCP proxy on glommio (io_uring).
//!
//! Module map:
//!
//! | module       | what it owns                                                |
//! |--------------|-------------------------------------------------------------|
//! | [`cli`]      | clap structs only                                           |
//! | [`config`]   | validated [`config::Config`] built from the CLI; binds nothing |
//! | [`config_file`] | `--config FILE` (TOML) turned into the same flags          |
//! | [`units`]    | `500ms` / `16KiB` parsers shared by flags and config         |
//! | [`app`]      | start-up: pre-flight checks, listeners, shards, exit code    |
//! | [`shard`]    | one pinned executor per core and its `Rc` context            |
//! | [`listener`] | `SO_REUSEPORT` sockets and the accept loop with permits      |
//! | [`session`]  | one client + one upstream: handshake, connect, relay, reason  |
//! | [`relay`]    | bounded half-duplex pumps (plain, sealing, opening)          |
//! | [`control`]  | signals as events, shard commands by message                 |
//! | [`stats`]    | per-shard counters and close reasons                         |
//! | [`metrics`]  | per-shard HDR histograms, `/metrics`, `/histograms`, `stats`  |
//! | [`sys`]      | the only `unsafe`: adopting fds into glommio, io_uring probe |
//! | [`proto`]    | sans-io tunnel protocol: keys, hellos, chunk framing         |
//! | [`demo`]     | `shardproxy demo`: origin + exit + entry on loopback         |
//!
//! Data never crosses cores: each shard accepts on its own listener, pairs
//! and relays its own connections, and counts into its own `Cell`s.

pub mod app;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod control;
pub mod demo;
pub mod error;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod proto;
pub mod relay;
pub mod session;
pub mod shard;
pub mod stats;
pub mod sys;
pub mod trigger;
pub mod units;
