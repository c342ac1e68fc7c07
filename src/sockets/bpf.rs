//! The BPF loader for `--steer bpf`: raw bpf(2) and the few socket options around it.
//! Every `unsafe` of the steering code lives here (the other room is master/spawn.rs).
//!
//! One SK_REUSEPORT program per bind's reuseport group, with three maps:
//! - `socks` (REUSEPORT_SOCKARRAY, key: slot): the socket of each slot's current worker;
//! - `rotation` (ARRAY, one value): `n`, a round-robin counter, the `n` slots that take new
//!   connections, and an overflow key, written by the master (sockets/slots.rs decides who
//!   is in); keys [`PARK`] to `PARK + PARK_KEYS - 1` are the master's parking sockets;
//! - `sent` (ARRAY, key: slot): connections the program sent to each slot, which the
//!   master compares with the accept queue to see whether a worker still accepts;
//! - `accepted` (ARRAY, key: slot): how many of those the slot had accepted at the
//!   master's last sample; `sent - accepted` is what the program compares.
//!
//! - `caps` (ARRAY, key: slot): a slot's cap on outstanding connections (0: none), which the
//!   master sets for a worker on probation, and for every worker while it parks what finds
//!   every candidate at its cap (see sockets/slots.rs, `Parking`).
//!
//! `sent`, `accepted` and `caps` are mmap-able (Linux 5.5+) and mapped into the master, which
//! reads and writes them as memory: a sample makes no bpf(2) call.
//!
//! The program is attached with BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, so it also places the
//! connections still queued on a socket that closes (Linux 5.14+, whatever
//! net.ipv4.tcp_migrate_req says). Its source is [`program`], written with the instruction
//! helpers below (its C equivalent is in the doc comment): building needs no clang and no
//! object file to keep in step with a source.
//!
//! A loaded program that selects nothing (no slot in rotation, or a slot whose socket just
//! closed) returns SK_PASS, and the kernel falls back to its hash: today's behaviour.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;

/// Slots a map can hold: the launcher's limit on workers.
pub const MAX_SLOTS: u32 = crate::config::MAX_WORKERS as u32;

/// The first key of the master's parking sockets in the maps, past every slot's (see
/// `sockets::slots::Parking`).
pub const PARK: usize = MAX_SLOTS as usize;

/// Parking sockets at once: one listening, the others stopped from taking new connections
/// but not closed yet, until the handshakes sent to them complete.
pub const PARK_KEYS: usize = 4;

/// Keys of the per-socket maps: every slot's and the parking sockets'.
const KEYS: u32 = MAX_SLOTS + PARK_KEYS as u32;

/// Keys in `sent` past the sockets': the program's runs begun and ended, so the master can
/// tell when no run is under way (see [`Steer::no_run_under_way`]).
const BEGUN: u32 = KEYS;
const ENDED: u32 = KEYS + 1;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
const BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;

const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;
const SO_COOKIE: libc::c_int = 57;

/// The rotation value: `n`, `rr`, then `MAX_SLOTS` slot numbers.
const ROTATION_SIZE: u32 = OVERFLOW_AT as u32 + 8;

/// Where the rotation value holds its overflow: the key + 1 of the socket that takes a
/// connection when every candidate is at its cap (0: none).
const OVERFLOW_AT: i16 = 8 + 4 * MAX_SLOTS as i16;

/// One reuseport group's program and maps.
#[derive(Debug)]
pub struct Steer {
    prog: OwnedFd,
    socks: OwnedFd,
    rotation: OwnedFd,
    sent: SharedArray,
    limits: SharedArray,
    caps: SharedArray,
}

const BPF_F_MMAPABLE: u32 = 1 << 10;

/// An ARRAY map of u64 values created mmap-able (Linux 5.5+) and mapped into the master:
/// the master reads and writes it as memory, with no bpf(2) call, which is most of what a
/// sample costs under load (the program updates `sent` with atomic adds; the master's loads
/// and stores are atomic too).
#[derive(Debug)]
struct SharedArray {
    fd: OwnedFd,
    base: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    entries: usize,
    bytes: usize,
}

impl SharedArray {
    fn create(entries: u32, name: &str) -> io::Result<SharedArray> {
        let fd = map_create_flags(BPF_MAP_TYPE_ARRAY, 4, 8, entries, BPF_F_MMAPABLE, name)?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = (entries as usize * 8).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's whole value area (the kernel lays an
        // mmap-able array's u64 values out back to back from offset 0); it is unmapped in
        // Drop and never handed out beyond `&self`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = std::ptr::NonNull::new(ptr as *mut std::sync::atomic::AtomicU64)
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedArray {
            fd,
            base,
            entries: entries as usize,
            bytes,
        })
    }

    fn at(&self, index: usize) -> io::Result<&std::sync::atomic::AtomicU64> {
        if index >= self.entries {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        // SAFETY: `index` is within the mapping, which lives as long as `self`; the values
        // are 8-byte aligned (page-aligned base, 8-byte elements), and every access, the
        // kernel's included, is atomic.
        Ok(unsafe { &*self.base.as_ptr().add(index) })
    }

    fn get(&self, index: usize) -> io::Result<u64> {
        Ok(self.at(index)?.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn set(&self, index: usize, value: u64) -> io::Result<()> {
        self.at(index)?
            .store(value, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for SharedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create`, of that length; no reference into it
        // outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.bytes) };
    }
}

impl Steer {
    /// Creates the maps and loads the program. The error says which step failed (EPERM:
    /// no CAP_BPF/CAP_NET_ADMIN; EINVAL: a kernel without SK_REUSEPORT or its migration).
    pub fn load() -> Result<Steer, String> {
        let socks = map_create(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, KEYS, "rc_socks")
            .map_err(|e| format!("creating a REUSEPORT_SOCKARRAY map: {e}"))?;
        let rotation = map_create(BPF_MAP_TYPE_ARRAY, 4, ROTATION_SIZE, 1, "rc_rotation")
            .map_err(|e| format!("creating an array map: {e}"))?;
        let sent = SharedArray::create(ENDED + 1, "rc_sent")
            .map_err(|e| format!("creating an mmap-able array map: {e}"))?;
        let limits = SharedArray::create(KEYS, "rc_accepted")
            .map_err(|e| format!("creating an mmap-able array map: {e}"))?;
        let caps = SharedArray::create(KEYS, "rc_caps")
            .map_err(|e| format!("creating an mmap-able array map: {e}"))?;
        let insns = program(Maps {
            rotation: rotation.as_raw_fd(),
            socks: socks.as_raw_fd(),
            sent: sent.fd.as_raw_fd(),
            accepted: limits.fd.as_raw_fd(),
            caps: caps.fd.as_raw_fd(),
        });
        let prog =
            prog_load(&insns).map_err(|e| format!("loading the SK_REUSEPORT program: {e}"))?;
        Ok(Steer {
            prog,
            socks,
            rotation,
            sent,
            limits,
            caps,
        })
    }

    /// Attaches the program to the reuseport group of `sock` (a listening SO_REUSEPORT
    /// socket). The group keeps it as long as the group lives; attaching again replaces it
    /// with itself.
    pub fn attach(&self, sock: BorrowedFd<'_>) -> io::Result<()> {
        let fd: libc::c_int = self.prog.as_raw_fd();
        setsockopt_int(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_EBPF,
            fd,
        )
    }

    /// Puts `sock` at `slot` in the socket map.
    pub fn set_socket(&self, slot: usize, sock: BorrowedFd<'_>) -> io::Result<()> {
        let key = slot as u32;
        let value = sock.as_raw_fd() as u64;
        map_update(&self.socks, &key.to_ne_bytes(), &value.to_ne_bytes())
    }

    /// Takes `slot` out of the socket map (nothing there is fine).
    pub fn remove_socket(&self, slot: usize) -> io::Result<()> {
        match map_delete(&self.socks, &(slot as u32).to_ne_bytes()) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }

    /// The cookie of the socket at `slot` in the socket map, if any.
    pub fn socket_at(&self, slot: usize) -> io::Result<Option<u64>> {
        let mut value = [0u8; 8];
        match map_lookup(&self.socks, &(slot as u32).to_ne_bytes(), &mut value) {
            Ok(()) => Ok(Some(u64::from_ne_bytes(value))),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes `slots` the ones that take new connections (none: the kernel's hash), and
    /// `overflow` the socket that takes a connection when each slot compared is at its cap.
    pub fn set_rotation(&self, slots: &[usize], overflow: Option<usize>) -> io::Result<()> {
        let mut value = vec![0u8; ROTATION_SIZE as usize];
        let n = slots.len().min(MAX_SLOTS as usize);
        value[0..4].copy_from_slice(&(n as u32).to_ne_bytes());
        for (i, slot) in slots.iter().take(n).enumerate() {
            value[8 + 4 * i..12 + 4 * i].copy_from_slice(&(*slot as u32).to_ne_bytes());
        }
        let at = OVERFLOW_AT as usize;
        let overflow = overflow.map_or(0, |k| k as u32 + 1);
        value[at..at + 4].copy_from_slice(&overflow.to_ne_bytes());
        map_update(&self.rotation, &0u32.to_ne_bytes(), &value)
    }

    /// Tells the program how many of the connections sent to `slot` it had accepted at
    /// the last sample (0: as many as were sent, when unknown).
    pub fn set_accepted(&self, slot: usize, accepted: u64) -> io::Result<()> {
        self.limits.set(slot, accepted)
    }

    /// Limits what `slot` is sent while it has `cap` or more connections outstanding (0: no
    /// limit): the program then takes it only when every candidate is at its limit and no
    /// overflow is set (with one, the connection goes there).
    pub fn set_cap(&self, slot: usize, cap: u64) -> io::Result<()> {
        self.caps.set(slot, cap)
    }

    /// Connections the program has sent to `slot` so far.
    pub fn sent(&self, slot: usize) -> io::Result<u64> {
        self.sent.get(slot)
    }

    /// Whether no run of the program was under way at one moment during this call: every
    /// run that began before the call has ended. After the rotation is written, a run that
    /// read the one before has then counted what it sent where.
    pub fn no_run_under_way(&self) -> bool {
        // Ended first: begun read later is at least what had begun then, so equal means
        // that at the first read every run begun had ended.
        (0..3).any(|_| {
            let ended = self.sent.get(ENDED as usize).unwrap_or(0);
            // The two loads must not be reordered (relaxed loads of two places may be).
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let begun = self.sent.get(BEGUN as usize).unwrap_or(0);
            begun == ended
        })
    }

    /// Counts a run as begun and not ended (`true`), or ended again.
    #[cfg(test)]
    pub fn fake_run_under_way(&self, on: bool) {
        let begun = self.sent.get(BEGUN as usize).unwrap();
        let _ = self
            .sent
            .set(BEGUN as usize, if on { begun + 1 } else { begun - 1 });
    }

    /// Sets the program's count, as if it had sent `slot` that many.
    #[cfg(test)]
    pub fn set_sent(&self, slot: usize, sent: u64) -> io::Result<()> {
        self.sent.set(slot, sent)
    }
}

/// Whether this host and this process can steer: loads a program and attaches it to a
/// throwaway listening socket on 127.0.0.1. For `doctor` and `--steer auto`.
pub fn probe() -> Result<(), String> {
    let steer = Steer::load()?;
    let fd = test_socket(([127, 0, 0, 1], 0).into())
        .map_err(|e| format!("opening a test socket: {e}"))?;
    use std::os::fd::AsFd;
    steer
        .attach(fd.as_fd())
        .map_err(|e| format!("attaching the program (SO_ATTACH_REUSEPORT_EBPF): {e}"))?;
    steer
        .set_socket(0, fd.as_fd())
        .map_err(|e| format!("adding a socket to the map: {e}"))?;
    Ok(())
}

/// Whether a process waiting on a listener (poll(2), epoll, a blocking accept(2)) is woken
/// for a connection the program moves to it from a listener that stops. Linux did not wake
/// it before "tcp: call sk_data_ready() after listener migration" (upstream in April 2026,
/// in the stable kernels from May 2026): a worker asleep in epoll_wait(2) then saw moved
/// connections only once a new connection woke it. Moves a connection between two test
/// sockets on 127.0.0.1 with a thread asleep on the target: a few milliseconds where it
/// wakes, [`WAKE_WAIT`] more where it does not.
pub fn moved_connections_wake_waiters() -> Result<bool, String> {
    match wake_probe(true)? {
        (true, woke) => Ok(woke),
        (false, _) => Err("the test connection did not move".into()),
    }
}

/// A connection queued on one test socket, a thread asleep on the other, and, with
/// `move_it`, the first stopped: (whether the connection moved, whether the thread woke
/// before [`WAKE_WAIT`] passed).
fn wake_probe(move_it: bool) -> Result<(bool, bool), String> {
    use std::os::fd::AsFd;
    use std::sync::mpsc;
    let steer = Steer::load()?;
    let err = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    let from = test_socket(([127, 0, 0, 1], 0).into()).map_err(err("opening a test socket"))?;
    let addr = socket2::SockRef::from(&from)
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or("a test socket has no address")?;
    let to = test_socket(addr).map_err(err("opening a test socket"))?;
    steer
        .attach(from.as_fd())
        .map_err(err("attaching the program"))?;
    steer
        .set_socket(0, from.as_fd())
        .map_err(err("adding a socket to the map"))?;
    steer
        .set_socket(1, to.as_fd())
        .map_err(err("adding a socket to the map"))?;
    steer
        .set_rotation(&[0], None)
        .map_err(err("writing the rotation"))?;
    let _queued = std::net::TcpStream::connect(addr).map_err(err("connecting"))?;
    steer
        .set_rotation(&[1], None)
        .map_err(err("writing the rotation"))?;
    let waiting = to.try_clone().map_err(err("dup"))?;
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(nix::unistd::gettid().as_raw());
        let mut fds = [nix::poll::PollFd::new(
            waiting.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let woke =
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).is_ok_and(|n| n > 0);
        let _ = tx.send(woke as i32);
    });
    let tid = rx.recv().map_err(|_| "the test thread ended")?;
    // Asleep in poll(2) (its only blocking call), or the connection would be seen at once,
    // woken or not.
    let asleep = |tid: i32| {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('S')))
            .unwrap_or(false)
    };
    let since = std::time::Instant::now();
    while !asleep(tid) && since.elapsed() < WAKE_WAIT {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    if move_it {
        nix::sys::socket::shutdown(from.as_raw_fd(), nix::sys::socket::Shutdown::Read)
            .map_err(|e| format!("stopping a test socket: {e}"))?;
    }
    let woke = match rx.recv_timeout(WAKE_WAIT) {
        Ok(w) => w == 1,
        // Woken but not run yet (a busy machine).
        Err(_) if !asleep(tid) => rx.recv().is_ok_and(|w| w == 1),
        Err(_) => {
            // Not woken: a new connection wakes it.
            let _wake = std::net::TcpStream::connect(addr);
            false
        }
    };
    let moved = accept_queue(from.as_fd()).unwrap_or(0) == 0;
    let _ = waiter.join();
    Ok((moved, woke))
}

/// A listening SO_REUSEPORT socket on `addr`, for the probes.
fn test_socket(addr: std::net::SocketAddr) -> io::Result<OwnedFd> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(8)?;
    Ok(OwnedFd::from(s))
}

/// How long [`moved_connections_wake_waiters`] waits for the wake-up.
const WAKE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// The socket's cookie (SO_COOKIE): what the socket map reports for it.
pub fn socket_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value = [0u8; 8];
    getsockopt_bytes(sock.as_raw_fd(), libc::SOL_SOCKET, SO_COOKIE, &mut value)?;
    Ok(u64::from_ne_bytes(value))
}

/// Connections waiting in a listening socket's accept queue (TCP_INFO's tcpi_unacked,
/// which is sk_ack_backlog for a listener): one getsockopt, no netlink dump.
pub fn accept_queue(sock: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(queue_and_backlog(sock)?.0)
}

/// A listening socket's accept queue and its backlog, as given to listen(2) and capped by
/// somaxconn (TCP_INFO's tcpi_sacked, which is sk_max_ack_backlog for a listener): one
/// getsockopt for both.
pub fn queue_and_backlog(sock: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // struct tcp_info: 8 bytes of u8 fields, then rto, ato, snd_mss, rcv_mss, unacked, sacked.
    let mut info = [0u8; 32];
    getsockopt_bytes(
        sock.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_INFO,
        &mut info,
    )?;
    let at = |i: usize| u32::from_ne_bytes([info[i], info[i + 1], info[i + 2], info[i + 3]]);
    Ok((at(24), at(28)))
}

// ---- the program ----

/// One BPF instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;

// Opcode parts (linux/bpf_common.h, linux/bpf.h).
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const ALU64: u8 = 0x07;
const W: u8 = 0x00;
const DW: u8 = 0x18;
const IMM: u8 = 0x00;
const MEM: u8 = 0x60;
const ATOMIC: u8 = 0xc0;
const K: u8 = 0x00;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const SUB: u8 = 0x10;
const LSH: u8 = 0x60;
const MOD: u8 = 0x90;
const MOV: u8 = 0xb0;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JGE: u8 = 0x30;
const JNE: u8 = 0x50;
const JA: u8 = 0x00;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
const FETCH: i32 = 0x01;
const PSEUDO_MAP_FD: u8 = 1;

const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_SK_SELECT_REUSEPORT: i32 = 82;
const SK_PASS: i32 = 1;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}
fn mov64_reg(dst: u8, src: u8) -> Insn {
    insn(ALU64 | MOV | X, dst, src, 0, 0)
}
fn mov64_imm(dst: u8, imm: i32) -> Insn {
    insn(ALU64 | MOV | K, dst, 0, 0, imm)
}
fn add64_imm(dst: u8, imm: i32) -> Insn {
    insn(ALU64 | ADD | K, dst, 0, 0, imm)
}
fn ld_map_fd(dst: u8, fd: RawFd) -> [Insn; 2] {
    [
        insn(LD | IMM | DW, dst, PSEUDO_MAP_FD, 0, fd),
        insn(0, 0, 0, 0, 0),
    ]
}
fn jmp_imm(op: u8, dst: u8, imm: i32, off: i16) -> Insn {
    insn(JMP | op | K, dst, 0, off, imm)
}

/// Slots the program compares per connection: the one whose turn it is and the next ones.
pub const CHOICES: i32 = 3;

/// What a slot at its cap ([`Steer::set_cap`]) counts as on top of its outstanding
/// connections: more than any slot has outstanding, so it is taken only when all are capped.
const CAPPED: i32 = 1 << 20;

/// The map fds the program is built with.
#[derive(Debug, Clone, Copy)]
pub struct Maps {
    pub rotation: RawFd,
    pub socks: RawFd,
    pub sent: RawFd,
    pub accepted: RawFd,
    pub caps: RawFd,
}

/// The steering program: of the slot whose turn it is (round robin) and the next
/// [`CHOICES`]` - 1` in rotation, take the one with the fewest connections outstanding (sent
/// to it since the master's last sample, plus what it had not accepted then: `sent -
/// accepted`, where the master writes `accepted[slot]` at each sample), the first on a tie;
/// select its socket; count it. A worker that stops accepting sees its count grow with
/// every connection it is sent, so the program itself stops sending it any long before the
/// master takes it out of rotation. A slot with a cap (`caps[slot]`, 0: none) counts
/// [`CAPPED`] more once it has that many outstanding: the master caps a worker that comes back
/// after its queue was moved, until it is seen accepting. Anything missing: SK_PASS without a
/// selection, i.e. the kernel's hash.
///
/// ```c
/// count(BEGUN);                                   // and count(ENDED) before each return
/// __u32 zero = 0;
/// struct rotation *r = bpf_map_lookup_elem(&rotation, &zero);
/// if (!r || r->n == 0 || r->n > MAX_SLOTS) return SK_PASS;
/// __u32 rr = __sync_fetch_and_add(&r->rr, 1);
/// __u64 best = ~0ULL; __u32 best_key = 0;
/// for (int t = 0; t < CHOICES; t++) {             // unrolled
///     __u32 i = (rr + t) % r->n;
///     if (i >= MAX_SLOTS) continue;
///     __u32 key = r->slots[i];
///     __u64 *acc = bpf_map_lookup_elem(&accepted, &key);
///     __u64 *sent = bpf_map_lookup_elem(&sent, &key);
///     if (!acc || !sent) continue;
///     __u64 out = *sent > *acc ? *sent - *acc : 0;
///     __u64 *cap = bpf_map_lookup_elem(&caps, &key);
///     if (cap && *cap && out >= *cap) out += CAPPED;
///     if (out < best) { best = out; best_key = key; }
/// }
/// if (best == ~0ULL) return SK_PASS;
/// if (best >= CAPPED && r->overflow) best_key = r->overflow - 1;  // every one at its cap
/// if (bpf_sk_select_reuseport(ctx, &socks, &best_key, 0)) return SK_PASS;
/// __u64 *c = bpf_map_lookup_elem(&sent, &best_key);
/// if (c) __sync_fetch_and_add(c, 1);
/// return SK_PASS;
/// ```
pub fn program(maps: Maps) -> Vec<Insn> {
    let Maps {
        rotation,
        socks,
        sent,
        accepted,
        caps,
    } = maps;
    let max = MAX_SLOTS as i32;
    // Stack: -4 zero, -8 key, -16 best key, -24 best, -32 accepted, -40 out, -44 counter.
    let mut a = Asm::default();
    a.emit(mov64_reg(R6, R1)); // ctx
    count(&mut a, sent, BEGUN);
    a.emit(insn(ST | MEM | W, R10, 0, -4, 0)); // zero
    a.emit(insn(ST | MEM | W, R10, 0, -16, 0)); // best key
    a.emit(insn(ST | MEM | DW, R10, 0, -24, -1)); // best = ~0
    a.emit(mov64_reg(R2, R10));
    a.emit(add64_imm(R2, -4));
    a.emit_all(ld_map_fd(R1, rotation));
    a.emit(insn(JMP | CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM));
    a.jump(jmp_imm(JEQ, R0, 0, 0), "pass");
    a.emit(mov64_reg(R7, R0));
    a.emit(insn(LDX | MEM | W, R8, R7, 0, 0)); // n
    a.jump(jmp_imm(JEQ, R8, 0, 0), "pass");
    a.jump(jmp_imm(JGT, R8, max, 0), "pass");
    a.emit(mov64_imm(R9, 1));
    a.emit(insn(STX | ATOMIC | W, R7, R9, 4, ADD as i32 | FETCH)); // r9 = rr++
    for t in 0..CHOICES {
        let next = format!("choice{}", t + 1);
        a.label(&format!("choice{t}"));
        a.emit(mov64_reg(R1, R9));
        a.emit(insn(ALU | ADD | K, R1, 0, 0, t)); // w1 = rr + t
        a.emit(insn(ALU | MOD | X, R1, R8, 0, 0)); // w1 %= n
        a.jump(jmp_imm(JGE, R1, max, 0), &next);
        a.emit(insn(ALU64 | LSH | K, R1, 0, 0, 2));
        a.emit(insn(ALU64 | ADD | X, R1, R7, 0, 0));
        a.emit(insn(LDX | MEM | W, R1, R1, 8, 0)); // key = slots[i]
        a.emit(insn(STX | MEM | W, R10, R1, -8, 0));
        a.emit(mov64_reg(R2, R10));
        a.emit(add64_imm(R2, -8));
        a.emit_all(ld_map_fd(R1, accepted));
        a.emit(insn(JMP | CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM));
        a.jump(jmp_imm(JEQ, R0, 0, 0), &next);
        a.emit(insn(LDX | MEM | DW, R1, R0, 0, 0));
        a.emit(insn(STX | MEM | DW, R10, R1, -32, 0));
        a.emit(mov64_reg(R2, R10));
        a.emit(add64_imm(R2, -8));
        a.emit_all(ld_map_fd(R1, sent));
        a.emit(insn(JMP | CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM));
        a.jump(jmp_imm(JEQ, R0, 0, 0), &next);
        a.emit(insn(LDX | MEM | DW, R1, R0, 0, 0)); // sent
        a.emit(insn(LDX | MEM | DW, R2, R10, -32, 0)); // accepted
        a.jump(insn(JMP | JGT | X, R1, R2, 0, 0), &format!("sub{t}"));
        a.emit(mov64_imm(R1, 0));
        a.jump(insn(JMP | JA, 0, 0, 0, 0), &format!("cap{t}"));
        a.label(&format!("sub{t}"));
        a.emit(insn(ALU64 | SUB | X, R1, R2, 0, 0)); // out = sent - accepted
        a.label(&format!("cap{t}"));
        a.emit(insn(STX | MEM | DW, R10, R1, -40, 0));
        a.emit(mov64_reg(R2, R10));
        a.emit(add64_imm(R2, -8));
        a.emit_all(ld_map_fd(R1, caps));
        a.emit(insn(JMP | CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM));
        a.jump(jmp_imm(JEQ, R0, 0, 0), &format!("cmp{t}"));
        a.emit(insn(LDX | MEM | DW, R3, R0, 0, 0)); // cap
        a.jump(jmp_imm(JEQ, R3, 0, 0), &format!("cmp{t}"));
        a.emit(insn(LDX | MEM | DW, R1, R10, -40, 0));
        a.jump(insn(JMP | JGT | X, R3, R1, 0, 0), &format!("cmp{t}")); // cap > out
        a.emit(add64_imm(R1, CAPPED));
        a.emit(insn(STX | MEM | DW, R10, R1, -40, 0));
        a.label(&format!("cmp{t}"));
        a.emit(insn(LDX | MEM | DW, R1, R10, -40, 0)); // out
        a.emit(insn(LDX | MEM | DW, R3, R10, -24, 0)); // best
        a.jump(insn(JMP | JGE | X, R1, R3, 0, 0), &next);
        a.emit(insn(STX | MEM | DW, R10, R1, -24, 0));
        a.emit(insn(LDX | MEM | W, R1, R10, -8, 0));
        a.emit(insn(STX | MEM | W, R10, R1, -16, 0));
    }
    a.label(&format!("choice{CHOICES}"));
    a.emit(insn(LDX | MEM | DW, R1, R10, -24, 0));
    a.jump(jmp_imm(JEQ, R1, -1, 0), "pass"); // no candidate (imm sign-extends to ~0)
                                             // Every candidate at its cap: the overflow socket, if there is one.
    a.jump(jmp_imm(JGT, R1, CAPPED - 1, 0), "overflow");
    a.label("select");
    a.emit(mov64_reg(R1, R6));
    a.emit_all(ld_map_fd(R2, socks));
    a.emit(mov64_reg(R3, R10));
    a.emit(add64_imm(R3, -16));
    a.emit(mov64_imm(R4, 0));
    a.emit(insn(JMP | CALL, 0, 0, 0, FN_SK_SELECT_REUSEPORT));
    a.jump(jmp_imm(JNE, R0, 0, 0), "pass");
    a.emit(mov64_reg(R2, R10));
    a.emit(add64_imm(R2, -16));
    a.emit_all(ld_map_fd(R1, sent));
    a.emit(insn(JMP | CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM));
    a.jump(jmp_imm(JEQ, R0, 0, 0), "pass");
    a.emit(mov64_imm(R1, 1));
    a.emit(insn(STX | ATOMIC | DW, R0, R1, 0, ADD as i32)); // lock *c += 1
    a.jump(insn(JMP | JA, 0, 0, 0, 0), "pass");
    a.label("overflow");
    a.emit(insn(LDX | MEM | W, R1, R7, OVERFLOW_AT, 0));
    a.jump(jmp_imm(JEQ, R1, 0, 0), "select");
    a.emit(insn(ALU | SUB | K, R1, 0, 0, 1));
    a.emit(insn(STX | MEM | W, R10, R1, -16, 0));
    a.jump(insn(JMP | JA, 0, 0, 0, 0), "select");
    a.label("pass");
    count(&mut a, sent, ENDED);
    a.emit(mov64_imm(R0, SK_PASS));
    a.emit(insn(JMP | EXIT, 0, 0, 0, 0));
    a.finish()
}

/// `sent[key] += 1` (atomic), if the lookup succeeds: uses R0-R5 and the stack at -44.
fn count(a: &mut Asm, sent: RawFd, key: u32) {
    let label = format!("counted{key}");
    a.emit(insn(ST | MEM | W, R10, 0, -44, key as i32));
    a.emit(mov64_reg(R2, R10));
    a.emit(add64_imm(R2, -44));
    a.emit_all(ld_map_fd(R1, sent));
    a.emit(insn(JMP | CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM));
    a.jump(jmp_imm(JEQ, R0, 0, 0), &label);
    a.emit(mov64_imm(R1, 1));
    a.emit(insn(STX | ATOMIC | DW, R0, R1, 0, ADD as i32));
    a.label(&label);
}

/// Instructions with forward jumps to named labels.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: std::collections::HashMap<String, usize>,
    jumps: Vec<(usize, String)>,
}

impl Asm {
    fn emit(&mut self, i: Insn) {
        self.insns.push(i);
    }
    fn emit_all(&mut self, is: [Insn; 2]) {
        self.insns.extend(is);
    }
    fn jump(&mut self, i: Insn, label: &str) {
        self.jumps.push((self.insns.len(), label.to_string()));
        self.insns.push(i);
    }
    fn label(&mut self, name: &str) {
        self.labels.insert(name.to_string(), self.insns.len());
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, label) in &self.jumps {
            let target = self.labels[label];
            self.insns[*at].off = (target as i64 - *at as i64 - 1) as i16;
        }
        self.insns
    }
}

// ---- syscalls ----

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, writable buffer of the given length laid out as the
    // `union bpf_attr` member of `cmd` (zero-filled beyond the fields set); every pointer
    // stored in it points to memory that outlives this call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr() as *mut libc::c_void,
            attr.len() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put_u32(attr: &mut [u8], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put_u64(attr: &mut [u8], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: bpf(2) just returned this new descriptor (close-on-exec, as bpf(2) always
    // sets it) and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

fn map_create(kind: u32, key: u32, value: u32, entries: u32, name: &str) -> io::Result<OwnedFd> {
    map_create_flags(kind, key, value, entries, 0, name)
}

fn map_create_flags(
    kind: u32,
    key: u32,
    value: u32,
    entries: u32,
    flags: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 72];
    put_u32(&mut attr, 0, kind);
    put_u32(&mut attr, 4, key);
    put_u32(&mut attr, 8, value);
    put_u32(&mut attr, 12, entries);
    put_u32(&mut attr, 16, flags);
    let n = name.len().min(15);
    attr[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

fn map_elem(
    cmd: libc::c_long,
    map: &OwnedFd,
    key: &[u8],
    value: Option<*const u8>,
) -> io::Result<()> {
    let mut attr = [0u8; 32];
    put_u32(&mut attr, 0, map.as_raw_fd() as u32);
    put_u64(&mut attr, 8, key.as_ptr() as u64);
    if let Some(v) = value {
        put_u64(&mut attr, 16, v as u64);
    }
    bpf(cmd, &mut attr).map(drop)
}

fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    map_elem(BPF_MAP_UPDATE_ELEM, map, key, Some(value.as_ptr()))
}

fn map_lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    map_elem(BPF_MAP_LOOKUP_ELEM, map, key, Some(value.as_mut_ptr()))
}

fn map_delete(map: &OwnedFd, key: &[u8]) -> io::Result<()> {
    map_elem(BPF_MAP_DELETE_ELEM, map, key, None)
}

fn prog_load(insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, BPF_PROG_TYPE_SK_REUSEPORT);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    let name = b"rc_steer";
    attr[48..48 + name.len()].copy_from_slice(name);
    put_u32(&mut attr, 68, BPF_SK_REUSEPORT_SELECT_OR_MIGRATE);
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            // Load again with the verifier's log, to say why.
            put_u32(&mut attr, 24, 1);
            put_u32(&mut attr, 28, log.len() as u32);
            put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
            match bpf(BPF_PROG_LOAD, &mut attr) {
                Ok(fd) => Ok(owned(fd)),
                Err(_) => {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    let text = String::from_utf8_lossy(&log[..end]);
                    let last = text
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("");
                    Err(io::Error::new(e.kind(), format!("{e} (verifier: {last})")))
                }
            }
        }
        Err(e) => Err(e),
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live c_int and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn getsockopt_bytes(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf`, which is live and that long.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            buf.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    fn group(n: usize) -> (Vec<TcpListener>, std::net::SocketAddr) {
        let first =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        first.set_reuse_port(true).unwrap();
        first
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        first.listen(64).unwrap();
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let mut all = vec![TcpListener::from(first)];
        for _ in 1..n {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(64).unwrap();
            all.push(TcpListener::from(s));
        }
        (all, addr)
    }

    fn root() -> bool {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: loading BPF programs needs root here");
            return false;
        }
        true
    }

    #[test]
    fn connections_go_only_to_the_slots_in_rotation_round_robin() {
        if !root() {
            return;
        }
        let steer = Steer::load().unwrap();
        let (socks, addr) = group(3);
        for (i, s) in socks.iter().enumerate() {
            steer.attach(s.as_fd()).unwrap();
            steer.set_socket(i, s.as_fd()).unwrap();
        }
        steer.set_rotation(&[0, 2], None).unwrap();
        let clients: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let queues: Vec<u32> = socks
            .iter()
            .map(|s| accept_queue(s.as_fd()).unwrap())
            .collect();
        assert_eq!(queues, vec![5, 0, 5], "round robin over slots 0 and 2 only");
        assert_eq!((steer.sent(0).unwrap(), steer.sent(1).unwrap()), (5, 0));
        drop(clients);
    }

    #[test]
    fn of_the_slots_whose_turn_it_is_the_one_with_the_fewest_outstanding_gets_it() {
        if !root() {
            return;
        }
        let steer = Steer::load().unwrap();
        let (socks, addr) = group(3);
        for (i, s) in socks.iter().enumerate() {
            steer.attach(s.as_fd()).unwrap();
            steer.set_socket(i, s.as_fd()).unwrap();
        }
        steer.set_rotation(&[0, 1, 2], None).unwrap();
        // Nobody accepts: every connection stays outstanding, so the counts stay level.
        let mut clients: Vec<TcpStream> =
            (0..9).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let queues = |socks: &[TcpListener]| -> Vec<u32> {
            socks
                .iter()
                .map(|s| accept_queue(s.as_fd()).unwrap())
                .collect()
        };
        assert_eq!(queues(&socks), vec![3, 3, 3]);
        // Slots 1 and 2 accepted theirs (as the master's sample says); slot 0 did not.
        for slot in [1, 2] {
            steer.set_accepted(slot, steer.sent(slot).unwrap()).unwrap();
        }
        // They get the next 6, until they have as many outstanding as slot 0.
        clients.extend((0..6).map(|_| TcpStream::connect(addr).unwrap()));
        assert_eq!(queues(&socks), vec![3, 6, 6], "slot 0 took nothing more");
    }

    #[test]
    fn the_map_reports_each_slots_socket_cookie_and_forgets_a_closed_one() {
        if !root() {
            return;
        }
        let steer = Steer::load().unwrap();
        let (mut socks, _) = group(2);
        for (i, s) in socks.iter().enumerate() {
            steer.set_socket(i, s.as_fd()).unwrap();
        }
        let cookie = socket_cookie(socks[1].as_fd()).unwrap();
        assert_eq!(steer.socket_at(1).unwrap(), Some(cookie));
        drop(socks.pop());
        assert_eq!(
            steer.socket_at(1).unwrap(),
            None,
            "a closed socket leaves the map"
        );
        steer.remove_socket(0).unwrap();
        assert_eq!(steer.socket_at(0).unwrap(), None);
    }

    #[test]
    fn a_capped_slot_gets_nothing_past_its_cap_while_another_is_below_it() {
        if !root() {
            return;
        }
        let queues = |cap: u64, all_capped: bool| -> Vec<u32> {
            let steer = Steer::load().unwrap();
            let (socks, addr) = group(2);
            for (i, s) in socks.iter().enumerate() {
                steer.attach(s.as_fd()).unwrap();
                steer.set_socket(i, s.as_fd()).unwrap();
            }
            steer.set_rotation(&[0, 1], None).unwrap();
            steer.set_cap(0, cap).unwrap();
            if all_capped {
                steer.set_cap(1, cap).unwrap();
            }
            let _clients: Vec<TcpStream> =
                (0..6).map(|_| TcpStream::connect(addr).unwrap()).collect();
            socks
                .iter()
                .map(|s| accept_queue(s.as_fd()).unwrap())
                .collect()
        };
        assert_eq!(
            queues(1, false),
            vec![1, 5],
            "slot 0 takes 1, then is capped"
        );
        assert_eq!(queues(0, false), vec![3, 3], "control: no cap, round robin");
        assert_eq!(
            queues(1, true),
            vec![3, 3],
            "all capped: still round robin among them, never the hash"
        );
    }

    #[test]
    fn past_every_cap_connections_go_to_the_overflow_socket() {
        if !root() {
            return;
        }
        // Slots 0 and 1 capped at 1 each; the group's third socket is the overflow.
        let queues = |overflow: Option<usize>| -> Vec<u32> {
            let steer = Steer::load().unwrap();
            let (socks, addr) = group(3);
            for (key, s) in [0, 1, PARK].into_iter().zip(&socks) {
                steer.attach(s.as_fd()).unwrap();
                steer.set_socket(key, s.as_fd()).unwrap();
            }
            steer.set_rotation(&[0, 1], overflow).unwrap();
            steer.set_cap(0, 1).unwrap();
            steer.set_cap(1, 1).unwrap();
            let _clients: Vec<TcpStream> =
                (0..6).map(|_| TcpStream::connect(addr).unwrap()).collect();
            socks
                .iter()
                .map(|s| accept_queue(s.as_fd()).unwrap())
                .collect()
        };
        assert_eq!(
            queues(Some(PARK)),
            vec![1, 1, 4],
            "one each up to the caps, the rest to the overflow"
        );
        assert_eq!(
            queues(None),
            vec![3, 3, 0],
            "control: no overflow, the capped slots share everything"
        );
    }

    #[test]
    fn with_nobody_in_rotation_the_kernel_hashes() {
        if !root() {
            return;
        }
        let steer = Steer::load().unwrap();
        let (socks, addr) = group(2);
        for (i, s) in socks.iter().enumerate() {
            steer.attach(s.as_fd()).unwrap();
            steer.set_socket(i, s.as_fd()).unwrap();
        }
        let _clients: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let total: u32 = socks.iter().map(|s| accept_queue(s.as_fd()).unwrap()).sum();
        assert_eq!(total, 40);
        assert_eq!(steer.sent(0).unwrap() + steer.sent(1).unwrap(), 0);
    }

    #[test]
    fn a_closing_sockets_queue_moves_to_the_slot_in_rotation() {
        if !root() {
            return;
        }
        let steer = Steer::load().unwrap();
        let (mut socks, addr) = group(2);
        for (i, s) in socks.iter().enumerate() {
            steer.attach(s.as_fd()).unwrap();
            steer.set_socket(i, s.as_fd()).unwrap();
        }
        steer.set_rotation(&[1], None).unwrap();
        let _clients: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(accept_queue(socks[1].as_fd()).unwrap(), 4);
        steer.set_rotation(&[0], None).unwrap();
        drop(socks.pop());
        assert_eq!(
            accept_queue(socks[0].as_fd()).unwrap(),
            4,
            "migrated, not reset"
        );
    }

    #[test]
    fn a_thread_asleep_on_a_socket_is_woken_by_a_connection_moved_to_it() {
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("skipped: loading BPF programs needs root here");
        }
        let (moved, woke) = wake_probe(true).unwrap();
        assert!(moved, "the connection moved");
        // Where it does not, the master parks nothing (tested by the control below that
        // the probe can say no).
        eprintln!("woken by a moved connection on this kernel: {woke}");
        assert_eq!(moved_connections_wake_waiters(), Ok(woke));
    }

    #[test]
    fn the_wake_probe_control_nothing_moved_wakes_no_one() {
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("skipped: loading BPF programs needs root here");
        }
        assert_eq!(wake_probe(false), Ok((false, false)));
    }

    #[test]
    fn every_run_of_the_program_is_counted_as_begun_and_ended() {
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("skipped: loading BPF programs needs root here");
        }
        let steer = Steer::load().unwrap();
        let runs = |s: &Steer| {
            (
                s.sent.get(BEGUN as usize).unwrap(),
                s.sent.get(ENDED as usize).unwrap(),
            )
        };
        let (ls, addr) = group(2);
        for (slot, l) in ls.iter().enumerate() {
            steer.attach(l.as_fd()).unwrap();
            steer.set_socket(slot, l.as_fd()).unwrap();
        }
        assert_eq!(runs(&steer), (0, 0));
        assert!(steer.no_run_under_way());
        // A run that selects, and one that returns early (no rotation: the hash).
        steer.set_rotation(&[1], None).unwrap();
        let _a = TcpStream::connect(addr).unwrap();
        steer.set_rotation(&[], None).unwrap();
        let _b = TcpStream::connect(addr).unwrap();
        assert_eq!(runs(&steer), (2, 2));
        assert!(steer.no_run_under_way());
        steer.fake_run_under_way(true);
        assert!(
            !steer.no_run_under_way(),
            "the control: one begun, not ended"
        );
    }
}
