//! The only place with `unsafe`: handing file descriptors we own to glommio.
//!
//! glommio can build a `TcpStream` from a `socket2::Socket` safely, but its
//! `TcpListener` and `UnixStream` only implement `FromRawFd`. We create those
//! sockets with `socket2`/`std` (for backlog, `IPV6_V6ONLY`, socketpairs) and
//! adopt them here. Both functions must run inside a glommio executor.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, IntoRawFd};

/// Adopts a bound, listening TCP socket into the current executor.
pub fn adopt_listener(socket: socket2::Socket) -> glommio::net::TcpListener {
    let fd = socket.into_raw_fd();
    // SAFETY: `into_raw_fd` released ownership of a valid, open, listening
    // TCP socket; nothing else holds or closes `fd`, so the listener becomes
    // its sole owner and closes it on drop.
    unsafe { glommio::net::TcpListener::from_raw_fd(fd) }
}

/// Adopts one end of a `std` socketpair into the current executor.
pub fn adopt_unix_stream(stream: std::os::unix::net::UnixStream) -> glommio::net::UnixStream {
    let fd = stream.into_raw_fd();
    // SAFETY: `into_raw_fd` released ownership of a valid, open Unix stream
    // socket; the glommio stream becomes its sole owner and closes it on drop.
    unsafe { glommio::net::UnixStream::from_raw_fd(fd) }
}

/// Probes io_uring with a one-entry `io_uring_setup`, closing the ring at
/// once. glommio panics when io_uring is missing; this lets start-up report
/// a one-line error instead. Returns the OS error on failure.
pub fn probe_io_uring() -> std::io::Result<()> {
    // io_uring_params is 120 bytes on every kernel that has io_uring.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(2) reads and writes exactly one
    // `struct io_uring_params` (120 bytes) at the pointer, which is a live,
    // writable, zeroed buffer of that size for the duration of the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            1u32,
            params.as_mut_ptr() as *mut libc::c_void,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody
    // else; wrapping it in OwnedFd closes it exactly once.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}
