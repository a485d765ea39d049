//! Wire types of the control protocol: JSON-RPC 2.0 envelopes and error
//! codes, and the result objects of each method (CIM names). Shared by the
//! server and the client. See docs/control-protocol.md.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Version of the method/field set (fields are only ever added).
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest request line the server accepts (bytes, without the newline).
pub const MAX_REQUEST: usize = 64 * 1024;

/// JSON-RPC 2.0 error codes used by the server.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// Implementation-defined: the peer is not allowed to use the socket.
    pub const PERMISSION_DENIED: i64 = -32001;
    /// Implementation-defined: too many connections.
    pub const SERVER_BUSY: i64 = -32002;
}

/// Method names.
pub mod method {
    pub const ATTACH_REPLICA: &str = "AttachReplica";
    pub const MODIFY_SYNCHRONIZATION: &str = "ModifySynchronization";
    pub const GET_JOB: &str = "GetJob";
    pub const ENUMERATE_JOBS: &str = "EnumerateJobs";
    pub const REQUEST_JOB_STATE_CHANGE: &str = "RequestJobStateChange";
    pub const ENUMERATE_SYNCHRONIZED: &str = "EnumerateSynchronized";
    pub const ENUMERATE_VOLUMES: &str = "EnumerateVolumes";
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }
}

/// A JSON-RPC response (exactly one of `result`/`error`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub jsonrpc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
    pub id: Value,
}

impl Response {
    pub fn ok(id: Value, result: Value) -> Self {
        Response {
            jsonrpc: "2.0".into(),
            result: Some(result),
            error: None,
            id,
        }
    }

    pub fn err(id: Value, e: RpcError) -> Self {
        Response {
            jsonrpc: "2.0".into(),
            result: None,
            error: Some(e),
            id,
        }
    }
}

/// Result of AttachReplica and ModifySynchronization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MethodReply {
    pub return_value: u32,
    /// `lunmirror:<n>` when ReturnValue is 4096.
    #[serde(default)]
    pub job: Option<String>,
    /// The association concerned, `lunmirror:sync:<n>`.
    #[serde(default)]
    pub synchronization: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
}

/// Result of GetJob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetJobReply {
    pub return_value: u32,
    #[serde(default)]
    pub instance: Option<crate::jobs::JobInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
}

/// Result of RequestJobStateChange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReturnOnly {
    pub return_value: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct JobsReply {
    pub jobs: Vec<crate::jobs::JobInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SynchronizedReply {
    pub synchronized: Vec<crate::registry::SyncInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumesReply {
    pub volumes: Vec<crate::registry::VolumeInfo>,
}

/// Human name of a CIM CopyType value.
pub fn copy_type_name(v: u16) -> &'static str {
    match v {
        2 => "Async",
        3 => "Sync",
        4 => "UnSyncAssoc",
        5 => "UnSyncUnAssoc",
        _ => "?",
    }
}

/// Human name of a ReturnValue.
pub fn return_value_name(v: u32) -> &'static str {
    match v {
        0 => "Completed with No Error",
        1 => "Not Supported",
        2 => "Unspecified Error",
        3 => "Timeout",
        4 => "Failed",
        5 => "Invalid Parameter",
        6 => "In Use",
        0x1000 => "Method Parameters Checked - Job Started",
        0x1001 => "Invalid State Transition",
        0x1002 => "Use of Timeout Parameter Not Supported",
        _ => "?",
    }
}
