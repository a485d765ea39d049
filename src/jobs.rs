//! Background jobs as CIM_ConcreteJob: a table of jobs with their state,
//! progress and errors, the controls a client can request
//! (RequestStateChange), and the CIM method return codes and datetime
//! formats used on the control socket.
//!
//! Job ids are `lunmirror:<n>`, `n` increasing over the life of the state
//! directory. Finished jobs stay visible for `TimeBeforeRemoval`.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Return values of the CIM methods (AttachReplica, ModifySynchronization,
/// RequestStateChange).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnValue {
    /// 0: completed with no error (and no job).
    Completed,
    /// 1: not supported.
    NotSupported,
    /// 2: unknown / unspecified error.
    Unspecified,
    /// 3: timeout.
    Timeout,
    /// 4: failed.
    Failed,
    /// 5: invalid parameter.
    InvalidParameter,
    /// 6: in use.
    InUse,
    /// 4096: parameters checked, job started.
    JobStarted,
    /// 4097: invalid state transition (RequestStateChange).
    InvalidStateTransition,
    /// 4098: use of timeout parameter not supported (RequestStateChange).
    TimeoutParameterNotSupported,
}

impl ReturnValue {
    pub fn code(self) -> u32 {
        match self {
            ReturnValue::Completed => 0,
            ReturnValue::NotSupported => 1,
            ReturnValue::Unspecified => 2,
            ReturnValue::Timeout => 3,
            ReturnValue::Failed => 4,
            ReturnValue::InvalidParameter => 5,
            ReturnValue::InUse => 6,
            ReturnValue::JobStarted => 0x1000,
            ReturnValue::InvalidStateTransition => 0x1001,
            ReturnValue::TimeoutParameterNotSupported => 0x1002,
        }
    }
}

/// CIM_ConcreteJob.JobState.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum JobState {
    New,
    Starting,
    Running,
    Suspended,
    ShuttingDown,
    Completed,
    Terminated,
    Killed,
    Exception,
}

impl JobState {
    pub fn cim(self) -> u16 {
        match self {
            JobState::New => 2,
            JobState::Starting => 3,
            JobState::Running => 4,
            JobState::Suspended => 5,
            JobState::ShuttingDown => 6,
            JobState::Completed => 7,
            JobState::Terminated => 8,
            JobState::Killed => 9,
            JobState::Exception => 10,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::New => "New",
            JobState::Starting => "Starting",
            JobState::Running => "Running",
            JobState::Suspended => "Suspended",
            JobState::ShuttingDown => "Shutting Down",
            JobState::Completed => "Completed",
            JobState::Terminated => "Terminated",
            JobState::Killed => "Killed",
            JobState::Exception => "Exception",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Terminated | JobState::Killed | JobState::Exception
        )
    }
}

/// What a client asked the job to do (checked by the job's thread between
/// steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobRequest {
    #[default]
    None,
    Suspend,
    Terminate,
    Kill,
}

/// A job's control channel.
#[derive(Debug, Default)]
pub struct JobControl {
    req: Mutex<JobRequest>,
    cond: Condvar,
}

impl JobControl {
    fn locked(&self) -> MutexGuard<'_, JobRequest> {
        self.req.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn request(&self, r: JobRequest) {
        *self.locked() = r;
        self.cond.notify_all();
    }

    pub fn current(&self) -> JobRequest {
        *self.locked()
    }

    /// Block while suspended (or until `timeout`); returns the request then
    /// in force.
    pub fn wait_while_suspended(&self, timeout: Duration) -> JobRequest {
        let g = self.locked();
        let (g, _) = self
            .cond
            .wait_timeout_while(g, timeout, |r| *r == JobRequest::Suspend)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Civil date from days since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// CIM datetime timestamp in UTC: `yyyymmddhhmmss.mmmmmm+000`.
pub fn cim_datetime(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (y, mo, day) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}{mo:02}{day:02}{:02}{:02}{:02}.{:06}+000",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_micros()
    )
}

/// CIM datetime interval: `ddddddddhhmmss.mmmmmm:000`.
pub fn cim_interval(d: Duration) -> String {
    let s = d.as_secs();
    format!(
        "{:08}{:02}{:02}{:02}.{:06}:000",
        s / 86_400,
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        d.subsec_micros()
    )
}

/// Format a job id.
pub fn job_instance_id(n: u64) -> String {
    format!("lunmirror:{n}")
}

/// Parse `lunmirror:<n>`.
pub fn parse_job_id(s: &str) -> Option<u64> {
    s.strip_prefix("lunmirror:")?.parse().ok()
}

/// A job as reported on the control socket (CIM_ConcreteJob names).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct JobInfo {
    #[serde(rename = "InstanceID")]
    pub instance_id: String,
    pub name: String,
    pub description: String,
    pub job_state: u16,
    pub job_status: String,
    pub percent_complete: u16,
    pub error_code: u16,
    pub error_description: Option<String>,
    pub time_submitted: String,
    pub start_time: Option<String>,
    pub elapsed_time: Option<String>,
    pub time_of_last_state_change: String,
    pub time_before_removal: String,
    pub delete_on_completion: bool,
    /// The association this job works on (`lunmirror:sync:<n>`).
    pub synchronization: Option<String>,
}

/// A job's persisted form.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedJob {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub state: JobState,
    pub percent: u16,
    pub error_code: u16,
    pub error_description: Option<String>,
    pub submitted_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub changed_ms: u64,
    pub synchronization: Option<u64>,
}

#[derive(Debug)]
struct Job {
    saved: SavedJob,
    control: std::sync::Arc<JobControl>,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: BTreeMap<u64, Job>,
    next_id: u64,
}

/// The job table.
#[derive(Debug)]
pub struct JobTable {
    inner: Mutex<Inner>,
    retention: Duration,
}

impl JobTable {
    /// An empty table; finished jobs are kept for `retention`.
    pub fn new(retention: Duration) -> Self {
        JobTable {
            inner: Mutex::new(Inner {
                jobs: BTreeMap::new(),
                next_id: 1,
            }),
            retention,
        }
    }

    fn locked(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Load persisted jobs (at startup).
    pub fn restore(&self, saved: Vec<SavedJob>, next_id: u64) {
        let mut g = self.locked();
        for s in saved {
            g.next_id = g.next_id.max(s.id + 1);
            g.jobs.insert(
                s.id,
                Job {
                    saved: s,
                    control: Default::default(),
                },
            );
        }
        g.next_id = g.next_id.max(next_id);
    }

    pub fn next_id(&self) -> u64 {
        self.locked().next_id
    }

    /// Register a new job (state New).
    pub fn create(
        &self,
        name: &str,
        description: &str,
        synchronization: Option<u64>,
    ) -> (u64, std::sync::Arc<JobControl>) {
        let now = unix_ms(SystemTime::now());
        let mut g = self.locked();
        let id = g.next_id;
        g.next_id += 1;
        let control = std::sync::Arc::new(JobControl::default());
        g.jobs.insert(
            id,
            Job {
                saved: SavedJob {
                    id,
                    name: name.to_string(),
                    description: description.to_string(),
                    state: JobState::New,
                    percent: 0,
                    error_code: 0,
                    error_description: None,
                    submitted_ms: now,
                    started_ms: None,
                    finished_ms: None,
                    changed_ms: now,
                    synchronization,
                },
                control: control.clone(),
            },
        );
        (id, control)
    }

    /// The control channel of a job (jobs restored from disk get a fresh one).
    pub fn control(&self, id: u64) -> Option<std::sync::Arc<JobControl>> {
        self.locked().jobs.get(&id).map(|j| j.control.clone())
    }

    pub fn state(&self, id: u64) -> Option<JobState> {
        self.locked().jobs.get(&id).map(|j| j.saved.state)
    }

    /// Move a job to a non-final state (Running, Suspended).
    pub fn set_state(&self, id: u64, state: JobState) {
        let now = unix_ms(SystemTime::now());
        if let Some(j) = self.locked().jobs.get_mut(&id) {
            if j.saved.state != state {
                j.saved.state = state;
                j.saved.changed_ms = now;
            }
            if state == JobState::Running && j.saved.started_ms.is_none() {
                j.saved.started_ms = Some(now);
            }
        }
    }

    pub fn set_progress(&self, id: u64, percent: u16) {
        if let Some(j) = self.locked().jobs.get_mut(&id) {
            j.saved.percent = percent.min(100);
        }
    }

    /// Finish a job.
    pub fn finish(&self, id: u64, state: JobState, error: Option<String>) {
        let now = unix_ms(SystemTime::now());
        if let Some(j) = self.locked().jobs.get_mut(&id) {
            j.saved.state = state;
            j.saved.changed_ms = now;
            j.saved.finished_ms = Some(now);
            if j.saved.started_ms.is_none() {
                j.saved.started_ms = Some(now);
            }
            if state == JobState::Completed {
                j.saved.percent = 100;
            }
            j.saved.error_code = if state == JobState::Exception { 4 } else { 0 };
            j.saved.error_description = error;
        }
    }

    fn info(&self, j: &Job, now: SystemTime) -> JobInfo {
        let s = &j.saved;
        let elapsed = s.started_ms.map(|st| {
            let end = s.finished_ms.unwrap_or_else(|| unix_ms(now));
            Duration::from_millis(end.saturating_sub(st))
        });
        JobInfo {
            instance_id: job_instance_id(s.id),
            name: s.name.clone(),
            description: s.description.clone(),
            job_state: s.state.cim(),
            job_status: s.state.name().to_string(),
            percent_complete: s.percent,
            error_code: s.error_code,
            error_description: s.error_description.clone(),
            time_submitted: cim_datetime(from_unix_ms(s.submitted_ms)),
            start_time: s.started_ms.map(|t| cim_datetime(from_unix_ms(t))),
            elapsed_time: elapsed.map(cim_interval),
            time_of_last_state_change: cim_datetime(from_unix_ms(s.changed_ms)),
            time_before_removal: cim_interval(self.retention),
            delete_on_completion: true,
            synchronization: s.synchronization.map(crate::registry::sync_instance_id),
        }
    }

    pub fn get(&self, id: u64) -> Option<JobInfo> {
        let g = self.locked();
        g.jobs.get(&id).map(|j| self.info(j, SystemTime::now()))
    }

    pub fn list(&self) -> Vec<JobInfo> {
        let now = SystemTime::now();
        let g = self.locked();
        g.jobs.values().map(|j| self.info(j, now)).collect()
    }

    /// Persisted form of jobs worth keeping.
    pub fn saved(&self) -> Vec<SavedJob> {
        self.locked()
            .jobs
            .values()
            .map(|j| j.saved.clone())
            .collect()
    }

    /// Drop finished jobs older than the retention time.
    pub fn expire(&self) -> bool {
        let now = unix_ms(SystemTime::now());
        let keep_ms = self.retention.as_millis() as u64;
        let mut g = self.locked();
        let before = g.jobs.len();
        g.jobs.retain(|_, j| {
            !(j.saved.state.is_finished()
                && j.saved
                    .finished_ms
                    .is_some_and(|f| now.saturating_sub(f) > keep_ms))
        });
        before != g.jobs.len()
    }

    /// Jobs not finished (for restart handling).
    pub fn unfinished(&self) -> Vec<u64> {
        self.locked()
            .jobs
            .values()
            .filter(|j| !j.saved.state.is_finished())
            .map(|j| j.saved.id)
            .collect()
    }

    /// CIM RequestStateChange: 2 Start, 3 Suspend, 4 Terminate, 5 Kill,
    /// 6 Service. The caller waits for Terminate/Kill to take effect.
    pub fn request_state_change(
        &self,
        id: u64,
        requested: u64,
        timeout_given: bool,
    ) -> ReturnValue {
        if timeout_given {
            return ReturnValue::TimeoutParameterNotSupported;
        }
        let g = self.locked();
        let Some(j) = g.jobs.get(&id) else {
            return ReturnValue::InvalidParameter;
        };
        let state = j.saved.state;
        let req = match requested {
            2 => JobRequest::None,
            3 => JobRequest::Suspend,
            4 => JobRequest::Terminate,
            5 => JobRequest::Kill,
            6 | 0x8000..=0xFFFF => return ReturnValue::NotSupported,
            _ => return ReturnValue::InvalidParameter,
        };
        if state.is_finished() {
            return ReturnValue::InvalidStateTransition;
        }
        if req == JobRequest::None && j.control.current() != JobRequest::Suspend {
            // Start on a job that is not suspended: already running.
            return ReturnValue::Completed;
        }
        j.control.request(req);
        ReturnValue::Completed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cim_datetime_formats() {
        assert_eq!(cim_datetime(UNIX_EPOCH), "19700101000000.000000+000");
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(cim_datetime(t), "20231114221320.123456+000");
        let leap = from_unix_ms(951_782_400_000); // 2000-02-29
        assert!(cim_datetime(leap).starts_with("20000229"));
        assert_eq!(
            cim_interval(Duration::from_millis(90_061_500)),
            "00000001010101.500000:000"
        );
    }

    #[test]
    fn return_codes_are_the_cim_values() {
        let all = [
            (ReturnValue::Completed, 0),
            (ReturnValue::NotSupported, 1),
            (ReturnValue::Unspecified, 2),
            (ReturnValue::Timeout, 3),
            (ReturnValue::Failed, 4),
            (ReturnValue::InvalidParameter, 5),
            (ReturnValue::InUse, 6),
            (ReturnValue::JobStarted, 4096),
            (ReturnValue::InvalidStateTransition, 4097),
            (ReturnValue::TimeoutParameterNotSupported, 4098),
        ];
        for (rv, code) in all {
            assert_eq!(rv.code(), code);
        }
        assert_eq!(JobState::Exception.cim(), 10);
        assert_eq!(JobState::Completed.cim(), 7);
    }

    #[test]
    fn job_lifecycle_and_requests() {
        let t = JobTable::new(Duration::from_millis(0));
        let (id, ctl) = t.create("AttachReplica", "copy", Some(3));
        assert_eq!(parse_job_id(&job_instance_id(id)), Some(id));
        let info = t.get(id).unwrap();
        assert_eq!((info.job_state, info.start_time.is_none()), (2, true));
        assert_eq!(info.synchronization.as_deref(), Some("lunmirror:sync:3"));
        t.set_state(id, JobState::Running);
        t.set_progress(id, 40);
        assert_eq!(t.get(id).unwrap().percent_complete, 40);
        assert_eq!(t.request_state_change(id, 3, false), ReturnValue::Completed);
        assert_eq!(ctl.current(), JobRequest::Suspend);
        assert_eq!(t.request_state_change(id, 2, false), ReturnValue::Completed);
        assert_eq!(ctl.current(), JobRequest::None);
        assert_eq!(
            t.request_state_change(id, 6, false),
            ReturnValue::NotSupported
        );
        assert_eq!(
            t.request_state_change(id, 0x9000, false),
            ReturnValue::NotSupported
        );
        assert_eq!(
            t.request_state_change(id, 77, false),
            ReturnValue::InvalidParameter
        );
        assert_eq!(
            t.request_state_change(id, 4, true),
            ReturnValue::TimeoutParameterNotSupported
        );
        assert_eq!(
            t.request_state_change(999, 4, false),
            ReturnValue::InvalidParameter
        );
        t.finish(id, JobState::Exception, Some("replica I/O error".into()));
        let info = t.get(id).unwrap();
        assert_eq!((info.job_state, info.error_code), (10, 4));
        assert!(info.elapsed_time.is_some());
        assert_eq!(
            t.request_state_change(id, 4, false),
            ReturnValue::InvalidStateTransition
        );
        std::thread::sleep(Duration::from_millis(2));
        assert!(t.expire());
        assert!(t.get(id).is_none());
    }

    #[test]
    fn restore_continues_numbering() {
        let t = JobTable::new(Duration::from_secs(60));
        let (id, _) = t.create("a", "b", None);
        let saved = t.saved();
        let t2 = JobTable::new(Duration::from_secs(60));
        t2.restore(saved, 5);
        assert!(t2.get(id).is_some());
        assert_eq!(t2.create("c", "d", None).0, 5);
    }
}
