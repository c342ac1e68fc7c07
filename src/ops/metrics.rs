//! `--metrics ADDR`: the cluster's figures in Prometheus text format at `/metrics`, served
//! by the master inside its loop (see `ops/conns.rs`; this is the master's own endpoint, not a
//! connection of the app).

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use anyhow::Context;
use nix::poll::PollFlags;

use crate::ops::conns::Conns;
use crate::ops::status::ClusterStatus;

/// Longest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Scrapes served at once: any network peer can connect, so idle connections must not
/// crowd out the scraper (the oldest idle one also makes room past this, see ops/conns.rs).
const MAX_CONNS: usize = 128;

/// The metrics endpoint.
pub struct MetricsServer {
    listener: TcpListener,
    conns: Conns<TcpStream>,
}

impl MetricsServer {
    /// Listens on `addr`.
    pub fn bind(addr: SocketAddr) -> anyhow::Result<MetricsServer> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("--metrics {addr}: listening"))?;
        listener.set_nonblocking(true)?;
        Ok(MetricsServer {
            listener,
            conns: Conns::with_limit(MAX_REQUEST, MAX_CONNS),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The fds to poll.
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, PollFlags)> {
        let mut fds = Vec::new();
        if self.conns.accepting(Instant::now()) {
            fds.push((self.listener.as_fd(), PollFlags::POLLIN));
        }
        fds.extend(self.conns.poll_fds());
        fds
    }

    /// When the oldest connection times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.next_deadline()
    }

    /// The listening socket's fd (the master accepts only once it polls readable).
    pub fn listener_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.listener)
    }

    /// Accepts (when `listener_ready`), reads; answers what it can itself and returns the
    /// ids that want metrics.
    pub fn service(&mut self, now: Instant, listener_ready: bool) -> Vec<u64> {
        let listener = &self.listener;
        let accept = || {
            let (stream, _) = listener.accept()?;
            stream.set_nonblocking(true)?;
            Ok(stream)
        };
        let busy = http(503, "text/plain", "too many connections\n");
        if listener_ready {
            self.conns.accept_all(now, accept, |_| None, &busy);
        }
        let head_end = |input: &[u8]| {
            input
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| p + 4)
        };
        let too_long = |_| http(431, "text/plain", "request head too long\n");
        let mut wanted = Vec::new();
        for (id, head) in self.conns.read(now, head_end, too_long) {
            let head = String::from_utf8_lossy(&head);
            let mut request_line = head.lines().next().unwrap_or("").split_whitespace();
            match (request_line.next(), request_line.next()) {
                (Some("GET"), Some("/metrics")) => wanted.push(id),
                (Some("GET"), _) => self
                    .conns
                    .respond(id, http(404, "text/plain", "see /metrics\n")),
                _ => self
                    .conns
                    .respond(id, http(405, "text/plain", "GET /metrics\n")),
            }
        }
        wanted
    }

    /// Answers request `id` with the metrics of `status`.
    pub fn respond(&mut self, id: u64, status: &ClusterStatus) {
        self.conns.respond(
            id,
            http(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &render(status),
            ),
        );
    }
}

fn http(code: u16, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The Prometheus text exposition of `status`.
pub fn render(status: &ClusterStatus) -> String {
    let mut out = String::new();
    let cluster = format!("cluster=\"{}\"", escape(&status.name));
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP reuseport_cluster_{name} {help}");
        let _ = writeln!(out, "# TYPE reuseport_cluster_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "reuseport_cluster_{name}{{{cluster}{labels}}} {value}");
        }
    };
    // One series per slot: its serving worker (a slot has two workers during its surge).
    let serving: Vec<_> = status.workers.iter().filter(|w| w.serving).collect();
    let per_slot = |value: &dyn Fn(&crate::ops::status::WorkerStatus) -> f64| {
        serving
            .iter()
            .map(|w| (format!(",slot=\"{}\"", w.slot), value(w)))
            .collect::<Vec<_>>()
    };
    family(
        "workers_configured",
        "gauge",
        "Worker slots configured.",
        vec![(String::new(), status.workers_configured as f64)],
    );
    family(
        "workers_ready",
        "gauge",
        "Slots whose worker is ready.",
        vec![(String::new(), status.workers_ready as f64)],
    );
    family(
        "generation",
        "gauge",
        "Newest generation started by a rolling restart (1 at start).",
        vec![(String::new(), status.generation as f64)],
    );
    family(
        "worker_restarts_total",
        "counter",
        "Workers started in a slot to replace one that exited.",
        per_slot(&|w| w.restarts as f64),
    );
    family(
        "worker_uptime_seconds",
        "gauge",
        "Seconds since the slot's worker was started.",
        per_slot(&|w| w.uptime_s),
    );
    family(
        "rolling_restarts_total",
        "counter",
        "Rolling restarts begun.",
        vec![(String::new(), status.rolling_restarts_total as f64)],
    );
    family(
        "rolling_restarts_failed_total",
        "counter",
        "Rolling restarts stopped by a failing new worker.",
        vec![(String::new(), status.rolling_restarts_failed as f64)],
    );
    family(
        "queues_moved_total",
        "counter",
        "Stalled workers' accept queues moved to the workers in rotation (bpf steering).",
        vec![(String::new(), status.queues_moved as f64)],
    );
    family(
        "connections_moved_total",
        "counter",
        "Connections those moves took off stalled workers.",
        vec![(String::new(), status.connections_moved as f64)],
    );
    family(
        "queue_move_listen_seconds_max",
        "gauge",
        "The slowest listen(2) of a queue move: it grows with the sockets bound to the port, and the moves are spaced by it.",
        vec![(String::new(), status.queue_move_listen_max_ms / 1000.0)],
    );
    family(
        "parked_connections",
        "gauge",
        "Connections waiting in the master's parking socket for a worker with room (bpf steering).",
        vec![(String::new(), status.parked as f64)],
    );
    family(
        "parked_connections_handed_on_total",
        "counter",
        "Parked connections handed on to workers with room.",
        vec![(String::new(), status.parked_connections_handed_on as f64)],
    );
    family(
        "parking_sockets_closed_unfinished_total",
        "counter",
        "Parking sockets closed after waiting 100 ms for handshakes that never completed (SYNs dropped, clients gone).",
        vec![(String::new(), status.parking_sockets_closed_unfinished as f64)],
    );
    family(
        "recycles_total",
        "counter",
        "Workers recycled (--max-memory, --max-lifetime, --hung-after), by reason.",
        ["memory", "lifetime", "hung"]
            .iter()
            .map(|r| {
                let n = status.recycles.get(*r).copied().unwrap_or(0);
                (format!(",reason=\"{r}\""), n as f64)
            })
            .collect(),
    );
    family(
        "degraded",
        "gauge",
        "1 while a slot crash-loops (dies before ready or within --min-uptime of it, again and again); `status` says why.",
        vec![(String::new(), status.degraded.is_some() as u8 as f64)],
    );
    family(
        "worker_deaths_total",
        "counter",
        "Workers that died without the master asking, by cause: exit, signal, oom_killer, other_process (a SIGKILL from neither the master nor the OOM killer), unknown.",
        crate::master::deaths::Cause::LABELS
            .iter()
            .map(|c| {
                let n = status.worker_deaths.get(*c).copied().unwrap_or(0);
                (format!(",cause=\"{c}\""), n as f64)
            })
            .collect(),
    );
    family(
        "worker_memory_bytes",
        "gauge",
        "Memory of the slot's worker's whole process tree (sum of PSS).",
        per_slot(&|w| w.memory_bytes as f64),
    );
    let queue = |depth: bool| {
        serving
            .iter()
            .flat_map(|w| {
                w.queues.iter().map(move |q| {
                    let bind = status
                        .binds
                        .iter()
                        .find(|b| b.fd == q.fd)
                        .map_or(String::new(), |b| escape(&b.name));
                    let value = if depth { q.depth } else { q.backlog };
                    (
                        format!(",slot=\"{}\",bind=\"{bind}\"", w.slot),
                        value as f64,
                    )
                })
            })
            .collect::<Vec<_>>()
    };
    family(
        "accept_queue_depth",
        "gauge",
        "Connections waiting in a worker's listening socket's accept queue.",
        queue(true),
    );
    family(
        "accept_queue_backlog",
        "gauge",
        "Limit of that accept queue (the effective listen backlog).",
        queue(false),
    );
    out
}

/// Escapes a label value.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
