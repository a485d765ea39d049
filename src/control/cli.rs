//! CLI client subcommands (clap `Args` + `run_*`), wired into the binary's
//! subcommands by `main.rs`: `attach-replica`, `replicas`, `jobs`,
//! `detach-replica`, `modify-replica`. Each `run_*` takes the control
//! socket path and returns the process exit code.
//!
//! Exit codes: 0 success; 1 the server refused or the job failed; 2 the
//! control socket could not be used.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::client::{Client, ClientError};
use super::protocol::{copy_type_name, return_value_name, MethodReply};
use crate::jobs::JobInfo;

/// The daemon's default state directory (relative to the working
/// directory; the same default as the daemon's configuration).
pub const DEFAULT_STATE_DIR: &str = "lunmirror-state";

/// How a client subcommand finds the daemon's control socket.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SocketArgs {
    /// Control socket of the daemon [default: <state-dir>/control.sock].
    #[arg(long, value_name = "PATH", env = "LUNMIRROR_CONTROL_SOCKET")]
    pub control_socket: Option<PathBuf>,
    /// State directory of the daemon [default: ./lunmirror-state].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl SocketArgs {
    /// The socket path to connect to.
    pub fn path(&self) -> PathBuf {
        match (&self.control_socket, &self.state_dir) {
            (Some(p), _) => p.clone(),
            (None, Some(d)) => d.join("control.sock"),
            (None, None) => Path::new(DEFAULT_STATE_DIR).join("control.sock"),
        }
    }
}

/// All client subcommands, ready to be flattened into the binary's
/// subcommand enum (`#[command(flatten)] Client(ClientCommand)`) and run
/// with [`run`].
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ClientCommand {
    /// Attach a replica to a volume (AttachReplica).
    AttachReplica {
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        args: AttachReplicaArgs,
    },
    /// List replication associations (EnumerateSynchronized).
    Replicas {
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        args: ReplicasArgs,
    },
    /// List jobs, show or terminate one.
    Jobs {
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        args: JobsArgs,
    },
    /// Detach a replica (ModifySynchronization Detach).
    DetachReplica {
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        args: DetachReplicaArgs,
    },
    /// Fracture, resync, restore or switch Sync/Async (ModifySynchronization).
    ModifyReplica {
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        args: ModifyReplicaArgs,
    },
}

/// Run a client subcommand; returns the process exit code.
pub fn run(cmd: &ClientCommand) -> i32 {
    match cmd {
        ClientCommand::AttachReplica { socket, args } => run_attach_replica(&socket.path(), args),
        ClientCommand::Replicas { socket, args } => run_replicas(&socket.path(), args),
        ClientCommand::Jobs { socket, args } => run_jobs(&socket.path(), args),
        ClientCommand::DetachReplica { socket, args } => run_detach_replica(&socket.path(), args),
        ClientCommand::ModifyReplica { socket, args } => run_modify_replica(&socket.path(), args),
    }
}

/// `--copy-type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CopyTypeArg {
    Async,
    Sync,
    UnsyncAssoc,
    UnsyncUnassoc,
}

impl CopyTypeArg {
    pub fn cim(self) -> u16 {
        match self {
            CopyTypeArg::Async => 2,
            CopyTypeArg::Sync => 3,
            CopyTypeArg::UnsyncAssoc => 4,
            CopyTypeArg::UnsyncUnassoc => 5,
        }
    }
}

/// `lunmirror attach-replica`.
#[derive(Debug, Clone, clap::Args)]
pub struct AttachReplicaArgs {
    /// Source volume name (e.g. lun0).
    #[arg(long)]
    pub source: String,
    /// Replica: an absolute path of an existing file/block device at least
    /// as large as the source, or a registered volume name.
    #[arg(long)]
    pub target: String,
    #[arg(long, value_enum)]
    pub copy_type: CopyTypeArg,
    /// Wait for the copy job to finish (progress bar on a terminal).
    #[arg(long)]
    pub wait: bool,
    /// Print the raw JSON result.
    #[arg(long)]
    pub json: bool,
}

/// `lunmirror replicas`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReplicasArgs {
    #[arg(long)]
    pub json: bool,
}

/// `lunmirror jobs`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct JobsArgs {
    /// Show only this job (lunmirror:<n>).
    pub job: Option<String>,
    /// Request Terminate of the job.
    #[arg(long, requires = "job")]
    pub terminate: bool,
    #[arg(long)]
    pub json: bool,
}

/// `lunmirror detach-replica`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["synchronization", "target"])))]
pub struct DetachReplicaArgs {
    /// Association id (lunmirror:sync:<n>).
    pub synchronization: Option<String>,
    /// Detach the association whose replica is this path or volume.
    #[arg(long)]
    pub target: Option<String>,
}

/// ModifySynchronization operations offered by `modify-replica`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OperationArg {
    Detach,
    Fracture,
    Resync,
    Restore,
    ResetToSync,
    ResetToAsync,
}

impl OperationArg {
    pub fn cim(self) -> u16 {
        match self {
            OperationArg::Detach => 2,
            OperationArg::Fracture => 3,
            OperationArg::Resync => 4,
            OperationArg::Restore => 5,
            OperationArg::ResetToSync => 10,
            OperationArg::ResetToAsync => 11,
        }
    }
}

/// `lunmirror modify-replica`.
#[derive(Debug, Clone, clap::Args)]
pub struct ModifyReplicaArgs {
    /// Association id (lunmirror:sync:<n>).
    pub synchronization: String,
    #[arg(long, value_enum)]
    pub operation: OperationArg,
    /// Wait for a started job to finish.
    #[arg(long)]
    pub wait: bool,
}

fn connect(socket: &Path) -> Result<Client, i32> {
    Client::connect(socket).map_err(|e| {
        eprintln!("lunmirror: cannot connect to {}: {e}", socket.display());
        2
    })
}

fn fail(e: ClientError) -> i32 {
    eprintln!("lunmirror: {e}");
    2
}

fn report(r: &MethodReply) -> i32 {
    match r.return_value {
        0 | 0x1000 => 0,
        v => {
            eprintln!(
                "lunmirror: ReturnValue {v} ({}){}",
                return_value_name(v),
                r.error_description
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
            1
        }
    }
}

/// Render a progress bar line (no I/O).
pub fn progress_line(job: &JobInfo, width: usize) -> String {
    let pct = usize::from(job.percent_complete.min(100));
    let filled = pct * width / 100;
    format!(
        "[{}{}] {:>3}% {} {}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        pct,
        job.instance_id,
        job.job_status
    )
}

/// Poll a job until it finishes; draws a bar on stderr when it is a tty.
fn wait_job(client: &mut Client, job: &str) -> Result<JobInfo, ClientError> {
    let tty = std::io::stderr().is_terminal();
    loop {
        let Some(info) = client.get_job(job)? else {
            return Err(ClientError::Protocol(format!("job {job} vanished")));
        };
        if tty {
            eprint!("\r{}", progress_line(&info, 40));
            let _ = std::io::stderr().flush();
        }
        if info.job_state >= crate::jobs::JobState::Completed.cim() {
            if tty {
                eprintln!();
            }
            return Ok(info);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn finish_wait(client: &mut Client, job: &str) -> i32 {
    match wait_job(client, job) {
        Ok(info) if info.job_state == crate::jobs::JobState::Completed.cim() => {
            println!("{} {}", info.instance_id, info.job_status);
            0
        }
        Ok(info) => {
            eprintln!(
                "lunmirror: {} {}{}",
                info.instance_id,
                info.job_status,
                info.error_description
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
            1
        }
        Err(e) => fail(e),
    }
}

pub fn run_attach_replica(socket: &Path, args: &AttachReplicaArgs) -> i32 {
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let r = match c.attach_replica(&args.source, &args.target, args.copy_type.cim()) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if args.json {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
    } else if r.return_value == 0 || r.return_value == 0x1000 {
        println!(
            "{} {}",
            r.synchronization.as_deref().unwrap_or("-"),
            r.job.as_deref().unwrap_or("(no job)")
        );
    }
    let code = report(&r);
    match (&r.job, args.wait, code) {
        (Some(job), true, 0) => finish_wait(&mut c, job),
        _ => code,
    }
}

pub fn run_replicas(socket: &Path, args: &ReplicasArgs) -> i32 {
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let list = match c.enumerate_synchronized() {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return 0;
    }
    println!(
        "{:<20} {:<10} {:<30} {:<13} {:<20} {:>5} {:>10}",
        "SYNCHRONIZATION", "SOURCE", "TARGET", "COPYTYPE", "STATE", "SYNC%", "LAG"
    );
    for s in list {
        let lag = match (s.journal_pending_records, s.journal_pending_bytes) {
            (Some(r), Some(b)) => format!("{r}r/{b}B"),
            _ => "-".into(),
        };
        println!(
            "{:<20} {:<10} {:<30} {:<13} {:<20} {:>5} {:>10}",
            s.synchronization,
            s.system_element,
            s.synced_element,
            copy_type_name(s.copy_type),
            s.sync_state_description,
            s.percent_synced,
            lag
        );
        if let Some(e) = s.error_description {
            println!("    error: {e}");
        }
    }
    0
}

pub fn run_jobs(socket: &Path, args: &JobsArgs) -> i32 {
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let (true, Some(job)) = (args.terminate, &args.job) {
        return match c.request_job_state_change(job, 4) {
            Ok(0) => 0,
            Ok(v) => {
                eprintln!("lunmirror: ReturnValue {v} ({})", return_value_name(v));
                1
            }
            Err(e) => fail(e),
        };
    }
    let jobs = match &args.job {
        Some(j) => match c.get_job(j) {
            Ok(Some(info)) => vec![info],
            Ok(None) => {
                eprintln!("lunmirror: unknown job {j}");
                return 1;
            }
            Err(e) => return fail(e),
        },
        None => match c.enumerate_jobs() {
            Ok(l) => l,
            Err(e) => return fail(e),
        },
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&jobs).unwrap_or_default()
        );
        return 0;
    }
    println!(
        "{:<14} {:<14} {:<12} {:>4} {:<26} ERROR",
        "JOB", "NAME", "STATE", "PCT", "ELAPSED"
    );
    for j in jobs {
        println!(
            "{:<14} {:<14} {:<12} {:>4} {:<26} {}",
            j.instance_id,
            j.name,
            j.job_status,
            j.percent_complete,
            j.elapsed_time.unwrap_or_else(|| "-".into()),
            j.error_description.unwrap_or_default()
        );
    }
    0
}

pub fn run_detach_replica(socket: &Path, args: &DetachReplicaArgs) -> i32 {
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let sync = match (&args.synchronization, &args.target) {
        (Some(s), _) => s.clone(),
        (None, Some(t)) => {
            let list = match c.enumerate_synchronized() {
                Ok(l) => l,
                Err(e) => return fail(e),
            };
            match list.into_iter().find(|s| &s.synced_element == t) {
                Some(s) => s.synchronization,
                None => {
                    eprintln!("lunmirror: no association with target {t}");
                    return 1;
                }
            }
        }
        (None, None) => {
            eprintln!("lunmirror: give a synchronization id or --target");
            return 2;
        }
    };
    match c.modify_synchronization(2, &sync) {
        Ok(r) => report(&r),
        Err(e) => fail(e),
    }
}

pub fn run_modify_replica(socket: &Path, args: &ModifyReplicaArgs) -> i32 {
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let r = match c.modify_synchronization(args.operation.cim(), &args.synchronization) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let code = report(&r);
    match (&r.job, args.wait, code) {
        (Some(job), true, 0) => finish_wait(&mut c, job),
        (Some(job), false, 0) => {
            println!("{job}");
            0
        }
        _ => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct T {
        #[command(subcommand)]
        cmd: Cmd,
    }

    /// The way main.rs wires it: the client commands flattened next to the
    /// daemon's own.
    #[derive(Debug, clap::Parser)]
    struct Main {
        #[command(subcommand)]
        cmd: MainCmd,
    }

    #[derive(Debug, clap::Subcommand)]
    enum MainCmd {
        Serve,
        #[command(flatten)]
        Client(ClientCommand),
    }

    #[test]
    fn client_commands_flatten_into_the_binary() {
        let m = Main::try_parse_from([
            "lunmirror",
            "attach-replica",
            "--state-dir",
            "/var/lib/lm",
            "--source",
            "lun0",
            "--target",
            "/r",
            "--copy-type",
            "async",
        ])
        .unwrap();
        match m.cmd {
            MainCmd::Client(ClientCommand::AttachReplica { socket, args }) => {
                assert_eq!(socket.path(), Path::new("/var/lib/lm/control.sock"));
                assert_eq!(args.copy_type.cim(), 2);
            }
            other => panic!("{other:?}"),
        }
        let m =
            Main::try_parse_from(["lunmirror", "replicas", "--control-socket", "/s.sock"]).unwrap();
        match m.cmd {
            MainCmd::Client(ClientCommand::Replicas { socket, .. }) => {
                assert_eq!(socket.path(), Path::new("/s.sock"))
            }
            other => panic!("{other:?}"),
        }
        assert!(Main::try_parse_from(["lunmirror", "serve"]).is_ok());
        assert!(Main::try_parse_from([
            "lunmirror",
            "modify-replica",
            "lunmirror:sync:1",
            "--operation",
            "resync"
        ])
        .is_ok());
        assert_eq!(
            SocketArgs::default().path(),
            Path::new("lunmirror-state/control.sock")
        );
    }

    #[derive(Debug, clap::Subcommand)]
    enum Cmd {
        AttachReplica(AttachReplicaArgs),
        DetachReplica(DetachReplicaArgs),
        Jobs(JobsArgs),
    }

    #[test]
    fn args_parse_as_documented() {
        let t = T::try_parse_from([
            "x",
            "attach-replica",
            "--source",
            "lun0",
            "--target",
            "/srv/r.img",
            "--copy-type",
            "unsync-assoc",
            "--wait",
        ])
        .unwrap();
        match t.cmd {
            Cmd::AttachReplica(a) => {
                assert_eq!(a.copy_type.cim(), 4);
                assert!(a.wait);
            }
            other => panic!("{other:?}"),
        }
        assert!(T::try_parse_from([
            "x",
            "attach-replica",
            "--source",
            "a",
            "--target",
            "b",
            "--copy-type",
            "mirror"
        ])
        .is_err());
        assert!(T::try_parse_from(["x", "detach-replica"]).is_err());
        assert!(T::try_parse_from(["x", "detach-replica", "lunmirror:sync:1"]).is_ok());
        assert!(T::try_parse_from(["x", "jobs", "--terminate"]).is_err());
    }

    #[test]
    fn progress_bar_renders() {
        let info = JobInfo {
            instance_id: "lunmirror:1".into(),
            name: "AttachReplica".into(),
            description: String::new(),
            job_state: 4,
            job_status: "Running".into(),
            percent_complete: 50,
            error_code: 0,
            error_description: None,
            time_submitted: String::new(),
            start_time: None,
            elapsed_time: None,
            time_of_last_state_change: String::new(),
            time_before_removal: String::new(),
            delete_on_completion: true,
            synchronization: None,
        };
        assert_eq!(
            progress_line(&info, 10),
            "[#####.....]  50% lunmirror:1 Running"
        );
    }
}
