//! Whether a process's main thread sleeps waiting for events: the hint that brings a
//! held-out worker back (sockets/slots.rs, `Hint`). Its own file, so that the steering
//! bench, which measures how much of the time workers wait so, reads it the same way.

/// Whether `pid`'s main thread is blocked waiting for events: in epoll_wait, poll, select or
/// accept (/proc/PID/syscall). An event loop there is idle and would take a connection now. A
/// hint, not a fact: in some servers another process or thread does the accepting.
pub fn waiting_for_events(pid: u32) -> bool {
    syscall(pid).is_some_and(waits_for_events)
}

/// The system call `pid`'s main thread is in (None: running, or no such process).
fn syscall(pid: u32) -> Option<nix::libc::c_long> {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The system calls an idle event loop (or an acceptor) sleeps in.
fn waits_for_events(nr: nix::libc::c_long) -> bool {
    use nix::libc;
    const WAITS: &[libc::c_long] = &[
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_ppoll,
        libc::SYS_pselect6,
        libc::SYS_accept,
        libc::SYS_accept4,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_epoll_wait,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_poll,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_select,
    ];
    WAITS.contains(&nr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_asleep_in_poll_waits_for_events_and_one_in_nanosleep_does_not() {
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};
        let spawn = |cmd: &[&str]| {
            Command::new(cmd[0])
                .args(&cmd[1..])
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut poller = spawn(&["python3", "-c", "import select; select.poll().poll(10000)"]);
        let mut sleeper = spawn(&["sleep", "10"]);
        // Until each has reached its system call.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(waiting_for_events(poller.id()) && syscall(sleeper.id()).is_some())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (polling, sleeping) = (
            waiting_for_events(poller.id()),
            waiting_for_events(sleeper.id()),
        );
        for c in [&mut poller, &mut sleeper] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(polling, "a process asleep in poll(2) waits for events");
        assert!(!sleeping, "control: one asleep in nanosleep(2) does not");
        assert!(!waiting_for_events(u32::MAX), "no such process: no");
    }
}
