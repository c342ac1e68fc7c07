//! The production targets for real, through scripts/deploy-test.sh: the .deb under systemd
//! 252 and 254 (systemd-nspawn), the Dockerfile under a Docker engine, the Kubernetes
//! manifests under kubernetes-validate. Named load_* so that they run one at a time and never
//! beside a load test: they time starts, reloads and a 3 s watchdog on a 2-CPU machine.

use crate::support::load_lock;

fn deploy_test(area: &str) {
    let _load = load_lock();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // timeout(1) sends SIGTERM, on which the script removes what it made.
    let out = std::process::Command::new("timeout")
        .args(["--kill-after=30", "540"])
        .arg(root.join("scripts/deploy-test.sh"))
        .arg(area)
        .output()
        .expect("running scripts/deploy-test.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "scripts/deploy-test.sh {area}: {stdout}"
    );
    assert!(
        stdout.contains(" 0 failed") || stdout.contains("skipped:"),
        "{stdout}"
    );
}

#[test]
fn load_real_deploy_systemd_252() {
    deploy_test("systemd-252");
}

#[test]
fn load_real_deploy_systemd_254() {
    deploy_test("systemd-254");
}

#[test]
fn load_real_deploy_docker() {
    deploy_test("docker");
}

#[test]
fn load_real_deploy_kubernetes_manifests() {
    deploy_test("kubernetes");
}
