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
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
use nix::unistd::Pid;

use crate::master::spawn;
use crate::master::worker::ms;

/// A reap this long is logged (at debug level).
const SLOW_REAP: Duration = Duration::from_millis(100);

/// The reaps under way.
pub struct Reaper {
    /// By pid: the thread reaping it.
    under_way: HashMap<Pid, JoinHandle<()>>,
    /// Reaps done, and how long each took.
    done_tx: mpsc::Sender<(Pid, Duration)>,
    done_rx: mpsc::Receiver<(Pid, Duration)>,
    /// A thread writes a byte here when its reap is done, to wake the master's poll.
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

impl Reaper {
    pub fn new() -> std::io::Result<Reaper> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        let (done_tx, done_rx) = mpsc::channel();
        Ok(Reaper {
            under_way: HashMap::new(),
            done_tx,
            done_rx,
            wake_tx,
            wake_rx,
        })
    }

    /// Whether `pid` is being reaped (its exit was already handled). A finished thread's
    /// pid is free again: a new child may have it.
    pub fn is_reaping(&self, pid: Pid) -> bool {
        self.under_way.get(&pid).is_some_and(|t| !t.is_finished())
    }

    /// Reaps `pid`, an exited child whose exit the master has handled, on a thread.
    pub fn reap(&mut self, pid: Pid) {
        let done = self.done_tx.clone();
        let wake = self.wake_tx.try_clone();
        let reap = move || {
            let t0 = Instant::now();
            if let Err(e) = spawn::release(pid) {
                crate::debug!("reaping pid {pid}: {e}");
            }
            let _ = done.send((pid, t0.elapsed()));
            if let Ok(mut w) = wake {
                let _ = std::io::Write::write(&mut w, &[1]);
            }
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
                self.under_way.insert(pid, thread);
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

    /// Takes note of the reaps that are done.
    pub fn service(&mut self) {
        let mut buf = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
        while let Ok((pid, took)) = self.done_rx.try_recv() {
            if let Some(thread) = self.under_way.remove(&pid) {
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
        for (_, thread) in self.under_way.drain() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exited_child_is_reaped_on_a_thread_and_no_longer_reported() {
        let mut reaper = Reaper::new().unwrap();
        #[allow(clippy::zombie_processes)] // the reaper is what reaps it
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = Pid::from_raw(child.id() as i32);
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
        // Reaped: waitid knows no such child any more.
        assert_eq!(
            spawn::exited_child(Some(pid)),
            Err(nix::errno::Errno::ECHILD)
        );
    }
}
