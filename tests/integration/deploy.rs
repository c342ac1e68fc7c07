//! Production deploys: privilege drop, systemd's notify protocol, PID 1 in a container.

use std::time::Duration;

use crate::support::*;

/// A privileged port that is free now, or None (and why) when this host has none.
fn free_privileged_port() -> Option<u16> {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    (600..start.min(1024)).find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
}

#[test]
fn workers_run_as_nobody_on_a_privileged_port_and_still_roll() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: dropping to another user needs root");
        return;
    }
    let Some(port) = free_privileged_port() else {
        eprintln!("skipped: no privileged port below net.ipv4.ip_unprivileged_port_start is free");
        return;
    };
    let bind = format!("127.0.0.1:{port}");
    let mut c = Cluster::start(&["--workers", "2", "--bind", &bind, "--user", "nobody"]);
    let check = |c: &mut Cluster| {
        for (slot, pid) in c.workers() {
            let uid = status_field(pid, "Uid").unwrap();
            assert!(
                uid.split_whitespace().all(|u| u == "65534"),
                "worker {slot} uid: {uid}"
            );
            let gid = status_field(pid, "Gid").unwrap();
            assert!(
                gid.split_whitespace().all(|g| g == "65534"),
                "worker {slot} gid: {gid}"
            );
            let groups = status_field(pid, "Groups").unwrap_or_default();
            assert!(
                !groups.split_whitespace().any(|g| g == "0"),
                "root's group kept: {groups}"
            );
        }
        for _ in 0..20 {
            assert_eq!(
                get(c.addr()).expect("request to a nobody worker").status,
                200
            );
        }
    };
    check(&mut c);
    c.signal(Signal::SIGHUP);
    c.expect_log("rolling restart to generation 2 done");
    check(&mut c);
    assert!(c.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["generation"] == 2));
}

#[test]
fn unknown_user_or_group_is_refused() {
    let (code, log) = run(&["--bind", "127.0.0.1:0", "--user", "no-such-user-xyz"]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("--user no-such-user-xyz: no such user"),
        "{log}"
    );
    let (code, log) = run(&[
        "--bind",
        "127.0.0.1:0",
        "--user",
        "nobody",
        "--group",
        "no-such-group-xyz",
    ]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("--group no-such-group-xyz: no such group"),
        "{log}"
    );
}
