//! One TCP connection of a session, tagged with the side it reaches.
//!
//! The handshake and the relay both do their I/O through [`Conn`], so the
//! handshake needs nothing from the relay. Every failure carries the
//! [`Peer`] it happened on (see [`crate::error::SessionError`]).

use std::cell::{Cell, RefCell};
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future::poll_fn;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

pub use crate::error::Peer;
use crate::error::SessionError;

/// A socket shared by the two pumps of one connection.
///
/// Each pump borrows it only for the duration of a single `poll_*` call, and a
/// shard is one thread, so the `RefCell` never conflicts. glommio keeps
/// separate read and write readiness sources per stream, so a pending read and
/// a pending write on the same socket do not interfere.
#[derive(Clone)]
pub struct Conn {
    stream: Rc<RefCell<TcpStream>>,
    peer: Peer,
    /// `SO_LINGER` {1, 0} is set: see [`Conn::reset_unless_finished`].
    abortive: Rc<Cell<bool>>,
    /// See [`crate::engine::Sock::owned_since`].
    owned_since: Option<u32>,
}

impl Conn {
    /// Wraps a stream its shard connected (and turns Nagle off: the relay
    /// writes whole chunks, so coalescing only adds latency).
    /// `owned_since`: the shard owns the socket for `SIGURG` since before
    /// the connect (see [`crate::engine::Sock::owned_since`]).
    pub fn connected(stream: TcpStream, peer: Peer, owned_since: Option<u32>) -> Self {
        let _ = stream.set_nodelay(true);
        Conn::wrap(stream, peer, owned_since)
    }

    /// Wraps a stream accepted from one of the shard's listeners. Nagle is
    /// off already: Linux copies `TCP_NODELAY` from the listener, where
    /// `shard::run` sets it ([`set_client_options`]), to every socket it
    /// accepts, which saves a `setsockopt` per connection.
    pub fn accepted(stream: TcpStream, peer: Peer) -> Self {
        Conn::wrap(stream, peer, None)
    }

    fn wrap(stream: TcpStream, peer: Peer, owned_since: Option<u32>) -> Self {
        Conn {
            stream: Rc::new(RefCell::new(stream)),
            peer,
            abortive: Rc::new(Cell::new(false)),
            owned_since,
        }
    }

    /// The socket, for [`crate::engine`] (its descriptor is valid while
    /// this `Conn` lives).
    pub fn sock(&self) -> crate::engine::Sock {
        crate::engine::Sock {
            fd: self.raw_fd(),
            owned_since: self.owned_since,
        }
    }

    /// A plain-TCP side (a `forward`'s two, an entry's client, an exit's
    /// origin) is closed with RST unless its session finished cleanly:
    /// `SO_LINGER` {1, 0} from here on, cleared by [`Conn::finished`].
    /// So when the process dies at once (`kill -9`, the OOM killer, a
    /// crash), the kernel's close of this socket resets the peer instead of
    /// sending a FIN after part of the stream, which would pass for a
    /// clean end (a break-it round saw origins take 355 KiB of a 512 KiB
    /// upload for a whole request). The tunnel sides need nothing: their
    /// peer is our own entry or exit, which takes a FIN without the end
    /// chunk for a truncation. `inherited`: the socket was accepted from a
    /// listener that has the option set ([`set_abortive_close`]), so no
    /// system call is needed here.
    pub fn reset_unless_finished(&self, inherited: bool) {
        if !inherited {
            let stream = self.stream.borrow();
            if socket2::SockRef::from(&*stream)
                .set_linger(Some(Duration::ZERO))
                .is_err()
            {
                return;
            }
        }
        self.abortive.set(true);
    }

    /// The session finished cleanly on this side (FIN each way): the close
    /// sends FIN after whatever is still queued, as usual (`SO_LINGER`
    /// cleared; with it set, the close would discard unacknowledged bytes).
    pub fn finished(&self) {
        if self.abortive.replace(false) {
            let stream = self.stream.borrow();
            let _ = socket2::SockRef::from(&*stream).set_linger(None);
        }
    }

    /// The socket's peer address (`getpeername`), if it still has one.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.borrow().peer_addr().ok()
    }

    /// Reads what the socket already holds into `buf`, without waiting:
    /// `Ok(0)` is "nothing yet" or EOF (EOF stays, so the relay's next read
    /// finds out which). An error (a reset) is returned, never dropped: the
    /// kernel reports a socket error once, so the next read would see a
    /// clean EOF where the peer reset.
    pub fn read_now(&self, buf: &mut [u8]) -> Result<usize, SessionError> {
        match crate::sys::recv_now(&*self.stream.borrow(), buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(self.fail("read", e)),
        }
    }

    /// Turns off quick ACKs (`TCP_QUICKACK` 0) for the handshake: a new
    /// connection ACKs its first segments at once, so each hello cost a
    /// segment of its own for its ACK; with delayed ACKs the ACK rides on
    /// the answer (the server hello, or the key confirmation), sent within
    /// microseconds. Best effort: the kernel re-enters quick-ACK mode on its
    /// own when it sees fit.
    pub fn delay_acks(&self) {
        let stream = self.stream.borrow();
        let _ = socket2::SockRef::from(&*stream).set_quickack(false);
    }

    /// The socket's descriptor, for [`crate::engine`] (valid while this
    /// `Conn` lives).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.stream.borrow().as_raw_fd()
    }

    /// Which side this socket reaches.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// Reads into `buf`; `Ok(0)` is EOF. Errors name this side.
    pub async fn read(&self, buf: &mut [u8]) -> Result<usize, SessionError> {
        poll_fn(|cx| Pin::new(&mut *self.stream.borrow_mut()).poll_read(cx, buf))
            .await
            .map_err(|e| self.fail("read", e))
    }

    /// Fills `buf` completely. EOF first is
    /// [`SessionError::HandshakeClosed`]: only handshakes read exact sizes.
    pub async fn read_exact(&self, buf: &mut [u8]) -> Result<(), SessionError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.read(&mut buf[filled..]).await? {
                0 => return Err(SessionError::HandshakeClosed(self.peer)),
                n => filled += n,
            }
        }
        Ok(())
    }

    /// Writes all of `buf`, calling `progress` after each partial write (the
    /// relay's idle clock). A peer that accepts zero bytes is an error.
    pub async fn write_all(
        &self,
        mut buf: &[u8],
        mut progress: impl FnMut(),
    ) -> Result<(), SessionError> {
        while !buf.is_empty() {
            let n = self.wrote(
                poll_fn(|cx| Pin::new(&mut *self.stream.borrow_mut()).poll_write(cx, buf)).await,
            )?;
            progress();
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Writes all of `buf`, then sends FIN, in one segment where it fits:
    /// the bytes are queued with `MSG_MORE` (the last partial segment is held
    /// back) and `shutdown(2)` sends them with FIN set. The peer then reads
    /// "last bytes, then end" on one wake instead of two. `progress` as in
    /// [`Conn::write_all`].
    pub async fn write_all_then_fin(
        &self,
        mut buf: &[u8],
        mut progress: impl FnMut(),
    ) -> Result<(), SessionError> {
        while !buf.is_empty() {
            let n = self.write_op(|fd| crate::sys::send_more(fd, buf)).await?;
            progress();
            buf = &buf[n..];
        }
        self.shutdown_write()
    }

    /// One write-like operation on the socket's descriptor, waiting for
    /// room (`TcpStream::poll_write_with`).
    async fn write_op(
        &self,
        mut op: impl FnMut(std::os::fd::RawFd) -> io::Result<usize>,
    ) -> Result<usize, SessionError> {
        self.wrote(poll_fn(|cx| self.stream.borrow_mut().poll_write_with(cx, &mut op)).await)
    }

    /// A write's result: at least one byte, or an error naming this side (a
    /// peer that accepts zero bytes is one).
    fn wrote(&self, result: io::Result<usize>) -> Result<usize, SessionError> {
        match result {
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::WriteZero, "peer accepted no bytes");
                Err(self.fail("write", e))
            }
            Ok(n) => Ok(n),
            Err(e) => Err(self.fail("write", e)),
        }
    }

    /// Sends FIN: shuts down our write half.
    pub fn shutdown_write(&self) -> Result<(), SessionError> {
        let stream = self.stream.borrow();
        socket2::SockRef::from(&*stream)
            .shutdown(Shutdown::Write)
            .map_err(|e| self.fail("shutdown", e))
    }

    /// Makes the close send RST instead of FIN (`SO_LINGER` 0). The socket is
    /// closed when the session drops its last `Conn`, right after this.
    pub fn abort(&self) {
        let stream = self.stream.borrow();
        // Best effort: the socket may already be dead, which is the point.
        let _ = socket2::SockRef::from(&*stream).set_linger(Some(Duration::ZERO));
    }

    fn fail(&self, op: &'static str, source: io::Error) -> SessionError {
        SessionError::Io {
            peer: self.peer,
            op,
            source,
        }
    }
}

/// Sets the options every accepted socket needs: Nagle off (`TCP_NODELAY`,
/// see [`Conn::accepted`]), and, for `plain_clients`, `SO_LINGER` {1, 0}
/// (see [`Conn::reset_unless_finished`]). Set on a listener, as
/// `shard::run` does, they reach every socket it accepts (Linux copies a
/// listener's options to them); set on an accepted socket, they stand in
/// for a listener that lacked them (`listener::accept_loop`). Best effort.
pub fn set_client_options(socket: &socket2::Socket, plain_clients: bool) {
    let _ = socket.set_nodelay(true);
    if plain_clients {
        let _ = socket.set_linger(Some(Duration::ZERO));
    }
}
