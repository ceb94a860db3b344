//! The only place with `unsafe`: handing file descriptors we own to glommio,
//! the io_uring probe, CPUID (the start-up CPU check) and borrowing fds to
//! reset them on the way out.
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

/// Exits with status 2 and a one-line error if this CPU lacks an x86-64
/// feature the compiler was told it may use (`-C target-cpu`, here
/// x86-64-v3 from `.cargo/config.toml`); returns otherwise. Without the
/// check such a CPU dies of SIGILL somewhere later.
///
/// Reads CPUID directly (Intel SDM vol. 2A, "CPUID"; AMD APM vol. 3,
/// appendix E): `is_x86_feature_detected!` answers `true` at compile time
/// for any feature the build enables, which is the very case to catch.
/// `main` calls this first. It is written so that the compiler has nothing
/// to vectorise before the verdict: no structs copied, no `Vec`, no
/// formatting; only `u32` bit tests and writes of static bytes through
/// std's (baseline-compiled) `Stderr`. `tests/cpu_baseline.rs` runs it under
/// QEMU with a pre-AVX2 CPU model.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
pub fn require_cpu_features() {
    use std::arch::x86_64::__cpuid_count;
    #[allow(unused_unsafe)]
    fn reg(leaf: u32, which: u8) -> u32 {
        // SAFETY: CPUID exists on every x86-64 CPU and has no side effects;
        // the intrinsic is only `unsafe` on older toolchains.
        let r = unsafe { __cpuid_count(leaf, 0) };
        match which {
            0 => r.eax,
            1 => r.ebx,
            _ => r.ecx,
        }
    }
    const EAX: u8 = 0;
    const EBX: u8 = 1;
    const ECX: u8 = 2;
    let l1 = reg(1, ECX);
    let l7 = if reg(0, EAX) >= 7 { reg(7, EBX) } else { 0 };
    let ext = if reg(0x8000_0000, EAX) >= 0x8000_0001 {
        reg(0x8000_0001, ECX)
    } else {
        0
    };
    let has = |reg: u32, n: u32| reg >> n & 1 == 1;
    // x86-64-v2 and -v3 (the psABI's micro-architecture levels) and the
    // AVX-512 subset a v4 build adds: (name, compiled in, CPU has it).
    let table: [(&[u8], bool, bool); 18] = [
        (b"sse3", cfg!(target_feature = "sse3"), has(l1, 0)),
        (b"ssse3", cfg!(target_feature = "ssse3"), has(l1, 9)),
        (b"fma", cfg!(target_feature = "fma"), has(l1, 12)),
        (
            b"cmpxchg16b",
            cfg!(target_feature = "cmpxchg16b"),
            has(l1, 13),
        ),
        (b"sse4.1", cfg!(target_feature = "sse4.1"), has(l1, 19)),
        (b"sse4.2", cfg!(target_feature = "sse4.2"), has(l1, 20)),
        (b"movbe", cfg!(target_feature = "movbe"), has(l1, 22)),
        (b"popcnt", cfg!(target_feature = "popcnt"), has(l1, 23)),
        (b"xsave", cfg!(target_feature = "xsave"), has(l1, 26)),
        (b"avx", cfg!(target_feature = "avx"), has(l1, 28)),
        (b"f16c", cfg!(target_feature = "f16c"), has(l1, 29)),
        (b"bmi1", cfg!(target_feature = "bmi1"), has(l7, 3)),
        (b"avx2", cfg!(target_feature = "avx2"), has(l7, 5)),
        (b"bmi2", cfg!(target_feature = "bmi2"), has(l7, 8)),
        (b"avx512f", cfg!(target_feature = "avx512f"), has(l7, 16)),
        (b"avx512bw", cfg!(target_feature = "avx512bw"), has(l7, 30)),
        (b"avx512vl", cfg!(target_feature = "avx512vl"), has(l7, 31)),
        (b"lzcnt", cfg!(target_feature = "lzcnt"), has(ext, 5)),
    ];
    let mut missing = 0u32;
    let mut i = 0;
    while i < table.len() {
        if table[i].1 && !table[i].2 {
            missing |= 1 << i;
        }
        i += 1;
    }
    if missing == 0 {
        return;
    }
    use std::io::Write;
    let mut err = std::io::stderr();
    let _ = err.write_all(b"error: this shardproxy build needs CPU features this CPU lacks (");
    let mut first = true;
    let mut i = 0;
    while i < table.len() {
        if missing >> i & 1 == 1 {
            if !first {
                let _ = err.write_all(b", ");
            }
            let _ = err.write_all(table[i].0);
            first = false;
        }
        i += 1;
    }
    let _ = err.write_all(
        b"); it was built for x86-64-v3 by .cargo/config.toml. Rebuild on this machine with: \
          RUSTFLAGS=\"-C target-cpu=native\" cargo build --release\n",
    );
    std::process::exit(2);
}

/// Non-x86-64 builds assume no optional CPU feature.
#[cfg(not(target_arch = "x86_64"))]
pub fn require_cpu_features() {}

/// Sets `SO_LINGER {on, 0}` on every socket this process holds, so that
/// when the process exits the kernel ends each connection with RST rather
/// than FIN: a peer never mistakes an abandoned stream for a clean end.
/// Called on the way out (second termination signal, panic); other threads
/// may still run, so an fd can be closed or reused meanwhile, which at
/// worst resets another socket of this exiting process. Every socket is
/// set (listeners and Unix sockets too); the count returned is of the
/// TCP connections (an IP peer address): the connections reset.
pub fn abandon_connections() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut n = 0;
    for entry in dir.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // SAFETY: `fd` was listed as open in this process a moment ago; it
        // is only borrowed for one setsockopt, which fails harmlessly
        // (ENOTSOCK, EBADF) if it is not a socket or was closed since.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let set = socket.set_linger(Some(std::time::Duration::ZERO)).is_ok();
        // A TCP connection: an IP peer (Unix socket pairs have peers too).
        if set && socket.peer_addr().is_ok_and(|p| p.as_socket().is_some()) {
            n += 1;
        }
    }
    n
}

/// Makes the child `cmd` starts receive SIGTERM when this thread's process
/// dies (`prctl(PR_SET_PDEATHSIG)`, prctl(2)), so a parent that is
/// SIGKILLed leaves no orphan behind: the child drains and exits as on any
/// stop. The kernel ties this to the *thread* that forks, so call it from a
/// thread that lives as long as the process. If the parent died before the
/// child set it, the child stops at once (it sees a new parent).
pub fn stop_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed: it makes three syscalls
    // (prctl, getppid, kill) and allocates nothing; the error it may return
    // is built from errno without allocating (`io::Error::last_os_error`).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
            Ok(())
        });
    }
}

/// Sends SIGTERM to process `pid` (kill(2)); errors (it is gone) are
/// ignored. The caller makes sure `pid` is still its own unreaped child.
pub fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // `pid` is positive, so it names one process, never a group.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Takes ownership of file descriptors received with `SCM_RIGHTS`
/// (the listener hand-over): each becomes an [`std::os::fd::OwnedFd`]
/// closed on drop, with `FD_CLOEXEC` set (recvmsg without
/// `MSG_CMSG_CLOEXEC` leaves it clear, and a SIGUSR2 upgrade must not pass
/// them to the program it executes). Negative entries are skipped.
pub fn own_received_fds(fds: &[std::os::fd::RawFd]) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    fds.iter()
        .filter(|fd| **fd >= 0)
        // SAFETY: recvmsg(2) installed each of these descriptors in this
        // process for us alone (SCM_RIGHTS); nothing else knows or closes
        // them, so each OwnedFd is its sole owner.
        .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(*fd) })
        .inspect(|fd| {
            let _ = socket2::SockRef::from(fd).set_cloexec(true);
        })
        .collect()
}

/// Reads what `socket` (a connected socket) already holds, without waiting
/// (`recv(2)` with `MSG_DONTWAIT`): `Ok(0)` is EOF, `WouldBlock` means
/// nothing has arrived yet.
pub fn recv_now(socket: &impl std::os::fd::AsRawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    recv_fd(socket.as_raw_fd(), buf)
}

/// Whether this process may create files in `dir`: `faccessat(2)` with
/// `W_OK | X_OK` and `AT_EACCESS`, so with the effective user, groups and
/// capabilities the open will have (plain `access(2)` asks for the real
/// user and drops a non-root user's capabilities, refusing what the open
/// would do). `check` answers it without creating anything.
pub fn may_create_in(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: faccessat(2) reads the NUL-terminated path `c`, which lives
    // until the call returns, and writes nothing.
    let r = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The index of the network interface called `name` in this network
/// namespace (`if_nametoindex(3)`), for an IPv6 zone written as a name
/// (`fe80::1%eth0`, RFC 4007 §11). `None` when there is no such interface
/// (or the name holds a NUL).
pub fn interface_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex(3) reads the NUL-terminated name `c`, which
    // lives until the call returns, and writes nothing.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// Clears `O_NONBLOCK` on `file` (opened non-blocking so that opening a
/// FIFO without a reader fails at once instead of waiting for one).
pub fn set_blocking(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(2) with F_GETFL/F_SETFL reads and writes only the flags
    // of `fd`, which `file` keeps open for the duration of both calls.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A pipe for `splice(2)`: `(read end, write end)`, both non-blocking and
/// close-on-exec (`pipe2(2)`). Errors are the OS's (`EMFILE` when the
/// process is out of descriptors).
pub fn splice_pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2(2) writes two descriptors into `fds`, a live local
    // array of two `c_int`s.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by
    // nothing else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Moves up to `len` bytes from descriptor `from` to descriptor `to`, one of
/// which is a pipe, without copying them through user space (`splice(2)`
/// with `SPLICE_F_MOVE | SPLICE_F_NONBLOCK`, no offsets). Returns the bytes
/// moved; `Ok(0)` is EOF on `from`. `WouldBlock` means `from` has nothing
/// or `to` has no room. The caller keeps both descriptors open for the call.
pub fn splice(
    from: std::os::fd::RawFd,
    to: std::os::fd::RawFd,
    len: usize,
) -> std::io::Result<usize> {
    // SAFETY: splice(2) with null offsets reads and writes no user memory;
    // it only operates on the two descriptors, which the caller keeps open.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Writes `buf` with `send(2)` and `MSG_DONTWAIT | MSG_NOSIGNAL |
/// MSG_MORE`: the kernel holds back the last partial segment (as with
/// `TCP_CORK`) until more bytes or a `shutdown(2)`, which sends it with FIN
/// set. Returns the bytes written (possibly fewer than all); `WouldBlock`
/// when the socket has no room. The caller keeps `fd`, a connected socket,
/// open.
pub fn send_more(fd: std::os::fd::RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is a live buffer of `buf.len()` bytes for the duration
    // of the call; send reads it and writes no user memory.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | libc::MSG_MORE,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Writes several buffers with one `sendmsg(2)` (`MSG_DONTWAIT |
/// MSG_NOSIGNAL`), in order. Returns the bytes written (possibly fewer
/// than all); `WouldBlock` when the socket has no room.
pub fn send_vectored(
    fd: std::os::fd::RawFd,
    bufs: &[std::io::IoSlice<'_>],
) -> std::io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is ABI-compatible with `struct iovec` on Unix; the kernel
    // only reads through these pointers for sendmsg.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: `msg` points at `bufs.len()` iovecs over buffers borrowed for
    // the call; sendmsg reads them and writes no user memory.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `recv(2)` on a connected, non-blocking socket `fd`, through the generic
/// `syscall(2)` (glibc's `recv` is a thread-cancellation point, with two
/// extra calls around the syscall; nothing here cancels threads). `Ok(0)`
/// is EOF; `WouldBlock` when nothing is queued. The caller keeps `fd` open.
pub fn recv_fd(fd: std::os::fd::RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes for the
    // duration of the call; the null address arguments ask for no address.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Looks at the connected socket `fd` without taking anything (`recv(2)`
/// of one byte with `MSG_PEEK | MSG_DONTWAIT`): `Ok(1)` a byte waits,
/// `Ok(0)` EOF, `WouldBlock` nothing yet, any other error the socket's.
pub fn peek_fd(fd: std::os::fd::RawFd) -> std::io::Result<usize> {
    let mut byte = 0u8;
    // SAFETY: `byte` is a live, writable one-byte buffer for the duration
    // of the call; MSG_PEEK leaves the socket's queue as it is.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast::<libc::c_void>(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Waits up to `timeout` (rounded down to milliseconds) for `fd` to be
/// readable (`poll(2)`, `POLLIN`): for a listening socket, a connection
/// waits to be accepted. `Ok(false)` on the timeout or a signal.
pub fn wait_readable(
    fd: std::os::fd::RawFd,
    timeout: std::time::Duration,
) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid, writable pollfd for the duration of the
    // call, and we pass a count of 1; `poll` touches nothing else.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    match n {
        n if n > 0 => Ok(pfd.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0),
        0 => Ok(false),
        _ => match std::io::Error::last_os_error() {
            e if e.kind() == std::io::ErrorKind::Interrupted => Ok(false),
            e => Err(e),
        },
    }
}

/// Whether the connected socket `fd` holds nothing to read and no error
/// ([`peek_fd`] would block). EOF, data or an error are `false`.
pub fn quiet_fd(fd: std::os::fd::RawFd) -> bool {
    matches!(peek_fd(fd), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// `send(2)` (`MSG_DONTWAIT | MSG_NOSIGNAL`) on a connected socket `fd`,
/// through `syscall(2)` as [`recv_fd`]. Returns the bytes written (possibly
/// fewer than all); `WouldBlock` when the socket has no room.
pub fn send_fd(fd: std::os::fd::RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is a live buffer of `buf.len()` bytes for the duration
    // of the call; send reads it and writes no user memory.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `shutdown(fd, SHUT_WR)`: sends FIN on a connected socket.
pub fn shutdown_write_fd(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: a plain syscall on a descriptor the caller keeps open; no
    // pointers.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The pending error of socket `fd` (`SO_ERROR`, which clears it), if any.
pub fn take_socket_error(fd: std::os::fd::RawFd) -> Option<std::io::Error> {
    match socket_option::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_ERROR) {
        Ok(0) => None,
        Ok(err) => Some(std::io::Error::from_raw_os_error(err)),
        Err(e) => Some(e),
    }
}

/// `getsockopt(2)`: socket `fd`'s option `opt` at `level`, read into a `T`.
/// Only for plain C data (integers, and `libc` structs of integers such as
/// `ucred` and `tcp_info`), for which all-zero bytes are a valid value.
/// Errors: the call's.
fn socket_option<T: Copy>(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    opt: libc::c_int,
) -> std::io::Result<T> {
    // SAFETY: `T` is plain C data (see above), so all-zero is a valid `T`.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes to `value`, a live
    // local of that size, and the length it wrote to `len`, also live. A
    // bad `fd` is an error return, not undefined behaviour.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            opt,
            &mut value as *mut T as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// Sets `O_NONBLOCK` on `fd` (splicing from a socket waits on its own
/// flag, whatever `SPLICE_F_NONBLOCK` says).
pub fn set_nonblocking_fd(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: plain fcntl calls on a descriptor the caller keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether socket `fd`'s next byte is at the TCP urgent mark
/// (`ioctl(SIOCATMARK)`, tcp(7)). `splice(2)` from a TCP socket never reads
/// past that mark: it answers `EAGAIN`, or 0 once a FIN is queued, although
/// data follows; a `recv(2)` steps over the urgent byte.
pub fn at_urgent_mark(fd: std::os::fd::RawFd) -> std::io::Result<bool> {
    /// `SIOCATMARK` (include/uapi/asm-generic/sockios.h), which the `libc`
    /// crate does not export.
    const SIOCATMARK: libc::Ioctl = 0x8905;
    let mut at: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one int to the pointer, a live local.
    if unsafe { libc::ioctl(fd, SIOCATMARK, &mut at as *mut libc::c_int) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(at != 0)
}

std::thread_local! {
    /// Set by [`on_sigurg`] on the thread the signal was sent to (a shard's,
    /// see [`watch_urgent`]); taken by [`take_urgent_signal`].
    static URGENT_SIGNAL: std::sync::atomic::AtomicBool =
        const { std::sync::atomic::AtomicBool::new(false) };
    /// How many `SIGURG`s reached this thread (wrapping): see
    /// [`urgent_epoch`].
    static URGENT_SIGNALS: std::sync::atomic::AtomicU32 =
        const { std::sync::atomic::AtomicU32::new(0) };
    /// This thread's id (`gettid(2)`), once asked for.
    static TID: std::cell::Cell<libc::pid_t> = const { std::cell::Cell::new(0) };
}

/// The `SIGURG` handler: notes the signal for the thread it interrupted,
/// nothing else. Async-signal-safe: a store to a constant-initialised
/// thread-local atomic (no lazy initialisation, no destructor).
extern "C" fn on_sigurg(_: libc::c_int) {
    URGENT_SIGNALS.with(|n| n.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    URGENT_SIGNAL.with(|f| f.store(true, std::sync::atomic::Ordering::Relaxed));
}

/// How many `SIGURG`s have reached this thread so far (wrapping; compare
/// two readings for equality only). A socket this thread has owned since
/// before it was connected ([`own_for_urgent`], then a connect) can hold
/// urgent data only if the count has moved since just before it was
/// owned: the kernel signals the owner of every socket that receives an
/// urgent pointer (`tcp_check_urg`). One read of a thread-local; no
/// system call.
pub fn urgent_epoch() -> u32 {
    URGENT_SIGNALS.with(|n| n.load(std::sync::atomic::Ordering::Relaxed))
}

/// Installs the process's `SIGURG` handler ([`on_sigurg`], `SA_RESTART`),
/// once; later calls return the first one's result. Until then, and
/// without it, `SIGURG` keeps its default action (ignored).
pub fn install_urgent_signal() -> std::io::Result<()> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: an all-zero sigaction is valid (empty mask, no flags);
        // the handler is an `extern "C" fn(c_int)` that only stores to a
        // thread-local atomic, and sigaction(2) reads the struct, a live
        // local, once.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigurg as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGURG, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

/// A thread's signal mask as it was before [`block_signals`].
pub struct SignalMask(libc::sigset_t);

/// `signals` as a `sigset_t`.
fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: `set` is a live local sigset_t, initialised by sigemptyset
    // before sigaddset writes to it; an invalid signal number only makes
    // sigaddset return EINVAL.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks `signals` in this thread, and so in the threads it starts from
/// now on (pthread_sigmask(3)); returns the mask before. A signal sent
/// meanwhile waits, pending, until [`unblock_signals`] (or
/// [`SignalMask::restore`]) and is delivered then.
pub fn block_signals(signals: &[i32]) -> SignalMask {
    let set = sigset(signals);
    // SAFETY: `old` is a live local the call fills in; `set` a live,
    // initialised sigset_t it reads. pthread_sigmask cannot fail with
    // SIG_BLOCK and valid pointers.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        SignalMask(old)
    }
}

/// The user ID of the process at the other end of the connected Unix
/// socket `fd` (`SO_PEERCRED`, unix(7): its credentials when it connected
/// or listened). `None` if the call fails.
pub fn peer_uid(fd: std::os::fd::RawFd) -> Option<u32> {
    socket_option::<libc::ucred>(fd, libc::SOL_SOCKET, libc::SO_PEERCRED)
        .ok()
        .map(|cred| cred.uid)
}

/// This process's effective user ID.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// Unblocks `signals` in this thread, whatever mask it inherited: a signal
/// mask survives fork and exec, so a supervisor that blocked SIGTERM would
/// otherwise never stop the proxy. Pending ones are delivered now. `false`
/// if pthread_sigmask(3) failed.
pub fn unblock_signals(signals: &[i32]) -> bool {
    let set = sigset(signals);
    // SAFETY: `set` is a live, initialised sigset_t the call reads; the old
    // mask is not asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) == 0 }
}

impl SignalMask {
    /// Puts this thread's mask back as it was.
    pub fn restore(self) {
        // SAFETY: `self.0` is a sigset_t that pthread_sigmask filled in;
        // the old mask is not asked for.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut());
        }
    }
}

/// Whether a `SIGURG` reached this thread since the last call (and clears
/// the note): some socket whose owner it is ([`watch_urgent`]) received a
/// new urgent pointer. The kernel sends it (`tcp_check_urg`) before it
/// queues the segment's data, so it is noted before the completion that
/// data's wake-up posts can be seen.
pub fn take_urgent_signal() -> bool {
    URGENT_SIGNAL.with(|f| {
        f.load(std::sync::atomic::Ordering::Relaxed)
            && f.swap(false, std::sync::atomic::Ordering::Relaxed)
    })
}

/// Makes this thread the owner of socket `fd` for `SIGURG`
/// ([`own_for_urgent`]) and says whether urgent data is pending already
/// ([`urgent_pending`]). Also `true` when the socket cannot be watched:
/// then the caller must treat every read as if urgent data were pending.
pub fn watch_urgent(fd: std::os::fd::RawFd) -> bool {
    !own_for_urgent(fd) || urgent_pending(fd)
}

/// Makes this thread the owner of socket `fd` for `SIGURG`
/// (`fcntl(F_SETOWN_EX, F_OWNER_TID)`, fcntl(2)), so that the kernel
/// signals it when an urgent pointer arrives ([`take_urgent_signal`]).
/// `false` when that cannot be done (no signal handler, or the call
/// failed): then nothing tells this thread of urgent data on `fd`.
pub fn own_for_urgent(fd: std::os::fd::RawFd) -> bool {
    // Without the handler the signal would be ignored: treat the socket as
    // unwatched.
    if install_urgent_signal().is_err() {
        return false;
    }
    let tid = TID.with(|t| {
        if t.get() == 0 {
            // A signal mask survives fork and exec: a parent that blocked
            // SIGURG (Python's subprocess does not reset it) would keep it
            // from this thread for ever (found by a break-it round).
            if !unblock_signals(&[libc::SIGURG]) {
                return -1;
            }
            // SAFETY: gettid(2) takes nothing and cannot fail.
            t.set(unsafe { libc::gettid() });
        }
        t.get()
    });
    if tid < 0 {
        return false;
    }
    /// `struct f_owner_ex` (include/uapi/asm-generic/fcntl.h), with
    /// `F_SETOWN_EX` and `F_OWNER_TID`, which the `libc` crate exports on
    /// few targets.
    #[repr(C)]
    struct OwnerEx {
        kind: libc::c_int,
        pid: libc::pid_t,
    }
    const F_SETOWN_EX: libc::c_int = 15;
    const F_OWNER_TID: libc::c_int = 0;
    let owner = OwnerEx {
        kind: F_OWNER_TID,
        pid: tid,
    };
    // SAFETY: F_SETOWN_EX reads one `f_owner_ex`, a live local of that
    // layout.
    unsafe { libc::fcntl(fd, F_SETOWN_EX, &owner as *const OwnerEx) == 0 }
}

/// Whether urgent data is pending on socket `fd`: an urgent byte not yet
/// read, or an urgent pointer whose byte has not arrived
/// (`recv(MSG_OOB | MSG_PEEK)` answers `EINVAL` only when there is
/// neither, tcp(7)). One system call, which takes the socket's lock.
pub fn urgent_pending(fd: std::os::fd::RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `byte` is a live, writable one-byte buffer for the call.
    let n = unsafe {
        libc::recv(
            fd,
            &mut byte as *mut u8 as *mut libc::c_void,
            1,
            libc::MSG_OOB | libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    !(n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL))
}

/// The connections waiting in listening socket `fd`'s accept queue: for a
/// listener, Linux reports the queue's length in `TCP_INFO`'s
/// `tcpi_unacked` (as `ss` shows it under Recv-Q; `tcp_get_info`). `None`
/// when `fd` is not listening, or the call fails.
pub fn accept_queue(fd: std::os::fd::RawFd) -> Option<usize> {
    /// `TCP_LISTEN` in `tcpi_state` (include/net/tcp_states.h).
    const TCP_LISTEN: u8 = 10;
    socket_option::<libc::tcp_info>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
        .ok()
        .filter(|info| info.tcpi_state == TCP_LISTEN)
        .map(|info| info.tcpi_unacked as usize)
}

/// `TCP_INQ` (tcp(7), Linux 4.18+), which `libc` does not export on every
/// target; also the control message's type (`TCP_CM_INQ`).
const TCP_INQ: libc::c_int = 36;

/// Asks the kernel to report, with every [`recv_inq`], how many bytes stay
/// queued on socket `fd` (`TCP_INQ`). Best effort: an older kernel refuses
/// it, and [`recv_inq`] then reports nothing.
pub fn enable_inq(fd: std::os::fd::RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a live int of the size passed; the result is ignored
    // on purpose (best effort).
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            TCP_INQ,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Reads into `bufs` in order with one `recvmsg(2)` (`MSG_DONTWAIT`, through
/// `syscall(2)` as [`recv_fd`]). Returns the bytes read (`Ok(0)` at EOF) and,
/// with `inq` once [`enable_inq`] took, the bytes still queued after them
/// (`TCP_CM_INQ`); `WouldBlock` when the socket has nothing. Without `inq`
/// there is no control buffer, and one buffer is read with [`recv_fd`]: the
/// cheapest read, for sockets that never had urgent data (see
/// `engine::drained`). The caller keeps `fd`, a connected socket, open.
///
/// With `inq`, a `WouldBlock` is checked: at TCP's urgent mark, before it
/// has read a byte, `recv` answers `EAGAIN` while a signal is pending for
/// the thread (tcp_recvmsg: "stop if we have read anything or have SIGURG
/// pending"), with the bytes behind the mark queued and no wake-up to come
/// for them. A shard's thread blocks every signal the process catches but
/// `SIGURG` (`shard::run`; the others are ignored, so never pending, or
/// fatal), and the kernel delivers a pending one as the call returns, so a
/// `SIGURG` counted during the call ([`urgent_epoch`]) means that the
/// answer may be such a one: the read is made again, up to
/// [`MARK_RETRIES`] times; after that, `Interrupted`: bytes may be queued
/// that could not be read yet, and the caller must come back for them
/// without waiting for a wake-up. (`SIOCINQ` cannot tell: at the mark it
/// answers 0 whatever follows.)
pub fn recv_inq(
    fd: std::os::fd::RawFd,
    bufs: &mut [std::io::IoSliceMut<'_>],
    inq: bool,
) -> std::io::Result<(usize, Option<usize>)> {
    #[cfg(test)]
    if INTERRUPT_READS.get() > 0 {
        INTERRUPT_READS.set(INTERRUPT_READS.get() - 1);
        return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
    }
    if !inq {
        if let [one] = bufs {
            return recv_fd(fd, one).map(|n| (n, None));
        }
        return recvmsg_inq(fd, bufs, false);
    }
    for _ in 0..MARK_RETRIES {
        let epoch = urgent_epoch();
        match recvmsg_inq(fd, bufs, true) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && urgent_epoch() != epoch => {
                continue
            }
            r => return r,
        }
    }
    Err(std::io::Error::from(std::io::ErrorKind::Interrupted))
}

#[cfg(test)]
thread_local! {
    /// Tests: how many of this thread's next [`recv_inq`] calls answer
    /// `Interrupted` without reading, as one held at the urgent mark by
    /// [`MARK_RETRIES`] signals in a row would (which no test can cause at
    /// will).
    static INTERRUPT_READS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Tests: makes this thread's next `n` [`recv_inq`] calls answer
/// `Interrupted` (see `INTERRUPT_READS`).
#[cfg(test)]
pub fn interrupt_reads(n: u32) {
    INTERRUPT_READS.set(n);
}

/// How many times [`recv_inq`] reads again after a `SIGURG` came during
/// a read that found nothing.
pub const MARK_RETRIES: usize = 8;

/// One `recvmsg(2)` for [`recv_inq`].
fn recvmsg_inq(
    fd: std::os::fd::RawFd,
    bufs: &mut [std::io::IoSliceMut<'_>],
    inq: bool,
) -> std::io::Result<(usize, Option<usize>)> {
    // Room for one control message with an int: CMSG_SPACE(4) is 24 bytes
    // on 64-bit Linux; u64 gives the alignment cmsghdr needs.
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSliceMut` is ABI-compatible with `struct iovec` on Unix (std's
    // documented guarantee), and each points at a live, writable buffer.
    msg.msg_iov = bufs.as_mut_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    if inq {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
    }
    // SAFETY: `msg` points at `bufs.len()` iovecs over buffers that stay
    // borrowed (mutably) for the call, and at `control`, a live local of
    // the length given; the kernel writes only within them.
    let n = unsafe { libc::syscall(libc::SYS_recvmsg, fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut queued = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // within `msg_controllen` (0 without `inq`: no message); a TCP_CM_INQ
    // message carries one int, read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_TCP && (*c).cmsg_type == TCP_INQ {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                queued = usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, queued))
}
