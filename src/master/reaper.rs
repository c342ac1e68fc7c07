//! Reaping exited children off the master's loop.
//!
//! The master learns of an exit with waitid(WNOWAIT) (spawn.rs `exited_child`), which is
//! cheap and leaves the child a zombie while the master acts on it. The reap itself,
//! wait4(2), is not cheap: the kernel flushes the child's /proc dentries there
//! (release_task → proc_flush_pid → d_invalidate), and on a busy machine that took 1.4, 1.5,
//! 8.3 and 9.7 s for Node workers stopped under load (strace -T on the master; perf showed
//! d_walk and shrink_dcache_parent under wait4). A master that waited that long could
//! neither SIGKILL a worker past its grace, nor answer `status`, nor go on with a rolling
//! restart: the load tests of rolling restarts failed with passes of 30-40 s.
//!
//! So each reap runs on a short-lived thread of its own: the only threads the master ever
//! starts, and they do nothing but wait4(2) and say when it returned. The kernel marks a
//! child dead as wait4 begins, after which waitid no longer reports it, so the master goes
//! on finding other exits while a slow reap runs.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
use nix::unistd::Pid;

use crate::master::spawn;
use crate::master::worker::ms;

/// A reap this long is logged (at debug level).
const SLOW_REAP: Duration = Duration::from_millis(100);

/// One reap, told apart from a later one of the same pid (pids are reused once freed).
type Serial = u64;

/// The reaps under way.
pub struct Reaper {
    /// By pid: the latest reap of it and its thread.
    under_way: HashMap<Pid, (Serial, JoinHandle<()>)>,
    /// Threads of earlier reaps of a pid reused since (still to be joined).
    superseded: Vec<(Serial, JoinHandle<()>)>,
    next: Serial,
    /// Reaps done, and how long each took.
    done_tx: mpsc::Sender<(Serial, Pid, Duration)>,
    done_rx: mpsc::Receiver<(Serial, Pid, Duration)>,
    /// Every thread writes a byte here when its reap is done, to wake the master's poll.
    wake_tx: Arc<UnixStream>,
    wake_rx: UnixStream,
}

impl Reaper {
    pub fn new() -> std::io::Result<Reaper> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        let (done_tx, done_rx) = mpsc::channel();
        Ok(Reaper {
            under_way: HashMap::new(),
            superseded: Vec::new(),
            next: 0,
            done_tx,
            done_rx,
            wake_tx: Arc::new(wake_tx),
            wake_rx,
        })
    }

    /// Whether `pid` is being reaped (its exit was already handled). A finished thread's
    /// pid is free again: a new child may have it.
    pub fn is_reaping(&self, pid: Pid) -> bool {
        self.under_way
            .get(&pid)
            .is_some_and(|(_, t)| !t.is_finished())
    }

    /// Whether no reap is under way or waits to be joined.
    pub fn is_idle(&self) -> bool {
        self.under_way.is_empty() && self.superseded.is_empty()
    }

    /// Reaps `pid`, an exited child whose exit the master has handled, on a thread.
    pub fn reap(&mut self, pid: Pid) {
        let serial = self.next;
        self.next += 1;
        let done = self.done_tx.clone();
        let wake = Arc::clone(&self.wake_tx);
        let reap = move || {
            let t0 = Instant::now();
            if let Err(e) = spawn::release(pid) {
                crate::debug!("reaping pid {pid}: {e}");
            }
            // The message before the byte: the wake it causes always finds the message.
            let _ = done.send((serial, pid, t0.elapsed()));
            let _ = (&*wake).write(&[1]);
        };
        // The thread starts with every signal blocked (it inherits this mask): the master's
        // signals are for its loop, whose handlers and signalfd expect them there.
        let mut old = SigSet::empty();
        let _ = pthread_sigmask(
            SigmaskHow::SIG_SETMASK,
            Some(&SigSet::all()),
            Some(&mut old),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("reap {pid}"))
            .spawn(reap);
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
        match spawned {
            Ok(thread) => {
                if let Some(earlier) = self.under_way.insert(pid, (serial, thread)) {
                    self.superseded.push(earlier);
                }
            }
            // No thread to be had (a thread limit): reap here, however long it takes.
            Err(_) => {
                let _ = spawn::release(pid);
            }
        }
    }

    /// The fd that polls readable when a reap is done.
    pub fn poll_fd(&self) -> BorrowedFd<'_> {
        self.wake_rx.as_fd()
    }

    /// Takes note of the reaps that are done (their threads have ended or are ending: the
    /// joins wait for no reap).
    pub fn service(&mut self) {
        let mut buf = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
        while let Ok((serial, pid, took)) = self.done_rx.try_recv() {
            let thread = match self.under_way.get(&pid) {
                Some((s, _)) if *s == serial => self.under_way.remove(&pid).map(|(_, t)| t),
                _ => self
                    .superseded
                    .iter()
                    .position(|(s, _)| *s == serial)
                    .map(|i| self.superseded.swap_remove(i).1),
            };
            if let Some(thread) = thread {
                let _ = thread.join();
            }
            if took >= SLOW_REAP {
                crate::debug!(
                    "pid {pid} reaped in {} (the kernel's /proc flush)",
                    ms(took)
                );
            }
        }
    }

    /// Waits for every reap under way (at exit: nothing is left to init).
    pub fn finish(&mut self) {
        let threads = self.under_way.drain().map(|(_, (_, t))| t);
        for thread in threads.chain(self.superseded.drain(..).map(|(_, t)| t)) {
            let _ = thread.join();
        }
        while self.done_rx.try_recv().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child running true(1), left for the reaper to reap.
    fn child_of_true() -> Pid {
        #[allow(clippy::zombie_processes)] // the reaper is what reaps it
        let child = std::process::Command::new("true").spawn().unwrap();
        Pid::from_raw(child.id() as i32)
    }

    #[test]
    fn an_exited_child_is_reaped_on_a_thread_and_no_longer_reported() {
        let mut reaper = Reaper::new().unwrap();
        let pid = child_of_true();
        let t0 = Instant::now();
        let exited = loop {
            if let Some(found) = spawn::exited_child(Some(pid)).unwrap() {
                break found;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "true never exited");
            std::thread::sleep(Duration::from_millis(5)); // waiting for a child, in a test
        };
        assert_eq!(exited, (pid, crate::master::worker::ExitReason::Code(0)));
        reaper.reap(pid);
        assert!(reaper.is_reaping(pid));
        reaper.finish();
        assert!(!reaper.is_reaping(pid));
        assert!(reaper.is_idle());
        // Reaped: waitid knows no such child any more.
        assert_eq!(
            spawn::exited_child(Some(pid)),
            Err(nix::errno::Errno::ECHILD)
        );
    }

    #[test]
    fn a_reap_of_a_reused_pid_does_not_take_the_place_of_the_earlier_one() {
        let mut reaper = Reaper::new().unwrap();
        let pid = child_of_true();
        // As if the pid came back and exited again: two reaps of one pid at once (the
        // second finds no child).
        reaper.reap(pid);
        reaper.reap(pid);
        let t0 = Instant::now();
        while !reaper.is_idle() {
            assert!(t0.elapsed() < Duration::from_secs(10), "reaps never ended");
            std::thread::sleep(Duration::from_millis(5)); // waiting for threads, in a test
            reaper.service();
        }
    }
}
