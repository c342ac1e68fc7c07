//! Node apps as their authors wrote them: `listen(PORT)`, cluster scripts, no stop handler.
//!
//! When a worker's program is Node (`node`, a `#!…node` script, or a wrapper that starts
//! Node: `npm`, `npx`, `yarn`, `pnpm`, `tsx`), every worker gets `NODE_OPTIONS=--require
//! PRELOAD` (after any `NODE_OPTIONS` the user set) and the environment the preload reads.
//! The preload (`preload.cjs`, compiled into the binary and written to a file at start)
//! maps a listen on a `--bind`'s port to the fd the worker was given, makes the cluster
//! module report a worker, drains on the stop signal when the app has no handler for it,
//! and connects to the master's ready socket once the worker listens (ops/notify.rs).
//! `--no-node-preload` turns all of it off. What is decided here: whether the program is
//! Node ([`detect`]), where the file goes ([`install`]), and the environment ([`env`]).

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::{App, Bind, Credentials};

/// The preload's source.
pub const PRELOAD: &str = include_str!("preload.cjs");

/// How the worker's program starts Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// The worker's own process is Node (`node app.js`, a `#!/usr/bin/env node` script).
    Direct,
    /// A Node tool that starts the app as a child (`npm start`, `npx`, `yarn`, `tsx`): the
    /// first Node process below it owns the sockets.
    Wrapper,
}

/// Whether workers get the preload, and why (shown by the log and `status`).
#[derive(Debug, Clone, PartialEq)]
pub enum Preload {
    /// On: `program` is how Node is started (`node`, `npm`, `#!/usr/bin/env node script`).
    On {
        /// What was recognised, for the log.
        program: String,
        /// Direct or through a wrapper.
        launch: Launch,
        /// The file passed to `--require`, once written.
        path: Option<PathBuf>,
    },
    /// `--no-node-preload`.
    Disabled,
    /// The program is not Node (nothing changes).
    NotNode,
    /// Node, but the file could not be written where the workers can read it.
    Failed(String),
}

impl Preload {
    /// The file workers `--require`, when on and written.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Preload::On { path, .. } => path.as_deref(),
            _ => None,
        }
    }
}

impl fmt::Display for Preload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Preload::On {
                program,
                launch,
                path,
            } => {
                write!(f, "on ({program}")?;
                if *launch == Launch::Wrapper {
                    f.write_str(", a wrapper: the first Node process it starts serves")?;
                }
                match path {
                    Some(p) => write!(f, "; {}", p.display())?,
                    None => f.write_str("; not written yet")?,
                }
                f.write_str(")")
            }
            Preload::Disabled => f.write_str("off (--no-node-preload)"),
            Preload::NotNode => f.write_str("off (the program is not Node)"),
            Preload::Failed(why) => write!(f, "off: {why}"),
        }
    }
}

const NODES: &[&str] = &["node", "nodejs"];
const WRAPPERS: &[&str] = &["npm", "npx", "yarn", "yarnpkg", "pnpm", "pnpx", "tsx"];

/// Whether `app` runs Node, and how.
pub fn detect(app: &App) -> Option<(Launch, String)> {
    let App::Program { path, argv } = app else {
        return None;
    };
    let words: Vec<&str> = argv.iter().map(String::as_str).collect();
    if let Some(found) = by_name(&words) {
        return Some(found);
    }
    // A script: its #! line names the interpreter.
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    let line = head[..n].split(|b| *b == b'\n').next()?;
    let interpreter = std::str::from_utf8(line.strip_prefix(b"#!")?).ok()?;
    let words: Vec<&str> = interpreter.split_whitespace().collect();
    let (launch, name) = by_name(&words)?;
    Some((launch, format!("{name} via #!{}", interpreter.trim())))
}

/// `words` as a command line: `node …`, `npm start`, `env [-S] [VAR=x] node …`.
fn by_name(words: &[&str]) -> Option<(Launch, String)> {
    let mut words = words.iter().copied();
    let mut program = basename(words.next()?);
    if program == "env" {
        let mut rest = words.skip_while(|w| w.contains('=') || w.starts_with('-'));
        // `env -S "node --flag"` reaches here as one word.
        program = basename(rest.next()?.split_whitespace().next()?);
    }
    let version_suffix = |name: &str, base: &str| {
        name.strip_prefix(base)
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
    };
    if NODES.contains(&program) || version_suffix(program, "node") {
        return Some((Launch::Direct, program.to_string()));
    }
    if WRAPPERS.contains(&program) {
        return Some((Launch::Wrapper, program.to_string()));
    }
    None
}

fn basename(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

/// Where the preload and the ready sockets go: `/run/reuseport-cluster-node` for root (the
/// control sockets' directory is 0700, and `--user` workers must reach this one), else the
/// user's own runtime directory (its workers are that user).
pub fn dir() -> PathBuf {
    match nix::unistd::geteuid().is_root() {
        true => PathBuf::from("/run/reuseport-cluster-node"),
        false => crate::ops::control::runtime_dir().join("node"),
    }
}

/// Writes the preload into `dir` (named by its content, so masters of different versions
/// never share a file), readable by the workers' user; returns its path.
pub fn install(dir: &Path, credentials: Option<&Credentials>) -> anyhow::Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // Someone else's directory, or one others may write to, could swap the file for code
    // every worker would run.
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        anyhow::bail!(
            "{} is not this user's, or others may write to it",
            dir.display()
        );
    }
    let path = dir.join(format!("preload-{:016x}.cjs", fnv1a(PRELOAD.as_bytes())));
    if std::fs::read(&path).ok().as_deref() != Some(PRELOAD.as_bytes()) {
        let tmp = dir.join(format!(".preload-{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(PRELOAD.as_bytes())?;
            f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            std::fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(c) = credentials {
        if let Some(blocked) = unreadable_for(&path, c) {
            anyhow::bail!(
                "user {} cannot read {} ({} is mode {:o})",
                c.user,
                path.display(),
                blocked.0.display(),
                blocked.1 & 0o7777
            );
        }
    }
    Ok(path)
}

/// The first directory on the way to `path` (or the file) that `who` may not pass (read).
fn unreadable_for(path: &Path, who: &Credentials) -> Option<(PathBuf, u32)> {
    let mut here = PathBuf::new();
    let parts: Vec<_> = path.components().collect();
    for (i, part) in parts.iter().enumerate() {
        here.push(part);
        let Ok(meta) = std::fs::metadata(&here) else {
            return Some((here, 0));
        };
        let need = if i + 1 == parts.len() { 0o4 } else { 0o1 };
        let bits = if meta.uid() == who.uid.as_raw() {
            meta.mode() >> 6
        } else if meta.gid() == who.gid.as_raw()
            || who.groups.iter().any(|g| g.as_raw() == meta.gid())
        {
            meta.mode() >> 3
        } else {
            meta.mode()
        };
        if bits & need == 0 {
            return Some((here, meta.mode()));
        }
    }
    None
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What a Node worker's environment gets, for every worker alike.
pub struct NodeEnv<'a> {
    /// The preload file.
    pub path: &'a Path,
    /// Direct or wrapper.
    pub launch: Launch,
    /// `--bind`s, in fd order.
    pub binds: &'a [Bind],
    /// `--stop-signal`, as Node names it (`SIGTERM`).
    pub stop_signal: &'a str,
    /// `--backlog`.
    pub backlog: u32,
    /// The master's ready socket (`@name`), when readiness uses notify.
    pub ready_socket: Option<&'a str>,
    /// `NODE_OPTIONS` in the master's environment.
    pub node_options: Option<&'a str>,
    /// `PORT` in the master's environment.
    pub port: Option<&'a str>,
}

/// Variables that only the preload's environment sets; never passed through.
pub const MANAGED_ENV: &[&str] = &[
    "REUSEPORT_CLUSTER_NODE_FDS",
    "REUSEPORT_CLUSTER_NODE_WRAPPER",
    "REUSEPORT_CLUSTER_NODE_OWNER",
    "REUSEPORT_CLUSTER_STOP_SIGNAL",
    "REUSEPORT_CLUSTER_BACKLOG",
    "REUSEPORT_CLUSTER_READY_SOCKET",
];

/// The `NAME=value` entries for a Node worker: NODE_OPTIONS with the preload appended, the
/// binds, and PORT (the first bind's) when the user set none, for `listen(process.env.PORT)`.
pub fn env(e: &NodeEnv) -> Vec<(String, String)> {
    let require = format!("--require \"{}\"", e.path.display());
    let options = match e.node_options.map(str::trim) {
        Some(o) if !o.is_empty() => format!("{o} {require}"),
        _ => require,
    };
    let fds: Vec<String> = e
        .binds
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{}={}", 3 + i, b.addr))
        .collect();
    let mut out = vec![
        ("NODE_OPTIONS".to_string(), options),
        ("REUSEPORT_CLUSTER_NODE_FDS".to_string(), fds.join(",")),
        (
            "REUSEPORT_CLUSTER_STOP_SIGNAL".to_string(),
            e.stop_signal.to_string(),
        ),
        (
            "REUSEPORT_CLUSTER_BACKLOG".to_string(),
            e.backlog.to_string(),
        ),
    ];
    if e.launch == Launch::Wrapper {
        out.push(("REUSEPORT_CLUSTER_NODE_WRAPPER".into(), "1".into()));
    }
    if let Some(r) = e.ready_socket {
        out.push(("REUSEPORT_CLUSTER_READY_SOCKET".into(), r.to_string()));
    }
    match (e.port, e.binds.first()) {
        (Some(p), _) => out.push(("PORT".into(), p.to_string())),
        (None, Some(b)) => out.push(("PORT".into(), b.addr.port().to_string())),
        (None, None) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(argv: &[&str], path: &Path) -> App {
        App::Program {
            path: path.to_path_buf(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn node_is_recognised_by_name_by_wrapper_and_by_shebang() {
        let none = Path::new("/nonexistent");
        let d = |argv: &[&str]| detect(&program(argv, none)).map(|(l, _)| l);
        assert_eq!(d(&["node", "app.js"]), Some(Launch::Direct));
        assert_eq!(d(&["/usr/bin/nodejs", "app.js"]), Some(Launch::Direct));
        assert_eq!(d(&["node22", "app.js"]), Some(Launch::Direct));
        assert_eq!(
            d(&["env", "NODE_ENV=production", "node", "app.js"]),
            Some(Launch::Direct)
        );
        assert_eq!(d(&["npm", "start"]), Some(Launch::Wrapper));
        assert_eq!(
            d(&["./node_modules/.bin/tsx", "server.ts"]),
            Some(Launch::Wrapper)
        );
        assert_eq!(d(&["yarn", "start"]), Some(Launch::Wrapper));
        // Control: not Node.
        assert_eq!(d(&["python3", "app.py"]), None);
        assert_eq!(d(&["nodemon-like"]), None);
        assert_eq!(d(&["env", "python3"]), None);
        assert_eq!(detect(&App::Demo), None);

        let dir = std::env::temp_dir().join(format!("rc-node-detect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("server");
        std::fs::write(&script, "#!/usr/bin/env node\nconsole.log(1)\n").unwrap();
        assert_eq!(
            detect(&program(&["./server"], &script)).map(|(l, _)| l),
            Some(Launch::Direct)
        );
        std::fs::write(&script, "#!/usr/bin/env -S node --max-old-space-size=100\n").unwrap();
        assert_eq!(
            detect(&program(&["./server"], &script)).map(|(l, _)| l),
            Some(Launch::Direct)
        );
        std::fs::write(&script, "#!/bin/sh\nexec node app.js\n").unwrap();
        assert_eq!(detect(&program(&["./server"], &script)), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn node_options_keep_the_users_and_port_defaults_to_the_first_bind() {
        let binds = vec![
            Bind {
                name: "bind0".into(),
                addr: "127.0.0.1:8000".parse().unwrap(),
            },
            Bind {
                name: "bind1".into(),
                addr: "[::1]:9000".parse().unwrap(),
            },
        ];
        let e = NodeEnv {
            path: Path::new("/run/x/preload.cjs"),
            launch: Launch::Wrapper,
            binds: &binds,
            stop_signal: "SIGTERM",
            backlog: 1024,
            ready_socket: Some("@rc/ready"),
            node_options: Some("--max-old-space-size=512"),
            port: None,
        };
        let got: std::collections::HashMap<_, _> = env(&e).into_iter().collect();
        assert_eq!(
            got["NODE_OPTIONS"],
            "--max-old-space-size=512 --require \"/run/x/preload.cjs\""
        );
        assert_eq!(
            got["REUSEPORT_CLUSTER_NODE_FDS"],
            "3=127.0.0.1:8000,4=[::1]:9000"
        );
        assert_eq!(got["REUSEPORT_CLUSTER_NODE_WRAPPER"], "1");
        assert_eq!(got["PORT"], "8000");
        let own_port = NodeEnv {
            port: Some("9000"),
            node_options: None,
            launch: Launch::Direct,
            ..e
        };
        let got: std::collections::HashMap<_, _> = env(&own_port).into_iter().collect();
        assert_eq!(got["PORT"], "9000");
        assert_eq!(got["NODE_OPTIONS"], "--require \"/run/x/preload.cjs\"");
        assert!(!got.contains_key("REUSEPORT_CLUSTER_NODE_WRAPPER"));
    }

    #[test]
    fn the_preload_is_written_once_by_content_and_others_may_not_write_its_directory() {
        let dir = std::env::temp_dir().join(format!("rc-node-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = install(&dir.join("node"), None).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), PRELOAD);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
        // A tampered file is replaced.
        std::fs::write(&path, "evil()").unwrap();
        assert_eq!(install(&dir.join("node"), None).unwrap(), path);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), PRELOAD);
        // Control: a directory others may write to is refused.
        std::fs::set_permissions(dir.join("node"), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(install(&dir.join("node"), None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
