//! `hello`: the smallest possible app, for measuring the server itself.

use monodon_worker::{Request, Response};

pub fn hello(_req: &mut Request<'_>) -> Response {
    Response::new(200).header("Content-Type", "text/plain").body(&b"hello\n"[..])
}
