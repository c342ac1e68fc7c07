//! Raw command-line flags, as clap parses them.
//!
//! Nothing here is validated beyond its syntax: `config.rs` turns these flags into a
//! resolved [`crate::config::Config`] and words every error itself, so that bad input always
//! gets one actionable line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Run N copies of a server behind one port, each worker with its own SO_REUSEPORT socket.
#[derive(Debug, Parser)]
#[command(
    name = "reuseport-cluster",
    version,
    about = "Run N copies of a server behind one port: each worker opens its own SO_REUSEPORT \
             socket, is pinned to one CPU and gets the socket as LISTEN_FDS (fd 3); the kernel \
             spreads the connections, the master only supervises.",
    after_help = "Without --cmd and without `-- PROGRAM ARGS`, every worker runs the built-in demo \
                  HTTP app.\n\nExit codes: 0 stopped cleanly; 1 start-up or runtime failure; \
                  2 invalid command line; 3 stopped, but some worker had to be SIGKILLed.\n\n\
                  Exit codes of reload, scale and stop: 0 done; 1 refused, or no cluster to talk \
                  to; 3 (stop) stopped, but some worker had to be SIGKILLed; 4 (reload) the new \
                  generation was rolled back, or (scale) a new worker failed to start; 5 \
                  --timeout passed first.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

/// Sub-commands; the default (none) runs the launcher.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a running cluster: every worker's pid, CPU, generation, state and accept queue
    Status {
        /// One JSON document instead of text
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Roll every worker over to a new generation (like SIGHUP) and wait for the outcome:
    /// exit 0 once the new generation serves every slot, 4 when it was rolled back
    Reload {
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Grow or shrink a running cluster: N workers, or +N / -N relative to now (at least 1
    /// remains), and wait until they are ready
    Scale {
        /// The number of workers: N, +N or -N
        #[arg(allow_hyphen_values = true, value_name = "N|+N|-N")]
        n: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Stop a running cluster gracefully (like SIGTERM) and exit as the master does: 0 when
    /// every worker stopped in time, 3 when some had to be SIGKILLed
    Stop {
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Check this host for what the launcher needs (kernel, sysctls, limits, CPUs, ports)
    Doctor {
        /// Addresses to check, as for the launcher
        #[arg(long = "bind", value_name = "[NAME=]ADDR")]
        binds: Vec<String>,
        /// Workers planned [default: the CPUs this process may run on]
        #[arg(long, value_name = "N")]
        workers: Option<usize>,
        /// listen() backlog planned
        #[arg(long, value_name = "N", default_value_t = 1024)]
        backlog: u32,
        /// Connections the cluster should hold at once (for the open-files limit)
        #[arg(long, value_name = "N", default_value_t = 10_000)]
        connections: u64,
    },
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (one per command) into DIR (packaging; internal).
    #[command(name = "__man", hide = true)]
    Man {
        /// Where to write reuseport-cluster.1, reuseport-cluster-status.1, ...
        dir: PathBuf,
    },
    /// The built-in demo app, as a worker process runs it (internal).
    #[command(name = "__demo-worker", hide = true)]
    DemoWorker,
}

/// Whether a client command waits for its outcome.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Return as soon as the master has taken the request, without waiting for the outcome
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this long (exit 5; the operation goes on in the master)
    /// [default: wait until the outcome]
    #[arg(long, value_name = "DURATION", conflicts_with = "no_wait")]
    pub timeout: Option<String>,
}

/// Which running cluster a client command talks to.
#[derive(Debug, Args)]
pub struct Target {
    /// The cluster's --name [default: the only cluster running]
    #[arg(long)]
    pub name: Option<String>,
    /// The cluster's control socket (overrides --name)
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// Flags of the launcher itself.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address every worker listens on, as [NAME=]HOST:PORT: 0.0.0.0:8000, [::]:8000,
    /// localhost:8000, http=127.0.0.1:8000. Repeat for more sockets: they are fds 3, 4, … in
    /// the order given. Port 0 picks one free port, the same for every worker.
    #[arg(long = "bind", value_name = "[NAME=]ADDR", required = true)]
    pub binds: Vec<String>,

    /// Number of workers [default: the CPUs this process may run on, from its affinity mask
    /// and cgroup CPU quota]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// CPUs to pin workers to, e.g. 0-3,6: worker i runs on the i-th CPU of the list,
    /// wrapping around [default: every CPU in this process's affinity mask]
    #[arg(long, value_name = "LIST", conflicts_with = "no_pin")]
    pub cpus: Option<String>,

    /// Do not pin workers to CPUs
    #[arg(long)]
    pub no_pin: bool,

    /// listen() backlog of each socket (the kernel caps it at net.core.somaxconn)
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub backlog: u32,

    /// Open-files limit (RLIMIT_NOFILE) of the master and its workers [default: the hard limit]
    #[arg(long, value_name = "N")]
    pub nofile: Option<u64>,

    /// Start even when another process (another cluster, a stray app) already listens on a
    /// bound address with SO_REUSEPORT, and share the connections with it [default: refuse,
    /// naming that process]
    #[arg(long)]
    pub share_port: bool,

    /// Leave Nagle's algorithm on: by default the listening sockets get TCP_NODELAY, which
    /// every accepted connection inherits (an app that never sets it, like uvicorn on fd 3,
    /// otherwise waits ~40 ms on delayed ACKs between keep-alive requests)
    #[arg(long)]
    pub no_nodelay: bool,

    /// TCP_DEFER_ACCEPT: wake the app for a connection only once its first data arrived,
    /// waiting up to DURATION (whole seconds), like systemd's DeferAcceptSec=
    #[arg(long, value_name = "DURATION")]
    pub defer_accept: Option<String>,

    /// TCP_FASTOPEN with a queue of N pending Fast Open requests, like nginx's fastopen=N
    #[arg(long, value_name = "N")]
    pub fastopen: Option<u32>,

    /// SO_KEEPALIVE on every accepted connection; optionally IDLE:INTERVAL:COUNT as nginx's
    /// so_keepalive (e.g. 60s:10s:5; an empty part keeps the kernel's default)
    #[arg(
        long,
        value_name = "IDLE:INTERVAL:COUNT",
        num_args = 0..=1,
        default_missing_value = "on",
        require_equals = false
    )]
    pub keepalive: Option<String>,

    /// How long a worker may take to exit after the stop signal before it is SIGKILLed
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub grace: String,

    /// Signal that asks a worker to stop (sent to its whole process group)
    #[arg(long, value_name = "SIG", default_value = "TERM")]
    pub stop_signal: String,

    /// When a new worker counts as ready: notify (it sends READY=1 to NOTIFY_SOCKET),
    /// listening (a process of its group waits for connections on its socket), delay:DURATION,
    /// or auto (the first of notify and listening)
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub ready: String,

    /// How long a new worker may take to become ready; in a rolling restart, a worker that
    /// is not ready by then fails the restart
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub ready_timeout: String,

    /// A worker that dies before it is ready, or within DURATION of becoming ready, counts
    /// toward its slot's crash loop (restart delays 100 ms doubling to 30 s); one that served
    /// longer is restarted in 100 ms, whatever killed it. 1s, as PM2's min_uptime: an app
    /// that crashes once it serves does so on its first requests, and a worker killed after
    /// serving a second (the OOM killer, kill -9) is a death, not a crash loop
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub min_uptime: String,

    /// Slots replaced at once in a rolling restart (SIGHUP)
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub rolling_batch: usize,

    /// net.ipv4.tcp_migrate_req, which moves the connections queued on a stopping worker's
    /// socket to the other workers instead of resetting them: auto sets it when it may and
    /// warns when it may not; on refuses to start without it; off leaves it alone
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = Migrate::Auto)]
    pub migrate: Migrate,

    /// Recycle a worker whose memory (the PSS of its whole process tree) stays above SIZE,
    /// e.g. 512M or 2G: a surge replacement, nothing is dropped [default: off]
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,

    /// Recycle a worker older than DURATION, plus up to 10 % of its own so that slots do not
    /// recycle together [default: off]
    #[arg(long, value_name = "DURATION")]
    pub max_lifetime: Option<String>,

    /// Replace a worker that accepted none of the connections queued on its socket for
    /// DURATION while stopped or using no CPU (a busy or overloaded worker is left alone);
    /// 10s is a sane value [default: off]
    #[arg(long, value_name = "DURATION")]
    pub hung_after: Option<String>,

    /// Who picks the worker for a new connection: bpf attaches an SK_REUSEPORT program
    /// (needs root or CAP_BPF+CAP_NET_ADMIN, Linux 5.14+) that sends connections round robin
    /// to the workers that accept, drains a worker's socket before it is stopped, and moves
    /// what is left on it when it closes; hash is the kernel's SO_REUSEPORT hash; auto uses
    /// bpf when this host allows it and says why not otherwise
    #[arg(long, value_name = "MODE", value_enum, default_value_t = Steer::Auto)]
    pub steer: Steer,

    /// Pass workers' stdout and stderr through the master, each line prefixed with
    /// `[w<slot> <pid>] ` [default: workers write straight to the master's stdout/stderr]
    #[arg(long)]
    pub log_prefix: bool,

    /// Format of the master's own log lines on stderr
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve Prometheus metrics at http://ADDR/metrics from the master (e.g. 127.0.0.1:9100)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Run workers as this user: each worker binds its sockets as the master's user (so a
    /// root master can bind port 80, and all sockets join one reuseport group), then drops
    /// to the user (supplementary groups, group, user) before exec
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// Run workers with this group [default: the --user's primary group]
    #[arg(long, value_name = "NAME", requires = "user")]
    pub group: Option<String>,

    /// The cluster's name, for the control socket and client commands [default: the first
    /// bind's port]
    #[arg(long)]
    pub name: Option<String>,

    /// The control socket [default: /run/reuseport-cluster/NAME.sock for root, else
    /// $XDG_RUNTIME_DIR/reuseport-cluster/NAME.sock]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Leave Node apps as they are: no preload mapping listen(PORT) to the worker's socket,
    /// no cluster-module worker, no drain on the stop signal. The preload is on only when the
    /// program is Node (node, a #!...node script, npm, npx, yarn, pnpm, tsx)
    #[arg(long)]
    pub no_node_preload: bool,

    /// The app: "PROGRAM ARGS", split into words like a shell would (no shell is started).
    /// PROGRAM is looked up in PATH once, at start-up. [default: the built-in demo app]
    #[arg(long, value_name = "\"PROGRAM ARGS\"", conflicts_with = "program")]
    pub cmd: Option<String>,

    /// The app, as separate words after `--`
    #[arg(last = true, value_name = "PROGRAM ARGS")]
    pub program: Vec<String>,
}

/// What to do about net.ipv4.tcp_migrate_req.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Migrate {
    /// Set it to 1 when it is 0 and we may; warn when we may not.
    Auto,
    /// Set it to 1, or refuse to start.
    On,
    /// Leave it alone.
    Off,
}

/// Who picks the worker of a new connection (`--steer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Steer {
    /// bpf when this host allows it, else hash (one log line says why).
    Auto,
    /// The SK_REUSEPORT program, or refuse to start.
    Bpf,
    /// The kernel's hash, as without the program.
    Hash,
}

/// How the master writes its own log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line of text.
    Text,
    /// One JSON object per line: ts, level, msg, and slot, pid, generation for a worker.
    Json,
}

/// One actionable line for the command-line mistakes clap words generically: a program
/// given without `--`, and an unquoted `--cmd`. None: clap's own message is right.
pub fn hint(error: &clap::Error, args: &[String]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if error.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    // Without --bind it is rather a mistyped sub-command, which clap words well.
    let launching = args
        .iter()
        .any(|a| a == "--bind" || a.starts_with("--bind="));
    if arg.starts_with('-') || !launching {
        return None;
    }
    let at = args.iter().position(|a| a == arg)?;
    let cmd_before = at >= 2 && args[at - 2] == "--cmd";
    let example = args[at.saturating_sub(1)..].join(" ");
    Some(match cmd_before {
        true => format!(
            "unexpected argument {arg:?}: --cmd takes the whole command as one argument; \
             quote it: --cmd \"{example}\", or put the program after `--`: -- {example}"
        ),
        false => format!(
            "unexpected argument {arg:?}: to run a program, put it after `--` (reuseport-cluster \
             --bind ADDR -- {rest}) or quote it in --cmd \"{rest}\"",
            rest = args[at..].join(" ")
        ),
    })
}
