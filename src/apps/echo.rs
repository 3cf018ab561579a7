//! `echo`: answers every request with a JSON description of it, like
//! httpbin, and of the worker serving it (its pid and parent, and where
//! its app was loaded and initialised). Query parameters: `sleep_ms=N`
//! waits before answering, `status=N` answers with that status.

use base64::Engine;
use monodon_worker::{App, Request, Response};
use serde_json::json;

#[derive(Default)]
pub struct Echo {
    /// The process `preload` ran in: the generation's template (or, with
    /// `--spawn exec`, the worker itself).
    preloaded_in: u32,
    /// The process `init_worker` ran in.
    initialised_in: u32,
}

/// Bytes as a string, one char per byte (ISO-8859-1), so that any header
/// value round-trips exactly through JSON.
fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

impl App for Echo {
    fn preload(&mut self) {
        self.preloaded_in = std::process::id();
    }

    fn init_worker(&mut self) {
        self.initialised_in = std::process::id();
    }

    fn call(&mut self, req: &mut Request<'_>) -> Response {
        let body = match req.read_body() {
            Ok(b) => b,
            // The runtime answers a malformed body itself; this is never sent.
            Err(e) => return Response::text(400, format!("cannot read the body: {e}\n")),
        };
        let status = match req.query_param("status").map(str::parse::<u16>) {
            None => 200,
            Some(Ok(s)) if (200..=999).contains(&s) => s,
            Some(_) => return Response::text(400, "status must be a number from 200 to 999\n"),
        };
        if let Some(ms) = req.query_param("sleep_ms") {
            match ms.parse::<u64>() {
                Ok(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
                Err(_) => return Response::text(400, "sleep_ms must be a number of milliseconds\n"),
            }
        }
        let headers: Vec<[String; 2]> = req.headers.iter().map(|(n, v)| [n.clone(), latin1(v)]).collect();
        let doc = json!({
            "method": req.method,
            "target": latin1(req.target.as_bytes()),
            "version": req.version(),
            "headers": headers,
            "body_base64": base64::engine::general_purpose::STANDARD.encode(&body),
            "peer": req.peer,
            "scheme": req.scheme,
            "worker": {
                "pid": req.worker.pid,
                "generation": req.worker.generation,
                "requests": req.worker.requests,
                "ppid": std::os::unix::process::parent_id(),
                "preloaded_in": self.preloaded_in,
                "initialised_in": self.initialised_in,
            },
        });
        let mut text = doc.to_string();
        text.push('\n');
        Response::new(status).header("Content-Type", "application/json").body(text)
    }
}
