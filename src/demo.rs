//! `shardproxy demo`: a loopback playground. Starts a tiny origin (HTTP for
//! curl, echo for anything else) and a `forward` proxy in front of it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use crate::cli::{DemoArgs, ProxyArgs};
use crate::error::StartupError;

/// Runs the demo until SIGINT.
pub fn run(args: &DemoArgs) -> Result<(), StartupError> {
    let origin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], args.origin_port));
    let origin = TcpListener::bind(origin_addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => StartupError::AddrInUse(origin_addr),
        _ => StartupError::Listen {
            addr: origin_addr,
            source: e,
        },
    })?;
    std::thread::spawn(move || {
        for conn in origin.incoming().flatten() {
            std::thread::spawn(move || serve_origin(conn));
        }
    });
    let cores = args.cores.min(crate::app::allowed_cores().len().max(1));
    crate::info!(
        "demo: origin on {origin_addr}; try `curl http://127.0.0.1:{port}/` or `nc 127.0.0.1 {port}` (echo); Ctrl-C to drain and stop",
        port = args.port
    );
    let proxy = ProxyArgs {
        listen: format!("127.0.0.1:{}", args.port),
        upstream: origin_addr.to_string(),
        cores: Some(cores),
        cpu_list: None,
        backlog: 4096,
        buffer_size: 16 * 1024,
        connect_timeout: std::time::Duration::from_secs(5),
        idle_timeout: std::time::Duration::from_secs(300),
        drain_timeout: std::time::Duration::from_secs(5),
        max_connections: 10_000,
        dual_stack: false,
    };
    crate::app::run_forward(&proxy)
}

/// Answers `GET` with a small HTTP response, and echoes anything else.
fn serve_origin(mut conn: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    let Ok(n) = conn.read(&mut buf) else { return };
    if buf[..n].starts_with(b"GET ") {
        let body = "hello from the shardproxy demo origin\n";
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let mut chunk = &buf[..n];
    loop {
        if conn.write_all(chunk).is_err() {
            return;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => chunk = &buf[..n],
        }
    }
}
