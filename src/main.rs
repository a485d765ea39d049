//! lunmirror command line: `serve` runs the daemon; client subcommands talk
//! to a running daemon's control socket. Wiring only: the work is in
//! `lunmirror::daemon` and the modules it calls.
//!
//! Exit codes: 0 clean stop, 1 runtime failure, 2 configuration or usage
//! error (clap uses 2 for usage errors too).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lunmirror::config::{self, Config, Engine, Overrides};
use lunmirror::daemon::{self, DaemonError};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "lunmirror",
    version,
    about = "Userspace iSCSI block service with write mirroring"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve LUNs over iSCSI (and TCMU when the kernel offers it) until
    /// SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Client subcommands talking to a running daemon's control socket.
    #[command(flatten)]
    Client(lunmirror::control::cli::ClientCommand),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML config file (see docs/configuration.md). Without it, one target
    /// `iqn.2026-11.io.lunmirror:default` serves LUN 0 = volume `lun0`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (volumes, lock file, control socket). Overrides
    /// `daemon.state_dir`; default ./lunmirror-state.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Portal to listen on, e.g. 127.0.0.1:3260 or [::1]:3260; repeatable.
    /// Replaces the portals of every target. Port 0 picks a free port.
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// Size of LUNs that have no `size` key (the default LUN included):
    /// bytes, or with a binary suffix K, M, G, T (e.g. 1G).
    #[arg(long, value_name = "BYTES", value_parser = config::parse_size)]
    size: Option<u64>,
    /// I/O engine of file backstores: auto, io-uring or sync.
    #[arg(long, value_name = "ENGINE", value_parser = parse_engine)]
    engine: Option<Engine>,
    /// Control socket path. Overrides `daemon.control_socket`; default
    /// <state-dir>/control.sock.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

fn parse_engine(s: &str) -> Result<Engine, String> {
    s.parse()
}

fn main() -> ExitCode {
    // Before any thread exists, so every thread inherits the mask and only
    // the signal thread sees SIGTERM/SIGINT.
    let signals = match daemon::block_shutdown_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lunmirror: cannot block signals: {e}");
            return ExitCode::from(1);
        }
    };
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args, signals),
        Command::Client(cmd) => {
            let code = lunmirror::control::cli::run(&cmd);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}

fn serve(args: ServeArgs, signals: nix::sys::signal::SigSet) -> ExitCode {
    let ov = Overrides {
        state_dir: args.state_dir,
        listen: args.listen,
        size: args.size,
        engine: args.engine,
        control_socket: args.control_socket,
    };
    let cfg = match &args.config {
        Some(path) => Config::load(path, &ov),
        None => Config::default_with(&ov),
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => return fail(&DaemonError::Config(e)),
    };
    init_logging(cfg.daemon.log_level.as_deref());
    let mut stdout = std::io::stdout();
    match daemon::serve(cfg, signals, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &DaemonError) -> ExitCode {
    eprintln!("lunmirror: error: {e}");
    ExitCode::from(e.exit_code())
}

/// Logs go to stderr (stdout carries the `listening on` lines). `RUST_LOG`
/// wins over the config's `log_level`; default `info`.
fn init_logging(config_level: Option<&str>) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v).unwrap_or_else(|e| {
            eprintln!("lunmirror: ignoring invalid RUST_LOG={v:?}: {e}");
            EnvFilter::new("info")
        }),
        _ => EnvFilter::try_new(config_level.unwrap_or("info"))
            .unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
