//! Control socket client: one connection, one JSON-RPC request at a time,
//! with typed helpers for each method. Used by the CLI subcommands and by
//! tests.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::protocol::{
    method, GetJobReply, JobsReply, MethodReply, Response, ReturnOnly, RpcError, SynchronizedReply,
    VolumesReply,
};
use crate::jobs::JobInfo;
use crate::registry::{SyncInfo, VolumeInfo};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control socket I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("server error {}: {}", .0.code, .0.message)]
    Rpc(RpcError),
    #[error("unexpected reply: {0}")]
    Protocol(String),
}

/// See the module documentation.
#[derive(Debug)]
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    /// Connect to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let reader = BufReader::new(s.try_clone()?);
        Ok(Client {
            writer: s,
            reader,
            next_id: 1,
        })
    }

    /// Send a raw line and read one response line (tests of malformed input).
    pub fn raw(&mut self, line: &[u8]) -> Result<Value, ClientError> {
        let mut v = line.to_vec();
        v.push(b'\n');
        self.writer.write_all(&v)?;
        self.read_value()
    }

    fn read_value(&mut self) -> Result<Value, ClientError> {
        let mut resp = String::new();
        if self.reader.read_line(&mut resp)? == 0 {
            return Err(ClientError::Protocol("connection closed".into()));
        }
        serde_json::from_str(&resp).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Call `method` with named `params`; returns the `result` member.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
        let line = serde_json::to_vec(&req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let v = self.raw(&line)?;
        let r: Response =
            serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if r.id != json!(id) && r.error.is_none() {
            return Err(ClientError::Protocol(format!(
                "reply id {} for request {id}",
                r.id
            )));
        }
        match (r.result, r.error) {
            (_, Some(e)) => Err(ClientError::Rpc(e)),
            (Some(v), None) => Ok(v),
            (None, None) => Err(ClientError::Protocol("reply without result".into())),
        }
    }

    fn typed<T: serde::de::DeserializeOwned>(
        &mut self,
        m: &str,
        p: Value,
    ) -> Result<T, ClientError> {
        let v = self.call(m, p)?;
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn attach_replica(
        &mut self,
        source: &str,
        target: &str,
        copy_type: u16,
    ) -> Result<MethodReply, ClientError> {
        self.typed(
            method::ATTACH_REPLICA,
            json!({"SourceElement": source, "TargetElement": target, "CopyType": copy_type}),
        )
    }

    pub fn modify_synchronization(
        &mut self,
        operation: u16,
        sync: &str,
    ) -> Result<MethodReply, ClientError> {
        self.typed(
            method::MODIFY_SYNCHRONIZATION,
            json!({"Operation": operation, "Synchronization": sync}),
        )
    }

    /// `None` when the server does not know the job.
    pub fn get_job(&mut self, job: &str) -> Result<Option<JobInfo>, ClientError> {
        let r: GetJobReply = self.typed(method::GET_JOB, json!({"Job": job}))?;
        Ok(r.instance)
    }

    pub fn enumerate_jobs(&mut self) -> Result<Vec<JobInfo>, ClientError> {
        Ok(self
            .typed::<JobsReply>(method::ENUMERATE_JOBS, json!({}))?
            .jobs)
    }

    pub fn request_job_state_change(
        &mut self,
        job: &str,
        requested: u16,
    ) -> Result<u32, ClientError> {
        let r: ReturnOnly = self.typed(
            method::REQUEST_JOB_STATE_CHANGE,
            json!({"Job": job, "RequestedState": requested}),
        )?;
        Ok(r.return_value)
    }

    pub fn enumerate_synchronized(&mut self) -> Result<Vec<SyncInfo>, ClientError> {
        Ok(self
            .typed::<SynchronizedReply>(method::ENUMERATE_SYNCHRONIZED, json!({}))?
            .synchronized)
    }

    pub fn enumerate_volumes(&mut self) -> Result<Vec<VolumeInfo>, ClientError> {
        Ok(self
            .typed::<VolumesReply>(method::ENUMERATE_VOLUMES, json!({}))?
            .volumes)
    }
}
