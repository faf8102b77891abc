//! A TCP proxy on loopback that a test controls: pass traffic, cut the link, or stall
//! one direction (the unit's ACKs and reports go nowhere while server→unit flows).
//!
//! It works below TLS, so it can only delay or drop whole connections, never edit
//! bytes — the same faults a bad cellular or satellite link produces. It counts the
//! bytes it forwards each way (TLS records: what a metered link bills, less TCP/IP
//! headers).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Close every connection and refuse new ones.
    Down,
    /// Forward server→client, hold client→server (nothing the unit sends arrives).
    StallUp,
}

pub struct Proxy {
    pub port: u16,
    mode: Arc<watch::Sender<Mode>>,
    /// Bytes forwarded client→server and server→client, over every connection.
    counts: Arc<[AtomicU64; 2]>,
    task: tokio::task::JoinHandle<()>,
}

/// Bytes a proxy forwarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes {
    /// Client → server (a unit's uplink).
    pub up: u64,
    /// Server → client.
    pub down: u64,
}

impl Proxy {
    /// Listen on a random loopback port and forward to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (tx, _) = watch::channel(Mode::Pass);
        let mode = Arc::new(tx);
        let m = mode.clone();
        let counts: Arc<[AtomicU64; 2]> = Arc::default();
        let c = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *m.borrow() == Mode::Down {
                    continue; // dropped: refused
                }
                let rx = m.subscribe();
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pump(cr, sw, rx.clone(), true, &c[0]) => {}
                        _ = pump(sr, cw, rx, false, &c[1]) => {}
                    }
                });
            }
        });
        Ok(Proxy {
            port,
            mode,
            counts,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("tls://localhost:{}", self.port)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Bytes forwarded since the start (or the last [`Proxy::reset_counts`]).
    pub fn bytes(&self) -> Bytes {
        Bytes {
            up: self.counts[0].load(Ordering::Relaxed),
            down: self.counts[1].load(Ordering::Relaxed),
        }
    }

    /// Start counting from zero (e.g. once a unit is connected and idle).
    pub fn reset_counts(&self) {
        for c in self.counts.iter() {
            c.store(0, Ordering::Relaxed);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set(Mode::Down);
        self.task.abort();
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    client_to_server: bool,
    count: &AtomicU64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let m = *mode.borrow_and_update();
        match m {
            Mode::Down => return,
            Mode::StallUp if client_to_server => {
                if mode.changed().await.is_err() {
                    return;
                }
                continue;
            }
            _ => {}
        }
        tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // Counted before the write, so a reader that got the bytes sees them counted.
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    if w.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = mode.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What goes through is counted once, in its direction, over two connections.
    #[tokio::test]
    async fn counts_the_bytes_it_forwards_each_way() {
        // An upstream that answers every read with twice as many bytes.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_port = upstream.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&[b'x'; 2048][..2 * n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let proxy = Proxy::start(up_port).await.unwrap();
        for _ in 0..2 {
            let mut c = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
            c.write_all(&[1u8; 100]).await.unwrap();
            let mut got = vec![0u8; 200];
            c.read_exact(&mut got).await.unwrap();
        }
        assert_eq!(proxy.bytes(), Bytes { up: 200, down: 400 });
        proxy.reset_counts();
        assert_eq!(proxy.bytes(), Bytes::default());
    }
}
