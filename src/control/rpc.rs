//! JSON-RPC 2.0 request handling without I/O: one request line in, one
//! response line (or nothing, for notifications) out. Malformed JSON,
//! invalid requests, unknown methods and wrong parameter types become
//! JSON-RPC errors; nothing here panics on any input.

use serde_json::{json, Map, Value};

use super::protocol::{code, method, MethodReply, Response, RpcError};
use crate::jobs::ReturnValue;
use crate::registry::{MethodResult, Registry};

/// Handle one request line; `None` when nothing must be sent back (a
/// notification, or a batch of notifications).
pub fn handle_line(reg: &Registry, line: &[u8]) -> Option<Vec<u8>> {
    let resp = match serde_json::from_slice::<Value>(line) {
        Err(e) => Some(to_value(&Response::err(
            Value::Null,
            RpcError::new(code::PARSE_ERROR, format!("Parse error: {e}")),
        ))),
        Ok(Value::Array(batch)) => {
            if batch.is_empty() {
                Some(to_value(&Response::err(
                    Value::Null,
                    RpcError::new(code::INVALID_REQUEST, "Invalid Request: empty batch"),
                )))
            } else {
                let out: Vec<Value> = batch
                    .into_iter()
                    .filter_map(|v| handle_value(reg, v))
                    .map(|r| to_value(&r))
                    .collect();
                (!out.is_empty()).then_some(Value::Array(out))
            }
        }
        Ok(v) => handle_value(reg, v).map(|r| to_value(&r)),
    };
    resp.map(|v| serde_json::to_vec(&v).unwrap_or_else(|_| INTERNAL.to_vec()))
}

const INTERNAL: &[u8] =
    br#"{"jsonrpc":"2.0","error":{"code":-32603,"message":"Internal error"},"id":null}"#;

fn to_value<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// The error response for a request line that is too long.
pub fn too_large(limit: usize) -> Vec<u8> {
    let r = Response::err(
        Value::Null,
        RpcError::new(
            code::INVALID_REQUEST,
            format!("Invalid Request: request exceeds {limit} bytes"),
        ),
    );
    serde_json::to_vec(&r).unwrap_or_else(|_| INTERNAL.to_vec())
}

fn invalid_request(why: &str) -> RpcError {
    RpcError::new(code::INVALID_REQUEST, format!("Invalid Request: {why}"))
}

fn invalid_params(why: String) -> RpcError {
    RpcError::new(code::INVALID_PARAMS, format!("Invalid params: {why}"))
}

fn handle_value(reg: &Registry, v: Value) -> Option<Response> {
    let Value::Object(mut obj) = v else {
        return Some(Response::err(
            Value::Null,
            invalid_request("not a JSON object"),
        ));
    };
    let id = obj.remove("id");
    let id_ok = matches!(
        id,
        None | Some(Value::Null) | Some(Value::String(_)) | Some(Value::Number(_))
    );
    if !id_ok {
        return Some(Response::err(Value::Null, invalid_request("bad id")));
    }
    let reply_id = id.clone().unwrap_or(Value::Null);
    if obj.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Some(Response::err(
            reply_id,
            invalid_request("jsonrpc must be \"2.0\""),
        ));
    }
    let Some(Value::String(m)) = obj.remove("method") else {
        return Some(Response::err(
            reply_id,
            invalid_request("method must be a string"),
        ));
    };
    let params = match obj.remove("params") {
        None => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Some(Response::err(
                reply_id,
                invalid_params("params must be an object with named parameters".into()),
            ))
        }
    };
    if let Some(extra) = obj.keys().find(|k| k.as_str() != "jsonrpc") {
        return Some(Response::err(
            reply_id,
            invalid_request(&format!("unexpected member {extra:?}")),
        ));
    }
    let result = dispatch(reg, &m, params);
    // A notification gets no response, whatever happened.
    id.as_ref()?;
    Some(match result {
        Ok(v) => Response::ok(reply_id, v),
        Err(e) => Response::err(reply_id, e),
    })
}

/// Typed access to named parameters, rejecting unknown ones.
struct Params {
    map: Map<String, Value>,
}

impl Params {
    fn new(map: Map<String, Value>, allowed: &[&str]) -> Result<Self, RpcError> {
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(invalid_params(format!("unknown parameter {k:?}")));
        }
        Ok(Params { map })
    }

    fn string(&self, name: &str) -> Result<String, RpcError> {
        match self.map.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(invalid_params(format!("{name} must be a string"))),
            None => Err(invalid_params(format!("{name} is required"))),
        }
    }

    fn uint16(&self, name: &str) -> Result<u64, RpcError> {
        match self.map.get(name) {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= 0xFFFF => Ok(v),
                _ => Err(invalid_params(format!(
                    "{name} must be an integer 0..=65535"
                ))),
            },
            Some(_) => Err(invalid_params(format!(
                "{name} must be an integer 0..=65535"
            ))),
            None => Err(invalid_params(format!("{name} is required"))),
        }
    }

    fn present_not_null(&self, name: &str) -> Result<bool, RpcError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::String(_)) => Ok(true),
            Some(_) => Err(invalid_params(format!(
                "{name} must be a CIM interval string or null"
            ))),
        }
    }
}

fn method_reply(r: MethodResult) -> Value {
    to_value(&MethodReply {
        return_value: r.return_value.code(),
        job: r.job,
        synchronization: r.synchronization,
        error_description: r.error,
    })
}

fn dispatch(reg: &Registry, m: &str, params: Map<String, Value>) -> Result<Value, RpcError> {
    match m {
        method::ATTACH_REPLICA => {
            let p = Params::new(params, &["SourceElement", "TargetElement", "CopyType"])?;
            let (s, t, ct) = (
                p.string("SourceElement")?,
                p.string("TargetElement")?,
                p.uint16("CopyType")?,
            );
            Ok(method_reply(reg.attach_replica(&s, &t, ct)))
        }
        method::MODIFY_SYNCHRONIZATION => {
            let p = Params::new(params, &["Operation", "Synchronization"])?;
            let (op, sync) = (p.uint16("Operation")?, p.string("Synchronization")?);
            Ok(method_reply(reg.modify_synchronization(op, &sync)))
        }
        method::GET_JOB => {
            let p = Params::new(params, &["Job"])?;
            let job = p.string("Job")?;
            Ok(match reg.get_job(&job) {
                Some(info) => json!({"ReturnValue": 0, "Instance": info}),
                None => json!({
                    "ReturnValue": ReturnValue::InvalidParameter.code(),
                    "Instance": null,
                    "ErrorDescription": format!("unknown Job {job:?}"),
                }),
            })
        }
        method::ENUMERATE_JOBS => {
            Params::new(params, &[])?;
            Ok(json!({ "Jobs": reg.enumerate_jobs() }))
        }
        method::REQUEST_JOB_STATE_CHANGE => {
            let p = Params::new(params, &["Job", "RequestedState", "TimeoutPeriod"])?;
            let (job, st) = (p.string("Job")?, p.uint16("RequestedState")?);
            let timeout = p.present_not_null("TimeoutPeriod")?;
            let rv = reg.request_job_state_change(&job, st, timeout);
            Ok(json!({ "ReturnValue": rv.code() }))
        }
        method::ENUMERATE_SYNCHRONIZED => {
            Params::new(params, &[])?;
            Ok(json!({ "Synchronized": reg.enumerate_synchronized() }))
        }
        method::ENUMERATE_VOLUMES => {
            Params::new(params, &[])?;
            Ok(json!({ "Volumes": reg.enumerate_volumes() }))
        }
        other => Err(RpcError::new(
            code::METHOD_NOT_FOUND,
            format!("Method not found: {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::mem::MemDev;
    use crate::mirror::MirroredVolume;
    use std::sync::Arc;

    fn reg() -> (tempfile::TempDir, Arc<Registry>) {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path()).unwrap();
        let vol = MirroredVolume::new("lun0", Arc::new(MemDev::new(1 << 20)));
        r.add_volume("lun0", &dir.path().join("lun0.img"), vol, true)
            .unwrap();
        (dir, r)
    }

    fn call(r: &Registry, s: &str) -> Value {
        let out = handle_line(r, s.as_bytes()).expect("a response");
        serde_json::from_slice(&out).unwrap()
    }

    fn err_code(v: &Value) -> i64 {
        v["error"]["code"].as_i64().unwrap()
    }

    #[test]
    fn json_rpc_errors() {
        let (_d, r) = reg();
        let v = call(&r, "{not json");
        assert_eq!((err_code(&v), &v["id"]), (-32700, &Value::Null));
        assert_eq!(err_code(&call(&r, "[]")), -32600);
        assert_eq!(err_code(&call(&r, "42")), -32600);
        assert_eq!(
            err_code(&call(
                &r,
                r#"{"jsonrpc":"1.0","method":"EnumerateJobs","id":1}"#
            )),
            -32600
        );
        assert_eq!(
            err_code(&call(&r, r#"{"jsonrpc":"2.0","method":5,"id":1}"#)),
            -32600
        );
        assert_eq!(
            err_code(&call(&r, r#"{"jsonrpc":"2.0","method":"X","id":{}}"#)),
            -32600
        );
        let v = call(&r, r#"{"jsonrpc":"2.0","method":"Nope","id":"a"}"#);
        assert_eq!((err_code(&v), v["id"].as_str()), (-32601, Some("a")));
        for bad in [
            r#"{"jsonrpc":"2.0","method":"AttachReplica","params":[1,2,3],"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"AttachReplica","params":{"SourceElement":1,"TargetElement":"/x","CopyType":3},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"AttachReplica","params":{"SourceElement":"lun0","TargetElement":"/x","CopyType":"3"},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"AttachReplica","params":{"SourceElement":"lun0","TargetElement":"/x","CopyType":70000},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"AttachReplica","params":{"SourceElement":"lun0","TargetElement":"/x","CopyType":-1},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"AttachReplica","params":{"SourceElement":"lun0","TargetElement":"/x","CopyType":2.5},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"AttachReplica","params":{"SourceElement":"lun0","CopyType":3},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"AttachReplica","params":{"SourceElement":"lun0","TargetElement":"/x","CopyType":3,"Extra":1},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"EnumerateJobs","params":{"x":1},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"RequestJobStateChange","params":{"Job":"lunmirror:1","RequestedState":4,"TimeoutPeriod":5},"id":1}"#,
        ] {
            assert_eq!(err_code(&call(&r, bad)), -32602, "{bad}");
        }
        let v: Value = serde_json::from_slice(&too_large(10)).unwrap();
        assert_eq!(err_code(&v), -32600);
    }

    #[test]
    fn notifications_get_no_reply_and_batches_work() {
        let (_d, r) = reg();
        assert!(handle_line(&r, br#"{"jsonrpc":"2.0","method":"EnumerateJobs"}"#).is_none());
        assert!(handle_line(&r, br#"{"jsonrpc":"2.0","method":"Nope"}"#).is_none());
        let v = call(
            &r,
            r#"[{"jsonrpc":"2.0","method":"EnumerateVolumes","id":1},{"jsonrpc":"2.0","method":"EnumerateJobs"},7]"#,
        );
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 2);
        assert_eq!(arr[0]["result"]["Volumes"][0]["Name"], "lun0");
        assert_eq!(err_code(&arr[1]), -32600);
    }

    #[test]
    fn methods_answer_with_cim_names() {
        let (_d, r) = reg();
        let v = call(
            &r,
            r#"{"jsonrpc":"2.0","method":"AttachReplica","params":{"SourceElement":"nope","TargetElement":"/x","CopyType":3},"id":1}"#,
        );
        assert_eq!(v["result"]["ReturnValue"], 5);
        assert!(v["result"]["ErrorDescription"].is_string());
        let v = call(
            &r,
            r#"{"jsonrpc":"2.0","method":"GetJob","params":{"Job":"lunmirror:99"},"id":2}"#,
        );
        assert_eq!(v["result"]["ReturnValue"], 5);
        let v = call(
            &r,
            r#"{"jsonrpc":"2.0","method":"EnumerateSynchronized","id":3}"#,
        );
        assert_eq!(v["result"]["Synchronized"], json!([]));
        let v = call(
            &r,
            r#"{"jsonrpc":"2.0","method":"ModifySynchronization","params":{"Operation":4,"Synchronization":"lunmirror:sync:9"},"id":4}"#,
        );
        assert_eq!(v["result"]["ReturnValue"], 5);
        let v = call(
            &r,
            r#"{"jsonrpc":"2.0","method":"RequestJobStateChange","params":{"Job":"lunmirror:9","RequestedState":4},"id":5}"#,
        );
        assert_eq!(v["result"]["ReturnValue"], 5);
    }
}
