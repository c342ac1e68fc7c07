//! The master never blocks, never loses a process, never dies of a stray signal (issue 9).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// Runs a client request against the control socket at `control`, giving up after `limit`.
fn ctl_within(control: &Path, args: &[&str], limit: Duration) -> Option<String> {
    let mut child = Command::new(bin())
        .args(args)
        .arg("--control")
        .arg(control)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if !wait_until(limit, || child.try_wait().unwrap().is_some()) {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    let out = child.wait_with_output().unwrap();
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One control request over the socket, with a time limit for the answer.
fn request(control: &Path, line: &str, limit: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(control)?;
    stream.set_read_timeout(Some(limit))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Kills a master started by hand, and its workers, however the test ended.
struct Master(Child, Vec<u32>);

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        for pid in &self.1 {
            kill_group(*pid);
        }
    }
}

fn worker_pids(master: u32) -> Vec<u32> {
    children(master)
        .into_iter()
        .filter(|p| env_of(*p).contains_key("REUSEPORT_CLUSTER_WORKER"))
        .collect()
}

/// Issue 9, item 3: stderr is a FIFO whose reader never reads; the master keeps supervising.
#[test]
fn a_log_reader_that_never_reads_does_not_freeze_the_master() {
    let dir = temp_dir("stuck-log");
    let fifo = dir.join("log.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // The reader: opened, never read. Opened non-blocking so that the open does not wait.
    let reader: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_nonblock()
        .open(&fifo)
        .unwrap()
        .into();
    let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    // The smallest pipe there is, so that a few lines fill it.
    nix::fcntl::fcntl(&writer, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
    let control = dir.join("c.sock");
    let child = Command::new(bin())
        .args(["--control", control.to_str().unwrap()])
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--ready",
            "delay:20ms",
        ])
        .args(["--grace", "2s", "--", "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(writer)
        .spawn()
        .unwrap();
    let mut master = Master(child, Vec::new());
    let pid = master.0.id();
    assert!(
        wait_until(TIMEOUT, || worker_pids(pid).len() == 2),
        "two workers start"
    );
    // Hundreds of reloads and scale requests: far more log lines than the pipe holds.
    for i in 0..40 {
        let n = if i % 2 == 0 { 3 } else { 2 };
        let answer = request(&control, &format!("scale {n}"), Duration::from_secs(5));
        assert!(
            answer.as_deref().is_ok_and(|a| a.starts_with("ok")),
            "scale request {i} answered: {answer:?}"
        );
    }
    for _ in 0..500 {
        signal(pid, Signal::SIGHUP);
    }
    let started = Instant::now();
    let status = ctl_within(&control, &["status"], Duration::from_secs(5));
    assert!(
        status.as_deref().is_some_and(|s| s.contains("workers")),
        "status answers while the log pipe is full: {status:?}"
    );
    eprintln!("status answered in {:?}", started.elapsed());
    // A SIGKILLed worker is reaped and replaced (once the reloads are through).
    let settled = wait_until(TIMEOUT, || {
        ctl_within(&control, &["status", "--json"], Duration::from_secs(5))
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|s| s["rolling_restart"].is_null() && s["workers_ready"] == 2)
    });
    assert!(settled, "the reloads finish while the log pipe is full");
    let victim = worker_pids(pid)[0];
    master.1.push(victim);
    signal(victim, Signal::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let now = worker_pids(pid);
            now.len() == 2 && !now.contains(&victim) && !alive(victim)
        }),
        "the killed worker is reaped and replaced"
    );
    master.1.extend(worker_pids(pid));
    signal(pid, Signal::SIGTERM);
    let stopped = wait_until(Duration::from_secs(10), || {
        master.0.try_wait().unwrap().is_some()
    });
    assert!(
        stopped,
        "SIGTERM stops the master while its log pipe is full; it waits in {:?}, children {:?}",
        std::fs::read_to_string(format!("/proc/{pid}/wchan")),
        children(pid)
    );
    drop(reader);
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(nix::libc::O_NONBLOCK)
    }
}
