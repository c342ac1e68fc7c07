//! The life of each slot's listening sockets: who opens them, who holds them, when they are
//! handed to a successor, when they close. The one owner of that logic.
//!
//! **Opening.** A slot's first worker opens the slot's SO_REUSEPORT sockets itself, in the
//! forked child before exec (master/spawn.rs), as it always did. Just before exec the child also
//! sends each socket it opened to the master over the close-on-exec socketpair that carries
//! its start-up report (SCM_RIGHTS; received with MSG_CMSG_CLOEXEC). That channel already
//! exists and sendmsg(2) is async-signal-safe; pidfd_getfd(2) would need Linux 5.6 and
//! ptrace rights over the worker, which a `--user` drop or Yama can take away.
//!
//! **Holding.** The master keeps that reference, close-on-exec, for as long as the slot
//! lives. It never accepts on it: it only keeps the socket (and the connections queued on
//! it) alive between workers.
//!
//! **Handing over.** Every later worker of the slot, a rolling restart's new worker, a
//! crashed worker's replacement, gets that very socket at its fd 3.. (the same LISTEN_FDS
//! contract). During a surge the old and the new worker accept from one queue, so the old
//! one closing its fd loses nothing, whatever net.ipv4.tcp_migrate_req says; after a crash
//! the queued connections wait for the replacement instead of being reset.
//!
//! **Closing.** The master lets go of a slot's sockets when
//! - the slot crash-loops (its restart delay reached [`RELEASE_AFTER_BACKOFF`]): held, the
//!   socket would keep taking 1/N of the new connections with nobody to serve them;
//! - the slot is scaled away, or the master stops: its worker's own fd then decides, as
//!   without takeover (queued connections migrate only with tcp_migrate_req=1);
//! - the socket no longer listens (the app called shutdown(2) on it, which ends it for every
//!   holder). The next worker of the slot opens a fresh socket; a worker still serving the
//!   dead one is replaced ([`SlotSockets::lost`]).
//!
//! The supervisor decides *when* (as [`crate::master::supervisor::Action::ReleaseSockets`]); this
//! module holds the fds and answers what a spawn gets.
//!
//! **Steering** (`--steer bpf`, see sockets/bpf.rs). Because the master holds every slot's socket,
//! it also keeps the SK_REUSEPORT program's socket map (key: slot) and its rotation (the
//! slots that take new connections). A slot is in rotation while its current worker is
//! ready and accepts; the map entry of a slot follows its held socket (added when the
//! master takes hold, removed when it lets go, and the kernel drops a closed socket
//! itself), so a crash replacement, which inherits the socket, needs no update.
//!
//! *Load.* A worker that stops accepting leaves the rotation: the master compares each
//! socket's accept queue (TCP_INFO) with the connections the program sent it. It samples
//! every [`SAMPLE_EVERY`] only while a queue is non-empty, a worker is out, or a socket
//! drains; otherwise it waits in poll(2) for a held socket to become readable (a queued
//! connection), so an idle master sleeps. A worker is out once it accepted nothing between
//! two samples while something waited in its queue at both, or while two or more arrived;
//! it is back once its queue is empty. Between samples the program itself limits the harm:
//! each sample tells it what every slot had accepted, and of the slot whose turn it is and
//! the next two it picks the one with the fewest connections outstanding (sent since then,
//! counted live, plus what was queued then), so a worker that stalls soon gets nothing.
//! What it had queued moves: a worker out of rotation that takes nothing for
//! [`EVACUATE_AFTER`] has its socket stopped and started again (shutdown(2), listen(2)) while
//! its processes are frozen, which makes the program place the queue on the rotation and
//! leaves the worker its socket ([`Evacuation`]).
//!
//! *Parking* (the default; off with [`PARK_ENV`]`=0`). With two or more workers ready the master also
//! keeps a parking socket in the group, never accepted from ([`Parking`]): while something
//! is queued, parked or out, the program caps what each worker has outstanding at a couple
//! of samples' worth of what the fastest takes ([`CAP_PER_TAKEN`]), and sends what finds every
//! candidate at its cap (all of it while every worker is out) to the parking socket; each
//! sample (every [`SAMPLE_WHILE_PARKED`] while something is parked) where a worker in
//! rotation has room, the master stops the parking socket and the kernel passes its queue
//! through the program again. Binding is then late for exactly the
//! connections that would otherwise wait on a worker that stalled after it was picked, and
//! a stalled worker's queue, moved once it has been quiet for twice its usual quiet spell
//! (at least [`EVACUATE_TO_PARK_AFTER`]), waits there too.
//!
//! *Drain before stop.* In a rolling restart the new worker of a slot opens a fresh socket
//! (not the held one); once it is ready ([`SlotSockets::begin_drain`]) its socket replaces
//! the old one in the map and in the hold, the old socket gets no new connections, and
//! once its queue has stayed empty for [`DRAIN_SETTLE`] and the old worker holds no
//! connection it accepted but has not read (sockets/diag.rs; an eager server such as
//! uvicorn closes those when it stops) the supervisor is told
//! ([`crate::master::supervisor::Event::Drained`]) and stops the old worker. A worker that
//! takes nothing from its queue for [`DRAIN_STUCK`] is stopped then. What is still on the
//! old socket when it closes (a handshake in flight, a stuck queue) is moved by the program.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant, SystemTime};

use nix::poll::PollFlags;
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::Pid;

use crate::cli::Steer;
use crate::master::supervisor::Event;
use crate::sockets::bpf;

/// How often the master samples the accept queues while something is queued.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// How often while connections are parked: a worker that frees up meanwhile is idle until
/// the next sample hands it some. Under the 1 % slow bench scenario (every worker blocked
/// most of the time), p99 medians of 3 alternating runs: 262 ms sampling every 5 ms, 239 ms
/// every 2 ms, 222 ms every 1 ms, against 239 ms for Node's round robin; the master's CPU
/// 0.6, 0.9 and 1.2 s per 10 s (the round robin primary's 1.3 s). With the stall cap and the
/// hint of [`HINT_MISSES`], and the loop's wait to the microsecond (ppoll), 8 rounds
/// alternating: 219.5 ms (215-221) every 0.5 ms against 222 (217-252) every 1 ms, the master
/// at 1.5-1.7 s per 10 s against 1.0-1.3 s (the round robin primary's 1.0 s in the same
/// rounds; the bench's slow row shows it); then 5 rounds alternating with Node's cluster
/// module: 218 ms (215-220) against round robin's 234 and the shared socket's 235. Every
/// 250 us: no better (224 against 223 ms, 4 rounds), at 2.0-2.1 s of the master's CPU.
pub const SAMPLE_WHILE_PARKED: Duration = Duration::from_micros(500);

/// How long a draining socket's queue must stay empty before its worker is stopped: time
/// for the worker to read what it accepted last.
pub const DRAIN_SETTLE: Duration = Duration::from_millis(100);

/// How often a settled drain asks whether the old worker has read every connection it
/// accepted (a read of its /proc/PID/fd and one sock_diag dump).
pub const UNREAD_CHECK_EVERY: Duration = Duration::from_millis(10);

/// A connection accepted this recently with nothing received on it yet counts as unread: its
/// request may be on its way (see sockets/diag.rs).
pub const UNREAD_YOUNG: Duration = Duration::from_secs(1);

/// A draining socket whose queue stays non-empty this long without its worker accepting any
/// of it belongs to a worker that does not accept now (Puma with every thread held by a
/// keep-alive connection): the master shuts the socket down, so that the program moves the
/// queue to the rotation, and the worker is stopped, instead of the queued clients waiting
/// out [`DRAIN_TIMEOUT`].
pub const DRAIN_STUCK: Duration = Duration::from_millis(500);

/// A worker out of rotation for not accepting, with connections still queued and none of
/// them taken for this long, has its queue moved to the workers in rotation (see
/// [`Evacuation`]): they would otherwise wait for as long as it stalls.
pub const EVACUATE_AFTER: Duration = Duration::from_millis(50);

/// The least of the same with a parking socket (see [`Parking`] and [`QUIET_SPELLS`]): what
/// is moved then waits for the first worker with room instead of being pushed onto another
/// that may stall in turn.
pub const EVACUATE_TO_PARK_AFTER: Duration = Duration::from_millis(10);

/// The most of the time evacuations may spend in listen(2). A socket that listened before
/// listens again only after the kernel checks it against every socket bound to its port,
/// established and TIME_WAIT ones included, with the port's bind-bucket lock held and bottom
/// halves off: meanwhile no new connection to the port completes on any CPU. That takes
/// 0.33 ms with 8 000 connections on the port and 0.62 ms with 13 500 TIME_WAIT sockets
/// (scripts/measure-relisten.py), and grows with them: after each evacuation the next
/// waits 1 / this times what its listen(2) took (9 ms after 0.45 ms, 100 ms after 5 ms).
pub const EVACUATION_LISTEN_SHARE: f64 = 0.05;

/// A listen(2) this slow in an evacuation is said in the log (once per master).
pub const SLOW_RELISTEN: Duration = Duration::from_millis(1);

/// How long an evacuation waits for the stalled worker's processes to stop before it gives
/// up (and continues them).
pub const FREEZE_WAIT: Duration = Duration::from_millis(20);

/// A worker whose queue was moved stays out of rotation this long, doubled for each
/// evacuation in a row up to [`HOLD_OUT_MAX`]: sent connections again at once, a worker
/// still stalled would hold a few more for [`EVACUATE_AFTER`] each time.
pub const HOLD_OUT: Duration = EVACUATE_AFTER;

/// The longest a worker is held out of rotation after its queue moved.
pub const HOLD_OUT_MAX: Duration = Duration::from_millis(800);

/// With a parking socket a worker's queue moves once it has been quiet this many times its
/// usual quiet spell (between [`EVACUATE_TO_PARK_AFTER`] and [`EVACUATE_AFTER`]).
const QUIET_SPELLS: f32 = 2.0;

/// The weight of a quiet spell in a worker's usual one: 1/8.
const QUIET_WEIGHT: f32 = 1.0 / 8.0;

/// While every worker is out and connections are parked, a worker held out this long comes
/// back (on probation) whatever its hold-out: the master cannot tell whether it is free
/// again (nothing is queued on it), and the parked connections would wait for as long as
/// it is held out.
pub const HOLD_OUT_WHILE_PARKED: Duration = HOLD_OUT;

/// A worker back in rotation after its queue was moved is sent at most this many
/// connections (the program's cap, [`bpf::Steer::set_cap`]) until a sample sees it accept:
/// one still stalled then holds two, not a 5 ms share of all new connections.
pub const PROBATION_CAP: u64 = 2;

/// With a parking socket, while something is queued, parked or out, every worker is capped
/// at [`CAP_MIN`] plus this many times what the fastest takes per sample when it takes
/// anything (smoothed, [`RATE_WEIGHT`]): a worker that keeps up is never near it (the
/// program's count of what it has outstanding includes what it took since the last sample,
/// about one sample's worth), and one that stops accepting holds a few connections, not a
/// pile; what no worker has room for waits in the parking socket for the first that has
/// (see [`Parking`]). With every queue empty there is no cap: the master may stop sampling
/// then, and the count would grow with every connection a worker takes.
pub const CAP_PER_TAKEN: f32 = 2.0;
pub const CAP_MIN: u64 = 2;

/// While workers stall (the queue of a worker that had been accepting was moved within
/// [`STALLING_WITHIN`]) the cap is this, whatever
/// the rate: a worker that blocks then holds 3 connections where it held a couple of samples'
/// worth, and the rest wait in the parking socket for the first worker free, as in a shared
/// queue. Where nothing stalls the cap stays as above, which fast workers need (a cap of 3 for
/// good halved the uniform bench load, 9 600 against 19 700 req/s). Under the 1 % slow bench
/// scenario, with the hint of [`HINT_MISSES`] bringing freed workers back: p99 225 ms (227,
/// 225, 225, 225, 224) against the shared socket's 226 and 248 before; 2 + once the rate, at
/// least 3, instead: 259, 320 and 278 ms (the fastest takes more than 1 per sample there).
pub const CAP_WHILE_STALLING: u64 = 3;

/// A queue moved this recently off a worker that had been accepting means workers stall (see
/// [`CAP_WHILE_STALLING`]). Moves of a worker on probation do not count: with them, one worker
/// SIGSTOPped for 3 s kept every worker at the stall cap for the whole 3 s. The others took
/// 17 000-17 500 req/s in scratch runs of the bench's stalled-worker scenario, against
/// 19 100-19 900 counting only the first move (19 800 without parking, which has no cap); in
/// the bench, 21 318 before and 25 367 after.
pub const STALLING_WITHIN: Duration = Duration::from_millis(200);

/// The cap on every worker's outstanding connections under pressure, from what the fastest
/// takes per sample; `stalling`: see [`stalling`].
fn cap_for(fastest: f32, stalling: bool) -> u64 {
    match stalling {
        true => CAP_WHILE_STALLING,
        false => CAP_MIN + (CAP_PER_TAKEN * fastest).ceil() as u64,
    }
}

/// A worker held out after its queue moved comes back as soon as its main thread waits for
/// events (an idle event loop: its slow handler is over), rather than when its hold-out ends:
/// held out, a freed worker idled while clients waited (3.5 % of the workers' time under the
/// 1 % slow bench scenario; 0.8 % with this). The hint can be wrong (a server whose
/// accepting is done by another process or thread, gunicorn's arbiter in select(2)): a worker
/// brought back by it that is moved again without accepting anything counts a miss, and
/// after this many in a row the hint is not used for it until it next accepts.
pub const HINT_MISSES: u8 = 2;

/// Whether the waiting-for-events hint may bring a held-out worker back (see [`HINT_MISSES`]).
#[derive(Debug, Clone, Copy, Default)]
struct Hint {
    /// Back in rotation on the hint, not seen accepting since.
    pending: bool,
    /// Moves in a row right after coming back on the hint.
    misses: u8,
}

impl Hint {
    fn trusted(&self) -> bool {
        self.misses < HINT_MISSES
    }
    fn brought_back(&mut self) {
        self.pending = true;
    }
    fn accepted(&mut self) {
        *self = Hint::default();
    }
    fn moved(&mut self) {
        if self.pending {
            self.pending = false;
            self.misses = self.misses.saturating_add(1);
        }
    }
}

/// The weight of a sample in a worker's smoothed accept rate: 1/16, about 80 ms of samples
/// where it accepted, so that one burst (a parked queue handed on) raises its cap little.
const RATE_WEIGHT: f32 = 1.0 / 16.0;

/// A draining socket whose queue never empties (its worker stalls) is given up after this;
/// its worker is stopped and the program moves the queue when the socket closes.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A slot whose next restart is at least this far away lets go of its sockets: 100 ms,
/// 200, 400 and 800 ms of backoff keep them (1.5 s of queued connections waiting for a
/// replacement); the fifth crash in a row, with its 1.6 s delay, releases them.
pub const RELEASE_AFTER_BACKOFF: Duration = Duration::from_secs(1);

/// Environment variable that turns socket takeover off (`0`): each worker then opens its
/// own sockets, as before takeover. For comparisons and the tests' control cases.
pub const TAKEOVER_ENV: &str = "REUSEPORT_CLUSTER_TAKEOVER";

/// Environment variable that turns evacuation off (`0`): a stalled worker's queue then
/// waits for it (see [`Evacuation`]). For users who must not have their workers stopped and
/// continued, and for the tests' control cases.
pub const EVACUATE_ENV: &str = "REUSEPORT_CLUSTER_EVACUATE";

/// The sockets the master holds for one slot.
#[derive(Debug)]
struct Held {
    /// One per bind, in fd order.
    fds: Vec<OwnedFd>,
    /// Their inodes, in the same order.
    inodes: Vec<u64>,
    /// When the master took hold of them.
    since: Instant,
    /// The same moment on the wall clock, for `status`.
    since_wall: SystemTime,
    /// Workers started with them.
    workers: u32,
}

/// What `status` shows of a slot's held sockets.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldView {
    /// Inodes, in fd order.
    pub inodes: Vec<u64>,
    /// How long they have been held.
    pub held_for: Duration,
    /// Seconds since the epoch when the master took hold of them.
    pub since_unix_s: u64,
    /// Workers of the slot started with them so far.
    pub workers: u32,
}

/// The master's references to every slot's listening sockets.
#[derive(Debug)]
pub struct SlotSockets {
    enabled: bool,
    binds: usize,
    held: BTreeMap<usize, Held>,
    /// The steering program, or why there is none.
    steering: Result<Steering, String>,
    /// Slots whose next worker opens fresh sockets although the slot is held (a rolling
    /// restart's new worker under steering), and that worker's fresh sockets until it is
    /// ready.
    fresh_wanted: BTreeSet<usize>,
    pending: BTreeMap<usize, (Pid, Held)>,
    /// Old sockets being drained, by slot, with the worker to stop afterwards.
    draining: BTreeMap<usize, Draining>,
}

/// The program of each bind and what the master knows of the load.
#[derive(Debug)]
struct Steering {
    /// One per bind, in fd order.
    groups: Vec<bpf::Steer>,
    /// The slots in the program's rotation (a parking socket's key while every worker is
    /// behind).
    rotation: Vec<usize>,
    /// The overflow written with it.
    overflow: Option<usize>,
    /// Slots whose current worker is ready, with that worker (the supervisor's view).
    serving: BTreeMap<usize, Pid>,
    /// The last sample of each serving slot.
    load: BTreeMap<usize, Load>,
    /// When to sample next; `None`: wait for a held socket to become readable.
    next_sample: Option<Instant>,
    /// Queues being moved off stalled workers, by slot.
    evacuating: BTreeMap<usize, Evacuation>,
    /// Queues moved so far, and the connections they held.
    evacuations: (u64, u64),
    /// When the next may begin, from what the last ones' listen(2) took.
    pace: EvacuationPace,
    /// Whether stalled workers' queues are moved ([`EVACUATE_ENV`]).
    evacuate: bool,
    /// The master's parking sockets, when it could open them.
    park: Option<Parking>,
}

/// Late binding for what no worker has room for, with the master still off the data path.
///
/// A connection is bound to a worker's socket when its SYN arrives; a worker that then
/// blocks (a slow request, a stop) keeps everything queued on its socket until it is back
/// or its queue is moved, while a shared queue would hand each connection to whichever
/// worker frees up first. So the program caps each worker's outstanding connections (see
/// [`CAP_PER_TAKEN`]), and what finds every candidate at its cap goes to a parking socket
/// the master keeps in the group, bound like the workers' (same address and options) and
/// never accepted from ("every candidate": the [`bpf::CHOICES`] the program compares, so with
/// more workers one not compared may still have room). While every worker is behind,
/// everything goes there.
///
/// At each sample where something is parked and a worker in rotation has room, the master
/// hands the parked connections on: it binds a fresh parking socket, makes it listen, writes
/// it as the overflow instead of the parked one (it *retires* that one), then shuts the
/// retired one down and closes it, which makes the kernel pass its whole queue through
/// the program (as for a stalled worker's queue, see [`Evacuation`]): each connection goes to
/// a worker with room, or, past their caps, to the fresh parking socket, for the next
/// sample. No process accepts from a parking socket, so nothing needs freezing. While fewer
/// than two workers are ready none listens (as before).
///
/// A retired socket is shut down once every handshake the program sent it has completed
/// (see [`ParkSet::in_flight`]; at once, usually, or at a later sample): a listener that stops
/// while the kernel completes a handshake on it resets that connection (the final ACK found
/// it listening; the new connection then finds it closed, `inet_csk_reqsk_queue_add`, and is
/// dropped with a RST). The kernel moves a stopped listener's handshakes only when their
/// final ACK comes after the stop. Shutting the parked socket down right after the switch,
/// with hand-ons back to back under 3 closed-loop clients, reset 305-817 connections in 3 s
/// (about 90 000 answered; `load_handing_on_control_…`); retired first and shut down as
/// above, none (`load_handing_parked_connections_on_back_to_back_resets_none`). This was the
/// cause of the rare resets that had kept parking opt-in.
///
/// Fresh, because listen(2) on a socket that listened before is slow where connections
/// churn: the kernel then checks the port for conflicts against every socket bound to it,
/// TIME_WAIT included (2-9 ms with 13 000 of them in an earlier profile of the 1 % slow bench
/// scenario, where it took 57 % of the master's CPU, 0.71 ms median in the latest; 0.33-0.62
/// ms on a quiet port, see [`EVACUATION_LISTEN_SHARE`]), while a socket that never listened, in a port whose
/// sockets all have SO_REUSEPORT, skips that check (bind and listen 3-20 us).
#[derive(Debug)]
struct Parking {
    /// How to bind a parking socket, one per bind.
    specs: Vec<crate::sockets::listen::ListenSpec>,
    /// A set bound ahead (at start-up, so that what cannot bind fails there).
    spare: Option<Vec<OwnedFd>>,
    /// The sets under key `i` (see [`Parking::key`]): the one that listens, and retired ones.
    sets: [Option<ParkSet>; bpf::PARK_KEYS],
    /// The one that listens.
    current: Option<usize>,
    /// Times parked connections were handed on, and how many.
    counts: (u64, u64),
    /// Retired sets closed with handshakes still in flight, after [`RETIRE_MAX`].
    forced: u64,
}

/// One parking socket per bind, under one key.
#[derive(Debug)]
struct ParkSet {
    fds: Vec<OwnedFd>,
    /// What the program had sent to the key, per bind, when this set began listening.
    sent_before: Vec<u64>,
    /// When the rotation stopped naming it.
    retired: Option<Instant>,
}

impl ParkSet {
    fn queued(&self) -> u32 {
        self.fds
            .iter()
            .map(|f| bpf::accept_queue(f.as_fd()).unwrap_or(0))
            .sum()
    }

    /// Handshakes sent to this set that have not completed yet: no one accepts from a parking
    /// socket, so each connection the program sent it (a SYN, or one moved from a stopped
    /// socket) is either in its queue or still in its handshake. Counted with the program's
    /// own count, which is taken before the kernel makes the request, so a SYN being handled
    /// counts as in flight.
    fn in_flight(&self, key: usize, groups: &[bpf::Steer]) -> u64 {
        groups
            .iter()
            .zip(&self.fds)
            .zip(&self.sent_before)
            .map(|((g, f), before)| {
                let sent = g.sent(key).unwrap_or(0).saturating_sub(*before);
                sent.saturating_sub(bpf::accept_queue(f.as_fd()).unwrap_or(0) as u64)
            })
            .sum()
    }
}

/// How long after the rotation stopped naming a parking socket every run of the program that
/// read the rotation before has ended, whether or not a moment with no run under way was seen
/// (runs take microseconds).
pub const RUNS_END_WITHIN: Duration = Duration::from_micros(500);

/// How long a retired parking socket waits for its handshakes before it is closed anyway:
/// a SYN dropped, or a client gone, never completes. Long enough for the round trips of
/// far-away clients.
pub const RETIRE_MAX: Duration = Duration::from_millis(100);

/// What `status` shows of parking.
#[derive(Debug, Default, Clone, Copy)]
pub struct ParkingView {
    /// Whether the master keeps parking sockets.
    pub on: bool,
    /// Connections parked now.
    pub parked: u32,
    /// Times parked connections were handed on, and how many.
    pub hand_ons: u64,
    pub handed_on: u64,
    /// Parking sockets closed after [`RETIRE_MAX`] with handshakes unfinished (SYNs dropped,
    /// clients gone): 0 where every client completes its handshake.
    pub closed_unfinished: u64,
}

/// The mean of the values above 0 (0 is "not measured yet"), 0 when there are none.
fn mean_of_known(values: impl Iterator<Item = f32>) -> f32 {
    let (sum, n) = values
        .filter(|v| *v > 0.0)
        .fold((0.0, 0u32), |(sum, n), v| (sum + v, n + 1));
    sum / n.max(1) as f32
}

/// The backlog of a parking socket (the kernel caps it at net.core.somaxconn).
const PARK_BACKLOG: i32 = 65535;

/// Turns parking off with `PARK_ENV=0` (on by default). It was opt-in for a few hours: in
/// runs of the steering tests together a client got a connection reset now and then (3 times
/// in about 17 runs), from parked sockets shut down with handshakes in flight; see
/// [`Parking`] for the cause and the fix.
pub const PARK_ENV: &str = "REUSEPORT_CLUSTER_PARK";

impl Parking {
    /// Binds one set of parking sockets (not listening yet): what cannot bind fails here,
    /// at start-up.
    fn open(specs: &[crate::sockets::listen::ListenSpec]) -> Result<Parking, String> {
        Ok(Parking {
            specs: specs.to_vec(),
            spare: Some(Self::bind(specs)?),
            sets: Default::default(),
            current: None,
            counts: (0, 0),
            forced: 0,
        })
    }

    fn bind(specs: &[crate::sockets::listen::ListenSpec]) -> Result<Vec<OwnedFd>, String> {
        specs
            .iter()
            .map(|spec| {
                crate::sockets::listen::open(spec, None)
                    .map(OwnedFd::from)
                    .map_err(|(step, e)| format!("{step:?}: {e}"))
            })
            .collect()
    }

    /// The key of parking socket `i` in the program's maps.
    fn key(i: usize) -> usize {
        bpf::PARK + i
    }

    /// A key with no set, for the next one to listen.
    fn free(&self) -> Option<usize> {
        self.sets.iter().position(Option::is_none)
    }

    /// Makes a parking socket that never listened listen under free key `i` (the one bound
    /// ahead, or a fresh one) and puts it in the maps.
    fn listen(&mut self, i: usize, groups: &[bpf::Steer]) -> std::io::Result<()> {
        let fds = match self.spare.take() {
            Some(fds) => fds,
            None => Self::bind(&self.specs).map_err(std::io::Error::other)?,
        };
        let mut sent_before = Vec::new();
        for (group, fd) in groups.iter().zip(&fds) {
            socket2::SockRef::from(fd).listen(PARK_BACKLOG)?;
            group.set_cap(Self::key(i), 0)?;
            sent_before.push(group.sent(Self::key(i))?);
            group.set_socket(Self::key(i), fd.as_fd())?;
        }
        self.sets[i] = Some(ParkSet {
            fds,
            sent_before,
            retired: None,
        });
        Ok(())
    }

    /// Makes a parking socket listen under the first free key: the key, or `None` while every
    /// key waits for its handshakes (the next sample tries again).
    fn listen_next(&mut self, groups: &[bpf::Steer]) -> Option<std::io::Result<usize>> {
        let i = self.free()?;
        Some(self.listen(i, groups).map(|()| i))
    }

    /// Connections waiting in parking sockets, the retired ones' included.
    fn queue(&self) -> u32 {
        self.sets.iter().flatten().map(ParkSet::queued).sum()
    }

    /// Connections waiting in the one that listens.
    fn current_queue(&self) -> u32 {
        self.current
            .and_then(|c| self.sets[c].as_ref())
            .map_or(0, ParkSet::queued)
    }

    /// Whether retired sets wait for their handshakes.
    fn retiring(&self) -> bool {
        self.sets.iter().flatten().any(|s| s.retired.is_some())
    }

    /// Marks set `i` retired, once the rotation written no longer names it: the program
    /// sends it nothing more. It stays in the map until it stops: a program run that read the
    /// rotation before still selects it, and counts it (out of the map, its choice would
    /// fail and the kernel's hash place the connection, on any socket of the group, uncounted);
    /// [`Parking::settle`] waits for such runs to end ([`bpf::Steer::no_run_under_way`]).
    fn retire(&mut self, i: usize, now: Instant) {
        if let Some(set) = self.sets[i].as_mut() {
            set.retired = Some(now);
        }
    }

    /// Stops the retired sets whose handshakes all completed, or that waited [`RETIRE_MAX`]:
    /// the kernel hands their queues to the program, which places them as the rotation
    /// written before says. The connections that went to workers (not parked again in the
    /// one that listens).
    fn settle(&mut self, groups: &[bpf::Steer], now: Instant) -> std::io::Result<u32> {
        let mut handed = 0;
        // Read before the counts below: a run that read an older rotation has counted by then.
        let counted = groups.iter().all(bpf::Steer::no_run_under_way);
        for i in 0..bpf::PARK_KEYS {
            let Some(set) = self.sets[i].as_ref() else {
                continue;
            };
            let Some(retired) = set.retired else {
                continue;
            };
            let in_flight = set.in_flight(Self::key(i), groups);
            let age = now.saturating_duration_since(retired);
            let late = age >= RETIRE_MAX;
            // Where runs never pause (a busy host with many CPUs), a run that read the old
            // rotation has surely ended by the next sample.
            let runs_done = counted || age >= RUNS_END_WITHIN;
            if (in_flight > 0 || !runs_done) && !late {
                continue;
            }
            if in_flight > 0 {
                self.forced += 1;
                crate::debug!(
                    "steering: closing a parking socket with {in_flight} handshakes unfinished \
                     after {}",
                    crate::master::worker::ms(RETIRE_MAX)
                );
            }
            handed += self.stop(i, groups)?;
        }
        Ok(handed)
    }

    /// Shuts set `i` down and closes it. The connections that went to workers.
    fn stop(&mut self, i: usize, groups: &[bpf::Steer]) -> std::io::Result<u32> {
        let Some(set) = self.sets[i].take() else {
            return Ok(0);
        };
        let parked = set.queued();
        let current_before = self.current_queue();
        for (group, fd) in groups.iter().zip(&set.fds) {
            nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Read)?;
            // Already out: a socket that stops leaves the map.
            let _ = group.remove_socket(Self::key(i));
        }
        drop(set);
        let parked_again = self.current_queue().saturating_sub(current_before);
        let handed = parked.saturating_sub(parked_again);
        if handed > 0 {
            self.counts.0 += 1;
            self.counts.1 += handed as u64;
        }
        Ok(handed)
    }
}

impl Drop for Steering {
    /// A worker frozen for an evacuation is never left stopped.
    fn drop(&mut self) {
        for (_, e) in std::mem::take(&mut self.evacuating) {
            e.thaw();
        }
    }
}

/// Moving a stalled worker's accept queue to the rotation, without taking its socket away.
///
/// Linux moves a listener's queue only when the listener stops: shutdown(2) does, and the
/// program (attached for SELECT_OR_MIGRATE) places each queued connection on a socket in
/// rotation. listen(2) right after brings the same socket back into its reuseport group
/// (the kernel keeps a stopped member for that), so the worker's fd 3 goes on working and
/// the worker never knows. Between the two calls an accept(2) would fail with EINVAL (Node
/// treats that as a fatal server error), so the worker's processes are stopped
/// (SIGSTOP) first, unless they already are, and continued right after: they are stuck
/// anyway, and the freeze lasts until the master's next sample at most.
#[derive(Debug)]
struct Evacuation {
    /// The processes the master stopped, to continue afterwards.
    frozen: Vec<Pid>,
    since: Instant,
}

impl Evacuation {
    /// Stops every process of `pid`'s family that is not stopped already.
    fn freeze(pid: Pid, now: Instant) -> Evacuation {
        let frozen: Vec<Pid> = crate::master::procs::family(pid.as_raw() as u32)
            .into_iter()
            .filter(|p| !crate::master::procs::stopped(*p))
            .map(|p| Pid::from_raw(p as i32))
            .filter(|p| nix::sys::signal::kill(*p, nix::sys::signal::SIGSTOP).is_ok())
            .collect();
        Evacuation { frozen, since: now }
    }

    /// Whether nothing of the worker can run now.
    fn all_stopped(&self) -> bool {
        self.frozen
            .iter()
            .all(|p| crate::master::procs::stopped(p.as_raw() as u32))
    }

    fn thaw(self) {
        for p in self.frozen {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::SIGCONT);
        }
    }
}

/// What `status` shows of queue moves.
#[derive(Debug, Default, Clone, Copy)]
pub struct EvacuationView {
    /// Stalled workers' queues moved so far.
    pub moves: u64,
    /// The connections those moves took.
    pub moved: u64,
    /// The slowest listen(2) of a move (see [`EVACUATION_LISTEN_SHARE`]).
    pub slowest_listen: Duration,
}

/// Spaces evacuations so that their listen(2) takes at most [`EVACUATION_LISTEN_SHARE`] of
/// the time.
#[derive(Debug, Default)]
struct EvacuationPace {
    /// No evacuation begins before this.
    not_before: Option<Instant>,
    /// The slowest listen(2) of an evacuation so far.
    slowest: Duration,
    /// Whether one took [`SLOW_RELISTEN`] or more.
    slow_seen: bool,
}

impl EvacuationPace {
    fn allows(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }

    /// An evacuation that ended at `now` spent `listening` in listen(2). Whether that was
    /// the first slow one (to be said once).
    fn spent(&mut self, listening: Duration, now: Instant) -> bool {
        // Evacuations begun together (two workers stalled at once) add up.
        let from = self.not_before.map_or(now, |t| t.max(now));
        self.not_before = Some(from + listening.div_f64(EVACUATION_LISTEN_SHARE));
        self.slowest = self.slowest.max(listening);
        let first_slow = listening >= SLOW_RELISTEN && !self.slow_seen;
        self.slow_seen |= first_slow;
        first_slow
    }
}

/// Stops and restarts `fds`' listening (see [`Evacuation`]) and puts them back in the
/// program's map at `slot`: what was queued moves to the rotation. The connections moved,
/// and the time listen(2) took.
fn evacuate(
    groups: &[bpf::Steer],
    slot: usize,
    fds: &[OwnedFd],
) -> std::io::Result<(u32, Duration)> {
    let mut moved = 0;
    let mut listening = Duration::ZERO;
    for (group, fd) in groups.iter().zip(fds) {
        let (queue, backlog) = bpf::queue_and_backlog(fd.as_fd())?;
        let sock = socket2::SockRef::from(fd);
        let addr = sock.local_addr()?;
        sock.shutdown(std::net::Shutdown::Read)?;
        let began = Instant::now();
        sock.listen(backlog.min(i32::MAX as u32) as i32)?;
        listening += began.elapsed();
        if sock.local_addr()?.as_socket() != addr.as_socket() {
            // Bound to port 0 by whoever opened it, it gave its port back when it stopped
            // and now listens elsewhere: end it (the supervisor replaces its worker).
            let _ = sock.shutdown(std::net::Shutdown::Read);
            return Err(std::io::Error::other(
                "its socket lost its port when it stopped",
            ));
        }
        group.set_socket(slot, fd.as_fd())?;
        moved += queue;
    }
    Ok((moved, listening))
}

/// One slot's accept queue and the connections sent to it, at the last sample.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    queue: u32,
    sent: u64,
    /// The accepted count last given to the program.
    accepted: u64,
    /// Since when it is out of rotation for not accepting.
    out_since: Option<Instant>,
    /// When it last took a connection from its queue (or its queue was empty).
    took: Option<Instant>,
    /// Its queue was moved this many times in a row (while it accepted nothing).
    evacuated: u32,
    /// The connections those moves took off it.
    moved: u32,
    /// Out of rotation until then at least, after its queue was moved.
    hold_out: Option<Instant>,
    /// When its queue was last moved.
    moved_at: Option<Instant>,
    /// When its queue was last moved while it had been accepting (the first move of a
    /// stall, not a probation's): what makes the cap small ([`STALLING_WITHIN`]).
    stalled_at: Option<Instant>,
    /// The program's cap on its outstanding connections (0: none).
    cap: u64,
    /// Connections it takes per sample when it takes any, smoothed ([`RATE_WEIGHT`]).
    rate: f32,
    /// How long it usually goes without taking from a non-empty queue, in ms, smoothed
    /// ([`QUIET_WEIGHT`]).
    quiet_ms: f32,
    /// Whether its main thread waiting for events may bring it back (see [`HINT_MISSES`]).
    hint: Hint,
}

impl Load {
    /// Its queue was moved (or a move was tried) at `now`: out of rotation for a hold-out
    /// that doubles with each move in a row, on probation until it accepts.
    fn queue_moved(&mut self, now: Instant) {
        // Only a worker that had been accepting starts a stall: moves of one already known
        // to stall (on probation, a worker SIGSTOPped for seconds) would otherwise keep every
        // worker at the stall cap for as long as it stays stopped.
        if self.evacuated == 0 {
            self.stalled_at = Some(now);
        }
        self.evacuated = self.evacuated.saturating_add(1);
        let hold = HOLD_OUT
            .saturating_mul(1 << self.evacuated.min(5).saturating_sub(1))
            .min(HOLD_OUT_MAX);
        self.hold_out = Some(now + hold);
        self.moved_at = Some(now);
        self.hint.moved();
        self.took = Some(now);
    }
}

/// Whether workers stall: a worker that had been accepting had its queue moved within
/// [`STALLING_WITHIN`] (see [`CAP_WHILE_STALLING`]).
fn stalling<'a>(loads: impl IntoIterator<Item = &'a Load>, now: Instant) -> bool {
    loads
        .into_iter()
        .filter_map(|l| l.stalled_at)
        .any(|t| now.saturating_duration_since(t) < STALLING_WITHIN)
}

/// An old socket on its way out.
#[derive(Debug)]
struct Draining {
    held: Held,
    /// The old worker, stopped once the socket is drained.
    pid: Pid,
    since: Instant,
    queue: u32,
    empty_since: Option<Instant>,
    /// Its local ports: the accepted connections that count are on these.
    ports: BTreeSet<u16>,
    /// When the old worker last took from the queue (or found it empty).
    progress: Instant,
    /// Connections the old worker accepted and has not read, at the last check (`None`: not
    /// checked since the queue last emptied).
    unread: Option<usize>,
    checked: Option<Instant>,
}

impl Draining {
    fn new(held: Held, pid: Pid, now: Instant) -> Draining {
        let ports = held
            .fds
            .iter()
            .filter_map(|f| {
                let addr: nix::sys::socket::SockaddrStorage =
                    nix::sys::socket::getsockname(f.as_raw_fd()).ok()?;
                addr.as_sockaddr_in()
                    .map(|a| a.port())
                    .or_else(|| addr.as_sockaddr_in6().map(|a| a.port()))
            })
            .collect();
        Draining {
            held,
            pid,
            since: now,
            queue: 0,
            empty_since: None,
            ports,
            progress: now,
            unread: None,
            checked: None,
        }
    }
}

/// Whether a worker takes new connections, for `status`.
#[derive(Debug, Clone, PartialEq)]
pub enum Rotation {
    /// It does.
    In,
    /// It does not, and why.
    Out(String),
}

/// What a spawn of a slot's worker gets.
#[derive(Debug, Default)]
pub struct Grant {
    /// The held sockets to put at fds 3.., or `None`: the child opens fresh ones.
    pub inherit: Option<Vec<RawFd>>,
    /// A line for the log, when a held socket turned out dead.
    pub note: Option<String>,
}

impl SlotSockets {
    /// Holds nothing yet; `enabled: false` never holds anything (takeover off). No steering.
    #[cfg(test)]
    pub fn new(enabled: bool, binds: usize) -> SlotSockets {
        SlotSockets {
            enabled,
            binds,
            held: BTreeMap::new(),
            steering: Err("--steer hash".into()),
            fresh_wanted: BTreeSet::new(),
            pending: BTreeMap::new(),
            draining: BTreeMap::new(),
        }
    }

    /// Holds nothing yet, and sets up steering as `steer` asks: with `auto`, the line to
    /// log when this host does not allow it; with `bpf`, an error instead.
    pub fn with_steering(
        enabled: bool,
        binds: usize,
        steer: Steer,
        specs: &[crate::sockets::listen::ListenSpec],
    ) -> Result<(SlotSockets, Option<String>), String> {
        let steering = match (steer, enabled) {
            (Steer::Hash, _) => Err("--steer hash".to_string()),
            (_, false) => Err(format!("socket takeover is off ({TAKEOVER_ENV}=0)")),
            (_, true) => bpf::probe().and_then(|()| {
                let groups = (0..binds)
                    .map(|_| bpf::Steer::load())
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Steering {
                    groups,
                    rotation: Vec::new(),
                    overflow: None,
                    serving: BTreeMap::new(),
                    load: BTreeMap::new(),
                    next_sample: None,
                    evacuating: BTreeMap::new(),
                    evacuations: (0, 0),
                    pace: EvacuationPace::default(),
                    evacuate: std::env::var(EVACUATE_ENV).map_or(true, |v| v != "0"),
                    park: match std::env::var(PARK_ENV).map_or(true, |v| v != "0") {
                        true => Self::open_parking(specs),
                        false => None,
                    },
                })
            }),
        };
        let line = match (&steering, steer) {
            (Err(why), Steer::Bpf) => return Err(format!("--steer bpf: {why}")),
            (Err(why), Steer::Auto) => Some(format!(
                "steering: the kernel's SO_REUSEPORT hash (no BPF program: {why})"
            )),
            _ => None,
        };
        let sockets = SlotSockets {
            enabled,
            binds,
            held: BTreeMap::new(),
            steering,
            fresh_wanted: BTreeSet::new(),
            pending: BTreeMap::new(),
            draining: BTreeMap::new(),
        };
        Ok((sockets, line))
    }

    /// Parking sockets for `specs`, where this kernel allows them: handed on, a parked
    /// connection moves to a worker that may be asleep in epoll_wait(2), which a kernel
    /// without "tcp: call sk_data_ready() after listener migration" (May 2026) does not wake.
    /// One log line says why not.
    fn open_parking(specs: &[crate::sockets::listen::ListenSpec]) -> Option<Parking> {
        let why = match bpf::moved_connections_wake_waiters() {
            Ok(true) => {
                return Parking::open(specs)
                    .inspect_err(|e| crate::info!("steering: no parking socket ({e})"))
                    .ok()
            }
            Ok(false) => "this kernel does not wake a worker for a connection moved to its \
                          socket (fixed in the stable kernels of May 2026)"
                .to_string(),
            Err(e) => format!("testing whether a moved connection wakes a worker: {e}"),
        };
        crate::info!("steering: no parking socket: {why}");
        None
    }

    /// `bpf`, or `hash (why)`.
    pub fn mode(&self) -> String {
        match &self.steering {
            Ok(_) => "bpf".into(),
            Err(why) => format!("hash ({why})"),
        }
    }

    /// Whether the program steers (and old sockets are drained before their worker stops).
    pub fn steers(&self) -> bool {
        self.steering.is_ok()
    }

    /// Whether takeover is on for this process: on unless [`TAKEOVER_ENV`] is `0`.
    pub fn enabled_by_env() -> bool {
        std::env::var(TAKEOVER_ENV).map_or(true, |v| v != "0")
    }

    /// Whether workers' freshly opened sockets are sent to the master.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The sockets the next worker of `slot` starts with. A held socket that no longer
    /// listens is dropped here, so the worker opens a fresh one.
    /// `surge`: the slot's current worker keeps serving meanwhile (a rolling restart);
    /// under steering that new worker opens fresh sockets, so the old ones can be drained.
    pub fn grant(&mut self, slot: usize, label: &str, surge: bool) -> Grant {
        let Some(held) = self.held.get(&slot) else {
            return Grant::default();
        };
        if surge && self.steers() {
            self.fresh_wanted.insert(slot);
            return Grant::default();
        }
        if let Some(inode) = dead_inode(held) {
            self.held.remove(&slot);
            return Grant {
                inherit: None,
                note: Some(format!(
                    "{label}: its socket (inode {inode}) no longer listens (the app shut it \
                     down); the next worker opens a fresh one"
                )),
            };
        }
        Grant {
            inherit: Some(held.fds.iter().map(|f| f.as_raw_fd()).collect()),
            note: None,
        }
    }

    /// A worker of `slot` exec'd. `inherited`: it got the held sockets; otherwise `fresh`
    /// are the sockets it opened (sent by the child; empty with takeover off), with their
    /// `inodes`.
    pub fn started(
        &mut self,
        slot: usize,
        pid: Pid,
        inherited: bool,
        fresh: Vec<OwnedFd>,
        inodes: &[u64],
    ) -> Option<String> {
        let surge = self.fresh_wanted.remove(&slot);
        if inherited {
            if let Some(h) = self.held.get_mut(&slot) {
                h.workers += 1;
            }
            return None;
        }
        if !self.enabled || fresh.len() != self.binds || inodes.len() != self.binds {
            return None; // dropping `fresh` closes the master's copies
        }
        let now = Instant::now();
        let held = Held {
            fds: fresh,
            inodes: inodes.to_vec(),
            since: now,
            since_wall: SystemTime::now(),
            workers: 1,
        };
        if surge && self.held.contains_key(&slot) {
            // Kept aside until the new worker is ready: then it replaces the old socket.
            self.pending.insert(slot, (pid, held));
            return None;
        }
        let note = self.steer_socket(slot, &held);
        self.forget_load(slot);
        // A previous hold of the slot (a surge's crash-loop release raced a fresh spawn)
        // is replaced: the new worker serves the fresh sockets.
        self.held.insert(slot, held);
        note
    }

    /// Puts `held` in the program's map at `slot` (and attaches the program to its group).
    fn steer_socket(&self, slot: usize, held: &Held) -> Option<String> {
        let steering = self.steering.as_ref().ok()?;
        for (group, fd) in steering.groups.iter().zip(&held.fds) {
            // The slot's count of connections sent goes on across its sockets: a new one
            // starts with nothing outstanding.
            let sent = group.sent(slot).unwrap_or(0);
            if let Err(e) = group
                .attach(fd.as_fd())
                .and_then(|()| group.set_accepted(slot, sent))
                .and_then(|()| group.set_cap(slot, 0))
                .and_then(|()| group.set_socket(slot, fd.as_fd()))
            {
                return Some(format!(
                    "worker {slot}: its socket could not join the steering map ({e}); the \
                     kernel's hash may still send it connections"
                ));
            }
        }
        None
    }

    /// A new socket entered the map at `slot`: what the last sample saw of the old one (and
    /// told the program) no longer holds, so the next sample writes afresh.
    fn forget_load(&mut self, slot: usize) {
        if let Ok(s) = self.steering.as_mut() {
            s.load.remove(&slot);
        }
    }

    /// The new worker of `slot`'s rolling restart is ready and `old` (the previous worker)
    /// is to stop: the new worker's fresh sockets replace the old ones in the map and in
    /// the hold, and the old ones drain. Without steering, or without fresh sockets, there
    /// is nothing to drain: the answer is at once.
    /// `wait: false` (a hung worker): swap the sockets but answer at once. `gone`: the slot
    /// was scaled away: its socket leaves the map and drains, with no successor.
    pub fn begin_drain(
        &mut self,
        slot: usize,
        old: Pid,
        wait: bool,
        gone: bool,
        now: Instant,
    ) -> Option<Event> {
        if gone {
            self.pending.remove(&slot);
            let held = self.held.remove(&slot);
            self.unsteer(slot);
            let (Some(held), true, true) = (held, self.steers(), wait) else {
                return Some(Event::Drained { slot, pid: old });
            };
            self.draining.insert(slot, Draining::new(held, old, now));
            if let Ok(s) = self.steering.as_mut() {
                s.next_sample = Some(now);
            }
            return None;
        }
        let fresh = self.pending.remove(&slot).map(|(_, held)| held);
        let (Some(fresh), true) = (fresh, self.steers()) else {
            return Some(Event::Drained { slot, pid: old });
        };
        let note = self.steer_socket(slot, &fresh);
        self.forget_load(slot);
        if let Some(note) = note {
            crate::warn!("{note}");
        }
        let Some(previous) = self.held.insert(slot, fresh) else {
            return Some(Event::Drained { slot, pid: old });
        };
        if !wait {
            self.update_rotation();
            return Some(Event::Drained { slot, pid: old });
        }
        self.draining
            .insert(slot, Draining::new(previous, old, now));
        self.update_rotation();
        if let Ok(s) = self.steering.as_mut() {
            s.next_sample = Some(now);
        }
        None
    }

    /// A worker was reaped: fresh sockets it was given aside, or an old socket it drained,
    /// are closed now (what is queued on them moves to the rotation).
    pub fn exited(&mut self, pid: Pid) {
        self.pending.retain(|_, (p, _)| *p != pid);
        self.draining.retain(|_, d| d.pid != pid);
    }

    /// Lets go of `slot`'s sockets; the line to log, if it held any.
    pub fn release(&mut self, slot: usize, why: &str, label: &str) -> Option<String> {
        self.pending.remove(&slot);
        let held = self.held.remove(&slot)?;
        self.unsteer(slot);
        Some(format!(
            "{label}: let go of its socket{} (inode {}): {why}; the next worker opens a fresh one",
            if held.inodes.len() == 1 { "" } else { "s" },
            join(&held.inodes)
        ))
    }

    /// Lets go of every slot's sockets (the master is stopping).
    pub fn release_all(&mut self) {
        let slots: Vec<usize> = self.held.keys().copied().collect();
        for slot in slots {
            self.unsteer(slot);
        }
        self.held.clear();
        self.pending.clear();
        self.draining.clear();
    }

    /// Takes `slot` out of the rotation and the map.
    fn unsteer(&mut self, slot: usize) {
        let Ok(s) = self.steering.as_mut() else {
            return;
        };
        s.serving.remove(&slot);
        s.load.remove(&slot);
        if let Some(e) = s.evacuating.remove(&slot) {
            e.thaw();
        }
        for group in &s.groups {
            let _ = group.remove_socket(slot);
            let _ = group.set_accepted(slot, 0);
            let _ = group.set_cap(slot, 0);
        }
        self.update_rotation();
    }

    /// Slots whose held sockets no longer listen; they are dropped, and the caller replaces
    /// the workers serving them. Each with the dead socket's inode.
    pub fn lost(&mut self) -> Vec<(usize, u64)> {
        let dead: Vec<(usize, u64)> = self
            .held
            .iter()
            .filter_map(|(slot, h)| dead_inode(h).map(|inode| (*slot, inode)))
            .collect();
        for (slot, _) in &dead {
            self.held.remove(slot);
            self.unsteer(*slot);
        }
        dead
    }

    /// The held sockets, for the master's poll(2). Mostly with no events requested: a
    /// listener never wakes it for connections, but one shut down reports POLLHUP at once.
    /// Under steering, while nothing is sampled, the sockets in rotation wake it when a
    /// connection waits on them (POLLIN): the start of a sampling round.
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, PollFlags)> {
        let armed = self
            .steering
            .as_ref()
            .ok()
            .filter(|s| s.next_sample.is_none());
        // The parking socket that listens, too: what parks waits for the next sample.
        let parking = armed
            .and_then(|s| s.park.as_ref())
            .and_then(|p| p.current.and_then(|c| p.sets[c].as_ref()))
            .into_iter()
            .flat_map(|set| &set.fds)
            .map(|f| (f.as_fd(), PollFlags::POLLIN));
        self.held
            .iter()
            .flat_map(|(slot, h)| {
                let flags = match armed {
                    Some(s) if s.rotation.contains(slot) => PollFlags::POLLIN,
                    _ => PollFlags::empty(),
                };
                h.fds.iter().map(move |f| (f.as_fd(), flags))
            })
            .chain(parking)
            .collect()
    }

    /// When the master must sample the queues next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.steering.as_ref().ok().and_then(|s| s.next_sample)
    }

    /// The slots whose current worker is ready, after each round of events: they are the
    /// candidates of the rotation.
    pub fn set_serving(&mut self, serving: BTreeMap<usize, Pid>) {
        let Ok(s) = self.steering.as_mut() else {
            return;
        };
        if s.serving != serving {
            s.load.retain(|slot, _| serving.contains_key(slot));
            let gone: Vec<usize> = s
                .evacuating
                .keys()
                .copied()
                .filter(|slot| s.serving.get(slot) != serving.get(slot))
                .collect();
            for slot in gone {
                if let Some(e) = s.evacuating.remove(&slot) {
                    e.thaw();
                }
            }
            s.serving = serving;
            self.update_rotation();
        }
    }

    /// Samples the queues when due: updates the rotation, and says which old sockets are
    /// drained (their workers may stop now). Called at every wake of the master.
    pub fn service(&mut self, now: Instant) -> Vec<Event> {
        let Ok(s) = self.steering.as_mut() else {
            return Vec::new();
        };
        if s.next_sample.is_some_and(|t| now < t) {
            return Vec::new();
        }
        // Woken while armed (a connection waited) or at the sampling deadline.
        let armed = s.next_sample.is_none();
        // Caps go with a parking socket to take what finds every worker at its cap.
        let capping = s.park.as_ref().is_some_and(|p| p.current.is_some());
        let all_parked = s.rotation.first().is_some_and(|k| *k >= bpf::PARK)
            && s.park.as_ref().is_some_and(|p| p.queue() > 0);
        // A worker with no rate yet (new) is capped as the others are on average; likewise
        // its usual quiet spell.
        let usual_rate = mean_of_known(s.load.values().map(|l| l.rate));
        let usual_quiet_ms = mean_of_known(s.load.values().map(|l| l.quiet_ms));

        let mut busy = false;
        let slots: Vec<usize> = s.serving.keys().copied().collect();
        for slot in slots {
            let Some(held) = self.held.get(&slot) else {
                continue;
            };
            let queue: u32 = held
                .fds
                .iter()
                .map(|f| bpf::accept_queue(f.as_fd()).unwrap_or(0))
                .sum();
            let sent: u64 = s.groups.iter().map(|g| g.sent(slot).unwrap_or(0)).sum();
            let in_rotation = s.rotation.contains(&slot);
            let prev = s.load.get(&slot).copied();
            let mut out_since = prev.and_then(|p| p.out_since);
            let mut took = prev.and_then(|p| p.took);
            let mut evacuated = prev.map_or(0, |p| p.evacuated);
            let mut moved = prev.map_or(0, |p| p.moved);
            let mut hold_out = prev.and_then(|p| p.hold_out);
            let moved_at = prev.and_then(|p| p.moved_at);
            let stalled_at = prev.and_then(|p| p.stalled_at);
            let mut hint = prev.map_or(Hint::default(), |p| p.hint);
            let held_enough =
                moved_at.is_some_and(|t| now.saturating_duration_since(t) >= HOLD_OUT_WHILE_PARKED);
            // A new worker starts from the others' usual rate, and the first worker from its
            // first measure: smoothed up from nothing, a rate stays a fraction of what the
            // worker takes for dozens of samples, and with it the cap, which then parked what
            // a worker keeping up was sent (a replacement got 7 of 30 sequential requests).
            let mut rate = prev.map_or(usual_rate, |p| p.rate);
            let mut quiet_ms = prev.map_or(0.0, |p| p.quiet_ms);
            if quiet_ms == 0.0 {
                quiet_ms = usual_quiet_ms;
            }
            if let Some(p) = prev {
                // Accepted since the last sample: what was queued plus what arrived, minus
                // what is queued now.
                let arrived = sent.saturating_sub(p.sent);
                let accepted = (p.queue as u64 + arrived).saturating_sub(queue as u64);
                if accepted > 0 {
                    rate = match rate > 0.0 {
                        true => rate + (accepted as f32 - rate) * RATE_WEIGHT,
                        false => accepted as f32,
                    };
                }
                // Nothing accepted while something waited all along, or while several
                // arrived: a worker that keeps up takes at least one in a sample's time.
                let mut stalled = queue > 0 && accepted == 0 && (p.queue > 0 || arrived >= 2);
                if capping {
                    // With parking, out means parked connections wait for another worker:
                    // a worker whose event loop turns slowly (each turn serves many requests)
                    // is out only once quiet for a few of its usual spells.
                    let quiet = now.saturating_duration_since(p.took.unwrap_or(now));
                    let spells = Duration::from_secs_f32(QUIET_SPELLS * quiet_ms / 1000.0);
                    stalled &= quiet >= spells.min(EVACUATE_AFTER);
                }
                if accepted > 0 && p.queue > 0 {
                    // A quiet spell with something queued just ended on its own: how long
                    // this worker's usual ones are (a stall, moved or not, is no usual one).
                    let quiet = now.saturating_duration_since(p.took.unwrap_or(now));
                    if quiet < EVACUATE_AFTER {
                        let ms = quiet.as_secs_f32() * 1000.0;
                        quiet_ms += (ms - quiet_ms) * QUIET_WEIGHT;
                    }
                }
                if accepted > 0 || queue == 0 {
                    took = Some(now);
                }
                if accepted > 0 {
                    evacuated = 0;
                    moved = 0;
                    hint.accepted();
                }
                if in_rotation && out_since.is_none() && stalled {
                    out_since = Some(now);
                    crate::debug!(
                        "worker {slot}: out of rotation: not accepting (queue {queue}, {} \
                         then, {arrived} arrived since)",
                        p.queue
                    );
                } else if out_since.is_some() && queue == 0 {
                    let held = hold_out.is_some_and(|t| now < t) && !(all_parked && held_enough);
                    // Read only for a worker held out: one small /proc read per sample.
                    let idle = held
                        && hint.trusted()
                        && s.serving.get(&slot).is_some_and(|pid| {
                            crate::master::event_waits::waiting_for_events(pid.as_raw() as u32)
                        });
                    if !held || idle {
                        out_since = None;
                        hold_out = None;
                        if idle {
                            hint.brought_back();
                        }
                        crate::debug!(
                            "worker {slot}: back in rotation: its queue drained{}",
                            if idle { " and it waits for events" } else { "" }
                        );
                    }
                }
            }
            busy |= queue > 0 || out_since.is_some();
            // What it accepted so far: the program compares what it sent since. (Per bind
            // the program counts per group; with several binds the sums are looser.)
            let accepted = sent.saturating_sub(queue as u64);
            // A store into the map's memory, at every sample; the cap is set below, once the
            // sample knows whether there is pressure.
            let cap = prev.map_or(0, |p| p.cap);
            for g in &s.groups {
                let _ = g.set_accepted(slot, accepted);
            }
            s.load.insert(
                slot,
                Load {
                    queue,
                    sent,
                    accepted,
                    out_since,
                    took,
                    evacuated,
                    moved,
                    hold_out,
                    moved_at,
                    stalled_at,
                    cap,
                    rate,
                    quiet_ms,
                    hint,
                },
            );
        }
        busy |= Self::evacuate_stalled(s, &self.held, now);
        // Parked connections wait for a worker with room: look every sample (after the
        // evacuations, which may have parked a stalled worker's queue just now).
        let parked = s.park.as_ref().map_or(0, |p| p.queue());
        // Caps only under pressure (something queued, parked or out): with every queue
        // empty the master may stop sampling, and the program's count of what a worker has
        // outstanding then grows with everything it is sent and accepts, until all of them
        // were at their caps and light traffic parked every few connections (and the
        // hand-ons skewed round robin: 12, 7 and 11 of 30 sequential requests).
        let pressure = busy || parked > 0;
        // One cap for all, from the fastest worker's rate: copies of one app keep up alike,
        // and with unequal caps the worker measured fastest took what the others' caps
        // turned away (16, 7 and 7 of 30 sequential requests).
        let fastest = s.load.values().map(|l| l.rate).fold(0.0, f32::max);
        let cap = cap_for(fastest, stalling(s.load.values(), now));
        // A worker whose queue was moved and that has accepted nothing since is on probation
        // (out of rotation the cap only matters when every worker is behind).
        for (slot, load) in s.load.iter_mut() {
            load.cap = match () {
                _ if load.evacuated > 0 => PROBATION_CAP,
                _ if capping && pressure => cap,
                _ => 0,
            };
            for g in &s.groups {
                let _ = g.set_cap(*slot, load.cap);
            }
        }
        // A retired parking socket waiting for its handshakes is tried again next sample.
        let retiring = s.park.as_ref().is_some_and(Parking::retiring);
        busy |= parked > 0 || retiring;
        // Of the rotation about to be written (a worker back this sample counts at once).
        let room = s.serving.keys().any(|slot| {
            self.held.contains_key(slot)
                && s.load.get(slot).is_some_and(|l| {
                    l.out_since.is_none() && (l.cap == 0 || (l.queue as u64) < l.cap)
                })
        });
        let hand_on = parked > 0 && room;
        let mut events = Vec::new();
        let mut done = Vec::new();
        for (slot, d) in &mut self.draining {
            let queue: u32 = d
                .held
                .fds
                .iter()
                .map(|f| bpf::accept_queue(f.as_fd()).unwrap_or(0))
                .sum();
            // Out of the rotation nothing new arrives: a shorter queue is the worker accepting.
            if queue == 0 || queue < d.queue {
                d.progress = now;
            }
            d.queue = queue;
            if d.queue > 0 {
                d.empty_since = None;
                d.unread = None;
            } else if d.empty_since.is_none() {
                d.empty_since = Some(now);
            }
            let quiet = d
                .empty_since
                .is_some_and(|t| now.saturating_duration_since(t) >= DRAIN_SETTLE);
            // What the old worker accepted must have been read, too: an eager server closes
            // unread connections when it stops.
            if quiet
                && d.checked
                    .is_none_or(|t| now.saturating_duration_since(t) >= UNREAD_CHECK_EVERY)
            {
                let family = crate::master::procs::family(d.pid.as_raw() as u32);
                d.unread = Some(
                    crate::sockets::diag::unread_held_by(&family, &d.ports, UNREAD_YOUNG)
                        .unwrap_or(0),
                );
                d.checked = Some(now);
            }
            let settled = quiet && d.unread == Some(0);
            let stuck = d.queue > 0 && now.saturating_duration_since(d.progress) >= DRAIN_STUCK;
            let late = now.saturating_duration_since(d.since) >= DRAIN_TIMEOUT;
            if settled || stuck || late {
                if stuck {
                    crate::info!(
                        "worker {slot} (pid {}): accepts nothing from its old socket ({} queued \
                         for {}); shutting the socket down (its queue moves to the others) \
                         and stopping the worker",
                        d.pid,
                        d.queue,
                        crate::master::worker::ms(DRAIN_STUCK)
                    );
                } else if late && !settled {
                    crate::info!(
                        "worker {slot} (pid {}): its old socket still has {} queued and {} \
                         accepted unread after {}; shutting the socket down (its queue moves \
                         to the others) and stopping the worker anyway",
                        d.pid,
                        d.queue,
                        d.unread.unwrap_or(0),
                        crate::master::worker::ms(DRAIN_TIMEOUT)
                    );
                }
                if !settled {
                    // The app may keep its fd open until it exits (Puma does, for up to the
                    // grace): shut the listener down now, which moves its queue through the
                    // program as a close would, and fails the old worker's next accept.
                    for f in &d.held.fds {
                        let _ = nix::sys::socket::shutdown(
                            f.as_raw_fd(),
                            nix::sys::socket::Shutdown::Read,
                        );
                    }
                }
                events.push(Event::Drained {
                    slot: *slot,
                    pid: d.pid,
                });
                done.push(*slot);
            } else {
                busy = true;
            }
        }
        for slot in done {
            // The master's copy closes here, before the stop signal: the old worker's own
            // fd is then the last, and its close moves whatever is left.
            self.draining.remove(&slot);
        }
        if let Ok(s) = self.steering.as_mut() {
            // While connections are parked, a worker that frees up waits for the next
            // sample to be handed them.
            let every = match parked > 0 || retiring {
                true => SAMPLE_WHILE_PARKED,
                false => SAMPLE_EVERY,
            };
            s.next_sample = (busy || armed).then(|| now + every);
        }
        self.write_rotation(hand_on, now);
        events
    }

    /// Moves the queues of workers that stay stalled out of rotation to the workers in it
    /// (see [`Evacuation`]): freezes a worker due, and once its processes are stopped, moves
    /// its queue and continues them. Whether one is under way (sample again soon).
    fn evacuate_stalled(s: &mut Steering, held: &BTreeMap<usize, Held>, now: Instant) -> bool {
        // With a parking socket a moved queue waits for the first worker with room, not on
        // another that may stall in turn: moving early costs little.
        let parking = s.park.as_ref().is_some_and(|p| p.current.is_some());
        for (slot, load) in &s.load {
            let Some(out) = load.out_since else {
                continue;
            };
            // A worker whose event loop turns slowly (each turn serves many requests) is
            // not stalled by being quiet that long: it waits a few of its usual quiet spells.
            let after = match parking {
                true => Duration::from_secs_f32(QUIET_SPELLS * load.quiet_ms / 1000.0)
                    .clamp(EVACUATE_TO_PARK_AFTER, EVACUATE_AFTER),
                false => EVACUATE_AFTER,
            };
            let quiet_since = load.took.map_or(out, |t| t.max(out));
            // Only out of the program's rotation, to a rotation that takes the queue: a
            // worker back in it because every worker is behind keeps its own.
            let due = s.evacuate
                && load.queue > 0
                && !s.rotation.contains(slot)
                && !s.rotation.is_empty()
                && now.saturating_duration_since(quiet_since) >= after
                && load.hold_out.is_none_or(|t| now >= t)
                && !s.evacuating.contains_key(slot)
                && s.pace.allows(now);
            if let (true, Some(pid)) = (due, s.serving.get(slot)) {
                s.evacuating.insert(*slot, Evacuation::freeze(*pid, now));
            }
        }
        let slots: Vec<usize> = s.evacuating.keys().copied().collect();
        for slot in slots {
            let e = &s.evacuating[&slot];
            let frozen = e.all_stopped();
            if !frozen && now.saturating_duration_since(e.since) < FREEZE_WAIT {
                continue;
            }
            let e = s.evacuating.remove(&slot).expect("listed above");
            let load = s.load.entry(slot).or_default();
            let moved = match held.get(&slot) {
                Some(h) if frozen => evacuate(&s.groups, slot, &h.fds),
                Some(_) => Err(std::io::Error::other(format!(
                    "its processes did not stop within {}",
                    crate::master::worker::ms(FREEZE_WAIT)
                ))),
                None => Ok((0, Duration::ZERO)),
            };
            e.thaw();
            match moved {
                Ok((moved, listening)) => {
                    s.evacuations.0 += 1;
                    s.evacuations.1 += moved as u64;
                    if s.pace.spent(listening, Instant::now()) {
                        crate::info!(
                            "worker {slot}: moving its queue took {:.1} ms in listen(2) (the \
                             kernel checks the socket against every socket bound to its port); \
                             queue moves are spaced to spend at most {} % of the time there",
                            listening.as_secs_f64() * 1000.0,
                            EVACUATION_LISTEN_SHARE * 100.0
                        );
                    }

                    crate::debug!(
                        "worker {slot}: accepts nothing; moved its queue ({moved}) to the others"
                    );
                    // Counted as taken by the program: nothing is outstanding any more.
                    load.accepted = load.sent;
                    load.queue = 0;
                    load.moved = load.moved.saturating_add(moved);
                    for g in &s.groups {
                        let _ = g.set_accepted(slot, load.sent);
                    }
                }
                Err(e) => crate::warn!("worker {slot}: moving its queue: {e}"),
            }
            load.queue_moved(now);
        }
        !s.evacuating.is_empty()
    }

    /// Writes the rotation to the program when it changed.
    fn update_rotation(&mut self) {
        self.write_rotation(false, Instant::now());
    }

    /// Writes the rotation to the program when it changed: the serving, held slots that
    /// accept; when none does, the parking socket, or without one those with the shortest
    /// queue. `hand_on`: parked connections are to go to the workers with room now.
    fn write_rotation(&mut self, hand_on: bool, now: Instant) {
        let Ok(s) = self.steering.as_mut() else {
            return;
        };
        let candidates: Vec<usize> = s
            .serving
            .keys()
            .copied()
            .filter(|slot| self.held.contains_key(slot))
            .collect();
        let mut rotation: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|slot| s.load.get(slot).is_none_or(|l| l.out_since.is_none()))
            .collect();
        let mut overflow = None;
        let mut release = None;
        let mut broken = None;
        if let Some(park) = s.park.as_mut() {
            let parking_all = park
                .current
                .is_some_and(|c| s.rotation == [Parking::key(c)]);
            // Parking needs a second worker to hand on to.
            // What parked since the last hand-on (the retired sets' queues move as they settle).
            let fresh_parked = park.current_queue() > 0;
            match (park.current, candidates.len() < 2) {
                (None, false) => match park.listen_next(&s.groups) {
                    Some(Ok(i)) => park.current = Some(i),
                    Some(Err(e)) => broken = Some(e),
                    None => {}
                },
                (Some(c), true) => {
                    // No second worker: nothing parks (one worker takes all as before; none:
                    // the kernel's hash).
                    release = Some(c);
                    park.current = None;
                }
                (Some(c), false)
                    if fresh_parked && (hand_on || (parking_all && !rotation.is_empty())) =>
                {
                    match park.listen_next(&s.groups) {
                        Some(Ok(i)) => {
                            release = Some(c);
                            park.current = Some(i);
                        }
                        Some(Err(e)) => broken = Some(e),
                        None => {}
                    }
                }
                _ => {}
            }
            if let Some(c) = park.current {
                if rotation.is_empty() {
                    rotation = vec![Parking::key(c)];
                } else {
                    overflow = Some(Parking::key(c));
                }
            }
        }
        if rotation.is_empty() {
            // Everyone is behind: the shortest queues take what comes, of the workers whose
            // queue was not just moved for stalling if there are any (an emptied queue is
            // not a short one).
            let queue = |slot: &usize| s.load.get(slot).map_or(0, |l| l.queue);
            let fresh: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|slot| s.load.get(slot).is_none_or(|l| l.evacuated == 0))
                .collect();
            let pool = if fresh.is_empty() { candidates } else { fresh };
            let least = pool.iter().map(queue).min().unwrap_or(0);
            rotation = pool
                .into_iter()
                .filter(|slot| queue(slot) == least)
                .collect();
        }
        if rotation != s.rotation || overflow != s.overflow {
            for group in &s.groups {
                if let Err(e) = group.set_rotation(&rotation, overflow) {
                    crate::warn!("steering: updating the rotation: {e}");
                }
            }
            s.rotation = rotation;
            s.overflow = overflow;
        }
        if let Some(park) = s.park.as_mut() {
            // After the rotation is written: the program places the parked queues on it.
            if let Some(c) = release {
                park.retire(c, now);
            }
            match park.settle(&s.groups, now) {
                Ok(0) => {}
                Ok(moved) => crate::debug!("steering: {moved} parked connections handed on"),
                Err(e) => broken = Some(e),
            }
        }
        if let Some(e) = broken {
            crate::warn!("steering: a parking socket failed ({e}); no more parking");
            // The rotation without them is written first: closed after that, what they held
            // moves to it (closed before, the program's choice would fail and the hash place it).
            let old = s.park.take();
            self.write_rotation(false, now);
            drop(old);
        }
    }

    /// Whether `slot`'s socket takes new connections; `draining_pid`: the worker asked
    /// about, when it is an old worker whose socket drains. `None` without steering.
    pub fn rotation(&self, slot: usize, pid: Pid, now: Instant) -> Option<Rotation> {
        let s = self.steering.as_ref().ok()?;
        if let Some(d) = self.draining.get(&slot).filter(|d| d.pid == pid) {
            return Some(Rotation::Out(format!(
                "draining before it stops (queue {})",
                d.queue
            )));
        }
        if self.pending.get(&slot).is_some_and(|(p, _)| *p == pid) {
            return Some(Rotation::Out("new worker, not ready yet".into()));
        }
        if s.rotation.contains(&slot) {
            return Some(Rotation::In);
        }
        let why = match s.load.get(&slot) {
            Some(Load {
                out_since: Some(t),
                queue,
                evacuated: 0,
                ..
            }) => format!(
                "not accepting (queue {queue} for {})",
                crate::master::worker::ms(now.saturating_duration_since(*t))
            ),
            Some(Load {
                out_since: Some(t),
                queue,
                evacuated,
                ..
            }) => format!(
                "not accepting for {} (queue {queue}; its queue was moved to the others \
                 {evacuated} time{})",
                crate::master::worker::ms(now.saturating_duration_since(*t)),
                if *evacuated == 1 { "" } else { "s" }
            ),
            _ if !self.held.contains_key(&slot) => "its socket is not held".into(),
            _ if !s.serving.contains_key(&slot) => "not ready".into(),
            _ => "out".into(),
        };
        Some(Rotation::Out(why))
    }

    /// Stalled workers' queues moved so far (see [`Evacuation`]; nothing without steering).
    pub fn evacuations(&self) -> EvacuationView {
        self.steering
            .as_ref()
            .map_or(EvacuationView::default(), |s| EvacuationView {
                moves: s.evacuations.0,
                moved: s.evacuations.1,
                slowest_listen: s.pace.slowest,
            })
    }

    /// Parking (see [`Parking`]): whether there is a parking socket, the connections parked
    /// now, and the hand-ons so far with the connections they took.
    pub fn parking(&self) -> ParkingView {
        let park = self.steering.as_ref().ok().and_then(|s| s.park.as_ref());
        park.map_or(ParkingView::default(), |p| ParkingView {
            on: true,
            parked: p.queue(),
            hand_ons: p.counts.0,
            handed_on: p.counts.1,
            closed_unfinished: p.forced,
        })
    }

    /// Connections moved off `slot`'s queue while its worker has accepted nothing since: for
    /// `--hung-after`, which watches a queue that does not move.
    pub fn moved_while_stalled(&self, slot: usize) -> u32 {
        self.steering
            .as_ref()
            .ok()
            .and_then(|s| s.load.get(&slot))
            .map_or(0, |l| l.moved)
    }

    /// The program map's socket cookie at `slot` and the cookie of the socket held for it,
    /// for tests and `status`: equal when the map is right. `None` without steering.
    pub fn map_entry(&self, slot: usize) -> Option<(Option<u64>, Option<u64>)> {
        let s = self.steering.as_ref().ok()?;
        let group = s.groups.first()?;
        let in_map = group.socket_at(slot).ok().flatten();
        let held = self
            .held
            .get(&slot)
            .and_then(|h| h.fds.first())
            .and_then(|f| bpf::socket_cookie(f.as_fd()).ok());
        Some((in_map, held))
    }

    /// Slots with an entry in the program's socket map (first bind), up to `max`.
    pub fn mapped_slots(&self, max: usize) -> Vec<usize> {
        let Ok(s) = self.steering.as_ref() else {
            return Vec::new();
        };
        let Some(group) = s.groups.first() else {
            return Vec::new();
        };
        (0..max.min(bpf::MAX_SLOTS as usize))
            .filter(|slot| group.socket_at(*slot).ok().flatten().is_some())
            .collect()
    }

    /// What `status` shows of `slot`'s sockets.
    pub fn view(&self, slot: usize, now: Instant) -> Option<HeldView> {
        self.held.get(&slot).map(|h| HeldView {
            inodes: h.inodes.clone(),
            held_for: now.saturating_duration_since(h.since),
            since_unix_s: h
                .since_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            workers: h.workers,
        })
    }

    /// Slots holding sockets.
    pub fn slots(&self) -> BTreeSet<usize> {
        self.held.keys().copied().collect()
    }

    /// File descriptors held.
    #[cfg(test)]
    pub fn fd_count(&self) -> usize {
        self.held.values().map(|h| h.fds.len()).sum()
    }
}

/// The inode of the first of `held`'s sockets that no longer listens.
fn dead_inode(held: &Held) -> Option<u64> {
    held.fds
        .iter()
        .zip(&held.inodes)
        .find(|(fd, _)| !getsockopt(*fd, sockopt::AcceptConn).unwrap_or(false))
        .map(|(_, inode)| *inode)
}

fn join(inodes: &[u64]) -> String {
    inodes
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::fs::MetadataExt;

    fn listener() -> (OwnedFd, u64, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd()))
            .unwrap()
            .ino();
        (OwnedFd::from(l), inode, addr)
    }

    #[test]
    fn the_first_worker_opens_and_every_later_one_inherits_the_same_socket() {
        let mut s = SlotSockets::new(true, 1);
        let first = s.grant(0, "worker 0", false);
        assert!(
            first.inherit.is_none(),
            "nothing held yet: the child opens it"
        );
        let (fd, inode, _) = listener();
        let raw = fd.as_raw_fd();
        s.started(0, Pid::from_raw(100), false, vec![fd], &[inode]);
        for _ in 0..3 {
            let g = s.grant(0, "worker 0", false);
            assert_eq!(g.inherit, Some(vec![raw]));
            s.started(0, Pid::from_raw(100), true, Vec::new(), &[inode]);
        }
        let view = s.view(0, Instant::now()).unwrap();
        assert_eq!((view.inodes, view.workers), (vec![inode], 4));
        assert_eq!(s.fd_count(), 1, "one reference per bind, not per worker");
    }

    #[test]
    fn a_connection_queued_while_no_worker_runs_waits_for_the_successor() {
        let mut s = SlotSockets::new(true, 1);
        let (fd, inode, addr) = listener();
        s.started(0, Pid::from_raw(100), false, vec![fd], &[inode]);
        // The worker is gone; the client connects to the held socket in between.
        let mut client = TcpStream::connect(addr).unwrap();
        assert!(s.grant(0, "worker 0", false).inherit.is_some());
        // A dup of the held socket stands for the successor's fd 3.
        let held = &s.held[&0].fds[0];
        let successor = TcpListener::from(nix::unistd::dup(held).unwrap());
        let (mut conn, _) = successor.accept().unwrap();
        use std::io::{Read, Write};
        conn.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
    }

    #[test]
    fn release_closes_the_masters_reference_and_the_next_worker_opens_fresh() {
        let mut s = SlotSockets::new(true, 1);
        let (fd, inode, addr) = listener();
        s.started(0, Pid::from_raw(100), false, vec![fd], &[inode]);
        let line = s.release(0, "crash loop", "worker 0").unwrap();
        assert!(line.contains(&format!("inode {inode}")), "{line}");
        assert!(s.grant(0, "worker 0", false).inherit.is_none());
        assert!(
            s.release(0, "again", "worker 0").is_none(),
            "nothing left to log"
        );
        assert!(
            TcpStream::connect(addr).is_err(),
            "the socket is closed: the kernel stops sending it connections"
        );
    }

    #[test]
    fn a_socket_shut_down_by_the_app_is_dropped_and_reported() {
        let mut s = SlotSockets::new(true, 1);
        let (fd, inode, _) = listener();
        // The app's fd 3 is the same socket: shutdown(2) through it ends it for the master.
        let app = TcpListener::from(nix::unistd::dup(&fd).unwrap());
        s.started(0, Pid::from_raw(100), false, vec![fd], &[inode]);
        assert!(
            s.lost().is_empty(),
            "control: a listening socket is not lost"
        );
        nix::sys::socket::shutdown(app.as_raw_fd(), nix::sys::socket::Shutdown::Both).unwrap();
        assert_eq!(s.lost(), vec![(0, inode)]);
        assert!(s.grant(0, "worker 0", false).inherit.is_none());
    }

    #[test]
    fn grant_notices_a_dead_socket_and_says_so() {
        let mut s = SlotSockets::new(true, 1);
        let (fd, inode, _) = listener();
        let dup = nix::unistd::dup(&fd).unwrap();
        s.started(0, Pid::from_raw(100), false, vec![fd], &[inode]);
        nix::sys::socket::shutdown(dup.as_raw_fd(), nix::sys::socket::Shutdown::Both).unwrap();
        let g = s.grant(0, "worker 0 (cpu 0)", false);
        assert!(g.inherit.is_none());
        assert!(g.note.unwrap().contains("no longer listens"));
    }

    #[test]
    fn with_takeover_off_nothing_is_held() {
        let mut s = SlotSockets::new(false, 1);
        let (fd, inode, _) = listener();
        s.started(0, Pid::from_raw(100), false, vec![fd], &[inode]);
        assert!(s.grant(0, "worker 0", false).inherit.is_none());
        assert_eq!(s.fd_count(), 0);
    }

    #[test]
    fn a_partial_set_of_sockets_is_not_held() {
        let mut s = SlotSockets::new(true, 2);
        let (fd, inode, _) = listener();
        s.started(0, Pid::from_raw(100), false, vec![fd], &[inode]);
        assert!(
            s.grant(0, "worker 0", false).inherit.is_none(),
            "2 binds need 2 sockets"
        );
        let (a, ia, _) = listener();
        let (b, ib, _) = listener();
        let raws = vec![a.as_raw_fd(), b.as_raw_fd()];
        s.started(1, Pid::from_raw(100), false, vec![a, b], &[ia, ib]);
        assert_eq!(s.grant(1, "worker 1", false).inherit, Some(raws));
        s.release_all();
        assert_eq!(s.fd_count(), 0);
    }

    /// Two SO_REUSEPORT listeners on one port with the program attached, at slots 0 and 1.
    fn steered_pair() -> (bpf::Steer, Vec<OwnedFd>, std::net::SocketAddr) {
        let steer = bpf::Steer::load().unwrap();
        let open = |addr: std::net::SocketAddr| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(64).unwrap();
            OwnedFd::from(s)
        };
        // Slot 1 picks the port; slot 0, the one evacuated, binds it explicitly, as every
        // worker does (a socket bound to port 0 gives its port back when it stops listening).
        let first = open(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        let addr = socket2::SockRef::from(&first)
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap();
        let fds = vec![open(addr), first];
        for (slot, fd) in fds.iter().enumerate() {
            steer.attach(fd.as_fd()).unwrap();
            steer.set_socket(slot, fd.as_fd()).unwrap();
        }
        (steer, fds, addr)
    }

    #[test]
    fn while_workers_stall_the_cap_is_small() {
        // The 1 % slow bench scenario: the fastest takes about 1-3 per sample.
        assert_eq!(cap_for(1.0, false), 4);
        assert_eq!(cap_for(3.0, false), 8);
        assert_eq!(cap_for(3.0, true), 3, "a worker that blocks holds 3");
        assert_eq!(
            cap_for(25.0, false),
            52,
            "fast workers keep theirs where nothing stalls"
        );
    }

    #[test]
    fn only_the_first_move_of_a_stall_keeps_the_cap_small() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut stopped = Load::default();
        stopped.queue_moved(t0);
        assert_eq!(stopped.stalled_at, Some(t0));
        assert!(stalling([&stopped], t0 + ms(199)));
        // Still stopped: back on probation, moved again and again without accepting.
        stopped.queue_moved(t0 + ms(100));
        stopped.queue_moved(t0 + ms(250));
        assert_eq!(stopped.evacuated, 3);
        assert_eq!(stopped.moved_at, Some(t0 + ms(250)));
        assert!(
            !stalling([&stopped], t0 + ms(260)),
            "a worker known to stall does not cap the others for as long as it is stopped"
        );
        // Control: a worker that accepted in between (the sample resets its moves) stalls
        // anew, and that counts.
        let mut slow = stopped;
        slow.evacuated = 0;
        slow.queue_moved(t0 + ms(300));
        assert!(stalling([&stopped, &slow], t0 + ms(310)));
        assert!(!stalling([&stopped, &slow], t0 + ms(500)));
        // The hold-out doubles with each move in a row, up to its most.
        assert_eq!(slow.hold_out, Some(t0 + ms(300) + HOLD_OUT));
        assert_eq!(stopped.hold_out, Some(t0 + ms(250) + HOLD_OUT * 4));
        for _ in 0..3 {
            stopped.queue_moved(t0 + ms(1000));
        }
        assert_eq!(stopped.hold_out, Some(t0 + ms(1000) + HOLD_OUT_MAX));
        assert_eq!(stopped.stalled_at, Some(t0), "still the first move's");
    }

    #[test]
    fn the_waiting_for_events_hint_is_dropped_after_two_misses_until_the_worker_accepts() {
        let mut hint = Hint::default();
        assert!(hint.trusted());
        // Moved without having come back on the hint: no miss.
        hint.moved();
        assert_eq!(hint.misses, 0);
        // Back on the hint, then moved again without accepting: a miss; twice: not trusted.
        hint.brought_back();
        hint.moved();
        assert!(hint.trusted());
        hint.brought_back();
        hint.moved();
        assert!(
            !hint.trusted(),
            "gunicorn's arbiter in select(2) always looks idle"
        );
        hint.accepted();
        assert!(hint.trusted(), "trusted again once it accepts");
        // Back on the hint and accepting: the hint was right.
        hint.brought_back();
        hint.accepted();
        hint.moved();
        assert_eq!(hint.misses, 0);
    }

    #[test]
    fn evacuations_are_spaced_by_what_their_listen_took() {
        let t0 = Instant::now();
        let mut pace = EvacuationPace::default();
        assert!(pace.allows(t0));
        // 0.45 ms (12 000 TIME_WAIT sockets on the port): the next waits 9 ms.
        assert!(!pace.spent(Duration::from_micros(450), t0));
        assert!(!pace.allows(t0 + Duration::from_micros(8_999)));
        assert!(pace.allows(t0 + Duration::from_millis(9)));
        // 5 ms (a port with about 100 000 sockets): 100 ms, and said once.
        let t1 = t0 + Duration::from_millis(10);
        assert!(
            pace.spent(Duration::from_millis(5), t1),
            "the first slow one is said"
        );
        assert!(!pace.allows(t1 + Duration::from_millis(99)));
        assert!(pace.allows(t1 + Duration::from_millis(100)));
        assert!(!pace.spent(Duration::from_millis(5), t1 + Duration::from_millis(100)));
        assert_eq!(pace.slowest, Duration::from_millis(5));
    }

    #[test]
    fn evacuations_begun_together_add_up() {
        let t0 = Instant::now();
        let mut pace = EvacuationPace::default();
        pace.spent(Duration::from_millis(1), t0);
        pace.spent(Duration::from_millis(1), t0);
        assert!(!pace.allows(t0 + Duration::from_millis(39)));
        assert!(pace.allows(t0 + Duration::from_millis(40)));
    }

    #[test]
    fn a_cheap_listen_barely_spaces_evacuations() {
        // 8 us (a port with 1 000 connections): 160 us, well under a sample.
        let t0 = Instant::now();
        let mut pace = EvacuationPace::default();
        assert!(!pace.spent(Duration::from_micros(8), t0));
        assert!(pace.allows(t0 + Duration::from_micros(160)));
    }

    #[test]
    fn an_evacuation_moves_the_queue_to_the_rotation_and_leaves_the_socket_listening() {
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("skipped: loading BPF programs needs root here");
        }
        let (steer, fds, addr) = steered_pair();
        let cookie = bpf::socket_cookie(fds[0].as_fd()).unwrap();
        steer.set_rotation(&[0], None).unwrap();
        let _queued: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(bpf::accept_queue(fds[0].as_fd()).unwrap(), 5);
        // Slot 0 stalls: out of rotation; its queue moves to slot 1.
        steer.set_rotation(&[1], None).unwrap();
        let groups = [steer];
        let (moved, listening) = evacuate(&groups, 0, &fds[..1]).unwrap();
        let steer = &groups[0];
        assert_eq!(moved, 5);
        assert!(
            listening > Duration::ZERO,
            "what its listen(2) took, for the pace"
        );
        assert_eq!(bpf::accept_queue(fds[0].as_fd()).unwrap(), 0);
        assert_eq!(
            bpf::accept_queue(fds[1].as_fd()).unwrap(),
            5,
            "moved to slot 1"
        );
        // The very same socket listens again, with its backlog, back in the map and the group.
        assert!(getsockopt(&fds[0], sockopt::AcceptConn).unwrap());
        assert_eq!(bpf::queue_and_backlog(fds[0].as_fd()).unwrap().1, 64);
        assert_eq!(steer.socket_at(0).unwrap(), Some(cookie));
        steer.set_rotation(&[0], None).unwrap();
        let _next: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(
            (
                bpf::accept_queue(fds[0].as_fd()).unwrap(),
                bpf::accept_queue(fds[1].as_fd()).unwrap(),
                steer.sent(0).unwrap(),
            ),
            (4, 5, 9),
            "it takes connections again"
        );
        let l = TcpListener::from(fds[0].try_clone().unwrap());
        l.set_nonblocking(true).unwrap();
        assert!(l.accept().is_ok(), "and its holder accepts them");
    }

    #[test]
    fn parked_connections_go_to_the_workers_with_room_and_the_rest_to_the_other_socket() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: loading BPF programs needs root here");
            return;
        }
        let (steer, fds, addr) = steered_pair();
        let groups = vec![steer];
        let mut park = Parking::open(&[crate::sockets::listen::ListenSpec::new(addr)]).unwrap();
        let now = Instant::now();
        let queues = |park: &Parking| {
            let q = |f: &OwnedFd| bpf::accept_queue(f.as_fd()).unwrap_or(0);
            let parked: Vec<u32> = park
                .sets
                .iter()
                .map(|s| s.as_ref().map_or(0, ParkSet::queued))
                .collect();
            (q(&fds[0]), q(&fds[1]), parked)
        };
        // Every worker behind: everything parks.
        park.listen(0, &groups).unwrap();
        park.current = Some(0);
        groups[0].set_rotation(&[Parking::key(0)], None).unwrap();
        let _first: Vec<_> = (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(queues(&park), (0, 0, vec![5, 0, 0, 0]));
        assert_eq!(
            park.sets[0]
                .as_ref()
                .unwrap()
                .in_flight(Parking::key(0), &groups),
            0
        );
        // Slot 1 is back with room for 2: the hand-on gives it 2 and parks 3 in the next.
        for g in &groups {
            g.set_accepted(1, g.sent(1).unwrap()).unwrap();
            g.set_cap(1, 2).unwrap();
        }
        assert_eq!(park.free(), Some(1));
        park.listen(1, &groups).unwrap();
        groups[0].set_rotation(&[1], Some(Parking::key(1))).unwrap();
        park.retire(0, now);
        park.current = Some(1);
        assert!(
            groups[0].socket_at(Parking::key(0)).unwrap().is_some(),
            "still in the map"
        );
        // Not while a run of the program is under way: it may have read the old rotation.
        groups[0].fake_run_under_way(true);
        assert_eq!(park.settle(&groups, now).unwrap(), 0, "a run under way");
        // Where runs never pause, half a millisecond later.
        let later = now + RUNS_END_WITHIN;
        assert_eq!(park.settle(&groups, later).unwrap(), 2, "handed to workers");
        groups[0].fake_run_under_way(false);
        assert_eq!(
            groups[0].socket_at(Parking::key(0)).unwrap(),
            None,
            "out of the map"
        );
        assert_eq!(queues(&park), (0, 2, vec![0, 3, 0, 0]));
        assert_eq!(park.counts, (1, 2));
        // The stopped one is closed; the next round binds a fresh one, on the same port, in
        // the same group: the hand-on after it reaches the workers.
        assert!(park.sets[0].is_none());
        assert_eq!(park.free(), Some(0));
        park.listen(0, &groups).unwrap();
        let local = socket2::SockRef::from(&park.sets[0].as_ref().unwrap().fds[0])
            .local_addr()
            .unwrap();
        assert_eq!(local.as_socket(), Some(addr));
        for g in &groups {
            g.set_accepted(1, g.sent(1).unwrap()).unwrap();
        }
        groups[0].set_rotation(&[1], Some(Parking::key(0))).unwrap();
        park.retire(1, now);
        park.current = Some(0);
        assert_eq!(park.settle(&groups, now).unwrap(), 2, "handed to workers");
        assert_eq!(queues(&park), (0, 4, vec![1, 0, 0, 0]));
    }

    #[test]
    fn a_retired_parking_socket_waits_for_the_handshakes_sent_to_it() {
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("skipped: loading BPF programs needs root here");
        }
        let (steer, fds, addr) = steered_pair();
        let groups = vec![steer];
        let mut park = Parking::open(&[crate::sockets::listen::ListenSpec::new(addr)]).unwrap();
        park.listen(0, &groups).unwrap();
        park.current = Some(0);
        groups[0].set_rotation(&[Parking::key(0)], None).unwrap();
        let _parked: Vec<_> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // A handshake the program sent it that has not completed: as the program counts a
        // SYN it places, before the kernel makes the request.
        let sent = groups[0].sent(Parking::key(0)).unwrap();
        let bump = |by: i64| {
            let n = groups[0].sent(Parking::key(0)).unwrap() as i64 + by;
            groups[0].set_sent(Parking::key(0), n as u64).unwrap();
        };
        bump(1);
        let set = park.sets[0].as_ref().unwrap();
        assert_eq!(set.in_flight(Parking::key(0), &groups), 1);
        park.listen(1, &groups).unwrap();
        groups[0].set_rotation(&[1], Some(Parking::key(1))).unwrap();
        let t0 = Instant::now();
        park.retire(0, t0);
        park.current = Some(1);
        assert_eq!(park.settle(&groups, t0).unwrap(), 0);
        assert_eq!(
            park.sets[0].as_ref().map(ParkSet::queued),
            Some(3),
            "it waits"
        );
        assert!(park.retiring());
        assert_eq!(park.free(), Some(2), "the next hand-on takes another key");
        // The handshake completes: it is stopped at the next sample.
        bump(-1);
        assert_eq!(groups[0].sent(Parking::key(0)).unwrap(), sent);
        assert_eq!(park.settle(&groups, t0).unwrap(), 3);
        assert!(park.sets[0].is_none() && !park.retiring());
        assert_eq!(bpf::accept_queue(fds[1].as_fd()).unwrap(), 3);
        // One that never completes (a SYN dropped, a client gone) holds it RETIRE_MAX at most.
        let _more: Vec<_> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        groups[0].set_rotation(&[Parking::key(1)], None).unwrap();
        let _parked_again: Vec<_> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let before = groups[0].sent(Parking::key(1)).unwrap();
        groups[0].set_sent(Parking::key(1), before + 1).unwrap();
        park.listen(0, &groups).unwrap();
        groups[0].set_rotation(&[1], Some(Parking::key(0))).unwrap();
        park.retire(1, t0);
        park.current = Some(0);
        assert_eq!(park.settle(&groups, t0 + RETIRE_MAX / 2).unwrap(), 0);
        assert_eq!(park.settle(&groups, t0 + RETIRE_MAX).unwrap(), 2);
        assert_eq!(park.forced, 1);
    }

    /// Parks most of the connections of 3 closed-loop clients on 2 workers (caps of 1) and
    /// hands them on back to back for `secs`, as the master does (`at_once`: closing the
    /// parked socket right after the new one is written, as before the fix). Then the
    /// counts: (answered, reset, other failures, hand-ons).
    fn hand_on_back_to_back(secs: f32, at_once: bool) -> (u64, u64, u64, u64) {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;

        let (steer, fds, addr) = steered_pair();
        let groups = vec![steer];
        let mut park = Parking::open(&[crate::sockets::listen::ListenSpec::new(addr)]).unwrap();
        park.listen(0, &groups).unwrap();
        park.current = Some(0);
        for slot in 0..2 {
            groups[0].set_cap(slot, 1).unwrap();
        }
        groups[0]
            .set_rotation(&[0, 1], Some(Parking::key(0)))
            .unwrap();
        // Clients stop first, then the workers, which answer every connection until then.
        let (stop, stop_workers) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let mut threads = Vec::new();
        for fd in &fds {
            let l = TcpListener::from(fd.try_clone().unwrap());
            socket2::SockRef::from(&l)
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let stop = stop_workers.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((mut c, _)) = l.accept() {
                        let mut b = [0u8; 1];
                        let _ = c.read(&mut b);
                        let _ = c.write_all(b"y");
                    }
                }
            }));
        }
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let (stop, counts) = (stop.clone(), counts.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let r = (|| {
                            let mut c = TcpStream::connect(addr)?;
                            c.set_read_timeout(Some(Duration::from_secs(2)))?;
                            c.write_all(b"x")?;
                            let mut b = [0u8; 1];
                            c.read_exact(&mut b)
                        })();
                        let i = match r {
                            Ok(()) => 0,
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 1,
                            Err(e) => {
                                eprintln!("client: {e}");
                                2
                            }
                        };
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let end = Instant::now() + Duration::from_secs_f32(secs);
        let mut hand_ons = 0;
        while Instant::now() < end {
            let now = Instant::now();
            for (slot, fd) in fds.iter().enumerate() {
                let sent = groups[0].sent(slot).unwrap();
                let queue = bpf::accept_queue(fd.as_fd()).unwrap() as u64;
                groups[0]
                    .set_accepted(slot, sent.saturating_sub(queue))
                    .unwrap();
            }
            let c = park.current.unwrap();
            if let Some(i) = park.free() {
                park.listen(i, &groups).unwrap();
                groups[0]
                    .set_rotation(&[0, 1], Some(Parking::key(i)))
                    .unwrap();
                park.retire(c, now);
                park.current = Some(i);
                hand_ons += 1;
                if at_once {
                    park.stop(c, &groups).unwrap();
                }
            }
            park.settle(&groups, now).unwrap();
        }
        // Nothing parks any more: the last parked ones go to the workers.
        for slot in 0..2 {
            groups[0].set_cap(slot, 0).unwrap();
        }
        groups[0].set_rotation(&[0, 1], None).unwrap();
        let last = park.current.take().unwrap();
        park.retire(last, Instant::now());
        while park.retiring() {
            park.settle(&groups, Instant::now()).unwrap();
        }
        // Clients stop after their connection in progress; the workers once they have.
        stop.store(true, Ordering::Relaxed);
        for t in clients {
            t.join().unwrap();
        }
        stop_workers.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        let [ok, reset, other] = &*counts;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (n(ok), n(reset), n(other), hand_ons)
    }

    #[test]
    fn load_handing_parked_connections_on_back_to_back_resets_none() {
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("skipped: loading BPF programs needs root here");
        }
        let (ok, reset, other, hand_ons) = hand_on_back_to_back(3.0, false);
        eprintln!("answered {ok}, reset {reset}, other failures {other}, hand-ons {hand_ons}");
        assert!(
            ok > 1000 && hand_ons > 1000,
            "{ok} answered, {hand_ons} hand-ons"
        );
        assert_eq!((reset, other), (0, 0), "every connection answered");
    }

    #[test]
    fn load_handing_on_control_closing_the_parked_socket_at_once_resets_some() {
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("skipped: loading BPF programs needs root here");
        }
        let (ok, reset, other, hand_ons) = hand_on_back_to_back(3.0, true);
        eprintln!("answered {ok}, reset {reset}, other failures {other}, hand-ons {hand_ons}");
        assert!(
            reset > 0,
            "the race this guards against: {ok} answered, none reset"
        );
    }

    #[test]
    fn an_evacuation_control_shutdown_alone_kills_the_socket_for_every_holder() {
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("skipped: loading BPF programs needs root here");
        }
        let (steer, fds, addr) = steered_pair();
        steer.set_rotation(&[0], None).unwrap();
        let _queued: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        steer.set_rotation(&[1], None).unwrap();
        socket2::SockRef::from(&fds[0])
            .shutdown(std::net::Shutdown::Read)
            .unwrap();
        assert_eq!(
            bpf::accept_queue(fds[1].as_fd()).unwrap(),
            3,
            "the queue moved"
        );
        assert!(!getsockopt(&fds[0], sockopt::AcceptConn).unwrap());
        assert_eq!(steer.socket_at(0).unwrap(), None, "and left the map");
        let l = TcpListener::from(fds[0].try_clone().unwrap());
        l.set_nonblocking(true).unwrap();
        let e = l.accept().unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(nix::libc::EINVAL),
            "the worker's accept fails"
        );
    }
}
